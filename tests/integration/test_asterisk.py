"""Starting and stopping Asterisk: clear errors fast, never a hang."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from harness.asterisk import Asterisk, AsteriskError, find_install
from harness.ports import ephemeral_low, free_port


async def test_start_cli_and_graceful_stop(install: Path) -> None:
    ast = Asterisk(install, "ws://127.0.0.1:9/media")
    await ast.start()
    try:
        assert ast.running
        out = await ast.cli("module show like chan_websocket")
        assert "chan_websocket.so" in out
        out = await ast.cli("dialplan show bot@bot")
        assert "WebSocket/bot/" in out
    finally:
        status = await ast.stop()
    assert status == 0, "core stop now ends Asterisk cleanly"
    assert not ast.running
    ast.cleanup()


async def test_asterisk_that_fails_to_start_gives_a_clear_error_quickly(install: Path) -> None:
    ast = Asterisk(install, "ws://127.0.0.1:9/media", required=("no_such_module.so",))
    t0 = time.monotonic()
    with pytest.raises(AsteriskError) as err:
        await ast.start()
    assert time.monotonic() - t0 < 15
    message = str(err.value)
    assert "exited with status" in message
    assert "no_such_module" in message, "the log tail says why"
    assert not ast.running
    ast.cleanup()


async def test_sip_port_already_taken(install: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", port))
        ast = Asterisk(install, "ws://127.0.0.1:9/media", sip_port=port)
        t0 = time.monotonic()
        with pytest.raises(AsteriskError, match="already in use"):
            await ast.start()
        assert time.monotonic() - t0 < 5
    assert ast.process is None
    ast.cleanup()


async def test_a_sip_port_it_chose_and_lost_is_chosen_again(install: Path) -> None:
    """The port an Asterisk chose for itself is taken before it starts (a SIP
    phone's RTP got it, say): it chooses another and starts (CI once failed
    on this), and its RTP range lies below the kernel's ephemeral ports."""
    ast = Asterisk(install, "ws://127.0.0.1:9/media")
    chosen = ast.sip_port
    assert ast.settings.rtp_end < ephemeral_low()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", chosen))
            await ast.start()
            assert ast.sip_port != chosen
            assert ast.running
    finally:
        await ast.stop()
        ast.cleanup()


def test_missing_build_names_the_make_target(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ASTERISK_PREFIX", str(tmp_path))
    with pytest.raises(AsteriskError, match="make asterisk"):
        find_install("patched")
    monkeypatch.setenv("ASTERISK_UPSTREAM_PREFIX", str(tmp_path))
    with pytest.raises(AsteriskError, match="make asterisk-upstream"):
        find_install("upstream")
    monkeypatch.setenv("ASTERISK_PR_PREFIX", str(tmp_path))
    with pytest.raises(AsteriskError, match="make asterisk-pr PR=ignored-input-errors"):
        find_install("pr")


async def test_unused_port_helper_gives_distinct_ports() -> None:
    ports = {free_port() for _ in range(5)}
    assert len(ports) >= 4
