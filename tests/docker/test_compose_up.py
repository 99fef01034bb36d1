"""What the README and docs/DOCKER.md tell a person to do, on this host's Docker engine:
``docker compose -f docker/docker-compose.yml up --build`` (Asterisk and the
demo bot), then a call from a SIP phone on this host to the published port.
The phone is the harness's pjsua2 phone, set up as a softphone would be: user
``caller``, no registration, PCMU, no special headers, and on this host's own
address (a softphone offers the address of its default route in its SDP;
Asterisk, in its container, sends the RTP there).

Needs the images (``make docker-build``); ``make docker-test`` runs it after
the tests inside compose.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import audio
from harness.caller import SipPhone
from harness.capture import RtpCapture
from harness.ports import LOOPBACK, free_port, source_address
from harness.timing import units
from tests.conftest import ROOT, failed, need, report
from tests.test_docker import COMPOSE, tool


def engine_answers() -> bool:
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def softphone_address(asterisk: str) -> str:
    """The address a softphone here would use: its default route's; else the
    one facing Asterisk's container."""
    try:
        return source_address("198.51.100.1")  # any outside address: a route lookup
    except OSError:
        return source_address(asterisk)


class Up:
    """``docker compose up`` of the README, under a project name of its own."""

    def __init__(self, env: dict[str, str], sip_port: int) -> None:
        self.project = f"asterisk-marks-up-{uuid.uuid4().hex[:6]}"
        self.env = env
        self.sip_port = sip_port

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [tool("docker-compose"), "-f", str(COMPOSE), "-p", self.project, *args],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=ROOT,
            timeout=timeout,
            check=False,
        )

    def wait_for_the_bot(self) -> None:
        """Until the demo bot listens (it has no healthcheck): its log says so."""
        deadline = time.monotonic() + units(60)
        while "demo bot: listening" not in self.compose("logs", "bot").stdout:
            assert time.monotonic() < deadline, "the demo bot never said it listens"
            time.sleep(0.5)

    def asterisk_address(self) -> str:
        """The asterisk container's address on its network."""
        ps = self.compose("ps", "--quiet", "asterisk")
        container = ps.stdout.strip()
        assert container, ps.stderr
        inspect = subprocess.run(
            [
                "docker",
                "inspect",
                "--format",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
                container,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        return inspect.stdout.split()[0]


@pytest.fixture
def up(request: pytest.FixtureRequest) -> Iterator[Up]:
    need(engine_answers(), "no Docker engine answers 'docker info'")
    sip_port = free_port(socket.SOCK_DGRAM)
    env = {**os.environ, "SIP_HOST_PORT": str(sip_port), "ARI_HOST_PORT": str(free_port())}
    stack = Up(env, sip_port)
    ok = False
    try:
        # --wait: until Asterisk's healthcheck passes.
        started = stack.compose("up", "--build", "--detach", "--wait", "--wait-timeout", "300")
        assert started.returncode == 0, started.stdout + started.stderr
        stack.wait_for_the_bot()
        yield stack
        ok = not failed(request)
    finally:
        if not ok:
            logs = stack.compose("logs", "--no-color", "--tail", "80")
            print(f"--- docker compose logs ---\n{logs.stdout}{logs.stderr}")  # noqa: T201
        stack.compose("down", "--volumes", "--remove-orphans", timeout=120)


async def test_a_sip_phone_on_this_host_calls_the_demo_bot(
    up: Up, tmp_path: Path, capture_ok: None
) -> None:
    asterisk = up.asterisk_address()
    address = softphone_address(asterisk)
    async with SipPhone(tmp_path / "phone", address=address) as phone:
        sip = await phone.call(f"sip:bot@{LOOPBACK}:{up.sip_port}", tag="person")
        try:
            await sip.wait_media()
            assert sip.record.local_rtp is not None
            _, rtp_port = sip.record.local_rtp
            async with RtpCapture.to_port(rtp_port, host=address, peer=asterisk) as capture:
                # The greeting, the goodbye, then the bot hangs up.
                await sip.wait_disconnected(timeout=units(90))
        finally:
            await sip.hangup()
    packets = capture.packets
    loud = [p for p in packets if audio.level(p.payload) > 300]
    report(
        "compose up, a call from a phone on this host",
        f"{len(packets) * audio.FRAME_MS / 1000:.1f} s of RTP, {len(loud)} packets of speech",
    )
    assert len(loud) >= 100, "the phone heard the greeting (several seconds of speech)"
    bot_log = up.compose("logs", "--no-color", "bot").stdout
    assert "MEDIA_MARK_PROCESSED seq:" in bot_log, bot_log  # MARK_MEDIA in mark positions mode
    assert "hanging up" in bot_log, bot_log
