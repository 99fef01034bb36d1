"""The Docker setup's services, as processes: Asterisk configured from the
environment (``python -m harness.serve``, the image's entry point), the demo
bot (``python -m harness bot``) and a rig that uses them instead of starting
an Asterisk of its own.

Here they run on loopback; in ``make docker-test`` (``HARNESS_ASTERISK_HOST``
set) the same tests call the compose services instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import audio
from harness.asterisk import tail
from harness.caller import SipPhone
from harness.capture import RtpCapture, RtpPacket
from harness.config import OPTIONS_HEADER
from harness.ports import LOOPBACK, free_port, free_udp_range
from harness.rig import Rig, Services
from harness.timing import units
from tests.conftest import SERVICES, failed, report

#: A short greeting, so that a call to the local demo bot ends quickly, yet
#: long enough to be talked over.
GREETING = "Hello from the demo bot. Talk over me, and I will stop and tell you."


@dataclass
class Running:
    services: Services
    demo_extension: str
    bot_log: Path | None  # the demo bot's output, when it runs here


async def _until_healthy(
    install: Path, conf: Path, proc: asyncio.subprocess.Process, log_path: Path
) -> None:
    """The Docker image's HEALTHCHECK: ``asterisk -rx 'core waitfullybooted'``."""
    deadline = asyncio.get_running_loop().time() + units(30)
    while True:
        assert proc.returncode is None, (
            f"harness.serve exited with status {proc.returncode}; its output:\n{tail(log_path)}"
        )
        check = await asyncio.create_subprocess_exec(
            str(install / "sbin" / "asterisk"),
            "-C",
            str(conf),
            "-rx",
            "core waitfullybooted",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "LD_LIBRARY_PATH": str(install / "lib")},
        )
        if await check.wait() == 0:
            return
        assert asyncio.get_running_loop().time() < deadline, "Asterisk never became healthy"
        await asyncio.sleep(0.2)


async def _until_listening(proc: asyncio.subprocess.Process, log_path: Path) -> None:
    """The demo bot takes connections: it says so once listening (it renders
    its greeting first: under load a call placed before that found no bot,
    and Asterisk answered 404). Its log, not a probe connection, which would
    be a failed handshake in its log."""
    deadline = asyncio.get_running_loop().time() + units(30)
    while "listening on" not in await asyncio.to_thread(log_path.read_text, errors="replace"):
        assert proc.returncode is None, (
            f"the demo bot exited with status {proc.returncode}; its output:\n{tail(log_path)}"
        )
        assert asyncio.get_running_loop().time() < deadline, "the demo bot never listened"
        await asyncio.sleep(0.1)


async def _start(argv: list[str], log: Path, env: dict[str, str]) -> asyncio.subprocess.Process:
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *argv, env=env, stdout=out, stderr=asyncio.subprocess.STDOUT, cwd=log.parent
        )


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), units(10))
        except TimeoutError:
            proc.kill()
            await proc.wait()


@pytest.fixture
async def running(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Running]:
    """The compose services when the run is in compose; otherwise started here."""
    if SERVICES is not None:
        yield Running(SERVICES, os.environ.get("HARNESS_DEMO_BOT", "bot"), None)
        return
    install: Path = request.getfixturevalue("install")
    sip_port, demo_port, harness_port = free_port(), free_port(), free_port()
    rtp = free_udp_range(100)
    sandbox = tmp_path / "srv"
    env = {
        **os.environ,
        "ASTERISK_PREFIX": str(install),
        "ASTERISK_SANDBOX": str(sandbox),
        "SIP_BIND": LOOPBACK,
        "SIP_PORT": str(sip_port),
        "RTP_START": str(rtp),
        "RTP_END": str(rtp + 99),
        "BOT_URI": f"ws://{LOOPBACK}:{demo_port}/media",
        "HARNESS_BOT_URI": f"ws://{LOOPBACK}:{harness_port}/media",
    }
    ast_log, bot_log = tmp_path / "serve.log", tmp_path / "bot.log"
    ast = await _start([sys.executable, "-m", "harness.serve"], ast_log, env)
    bot = await _start(
        [
            sys.executable,
            "-m",
            "harness",
            "bot",
            "--listen",
            f"{LOOPBACK}:{demo_port}",
            "--text",
            GREETING,
        ],
        bot_log,
        dict(os.environ),
    )
    try:
        await _until_healthy(install, sandbox / "etc" / "asterisk.conf", ast, ast_log)
        await _until_listening(bot, bot_log)
        services = Services(
            LOOPBACK,
            sip_port,
            extension="harness",
            bot_host=LOOPBACK,
            bot_port=harness_port,
            logs=sandbox / "log",
        )
        yield Running(services, "bot", bot_log)
    finally:
        await _stop(bot)
        await _stop(ast)
        if failed(request):
            print(f"--- harness.serve + Asterisk ---\n{tail(ast_log)}")  # noqa: T201
            print(f"--- demo bot ---\n{tail(bot_log)}")  # noqa: T201


async def test_rig_uses_the_running_asterisk(
    running: Running, phone: SipPhone, capture_ok: None, tmp_path: Path
) -> None:
    async with Rig(None, tmp_path, phone=phone, services=running.services) as rig:
        assert rig.asterisk is None, "no Asterisk of its own"
        async with rig.call() as call:
            s = call.session
            assert s.media_start is not None
            assert s.media_start.get_str("connection_id") == running.services.extension
            for i in range(5):
                await s.send_audio(audio.tagged_frames(i * 5, 5))
                await s.command("MARK", f"m{i}")
            for i in range(5):
                await s.wait_mark(f"m{i}", ("MARK_PLAYED",))
            await asyncio.sleep(0.2)
        indexes = [audio.frame_index(p.payload) for p in call.packets]
        assert [i for i in indexes if i is not None] == list(range(25))
        played = [e.get_int("played_ms") for e in s.named("MARK_PLAYED")]
        assert played == [100, 200, 300, 400, 500]


async def _call_demo_bot(
    running: Running, phone: SipPhone, talk: Path | None = None
) -> list[RtpPacket]:
    """Call the demo bot and stay on until it hangs up; *talk* is played at 1 s."""
    host = running.services.address()
    uri = f"sip:{running.demo_extension}@{host}:{running.services.sip_port}"
    tag = uuid.uuid4().hex[:12]
    sip = await phone.call(uri, tag=tag, headers={OPTIONS_HEADER: f"c(ulaw)v(call={tag})"})
    try:
        await sip.wait_media()
        assert sip.record.local_rtp is not None
        local, port = sip.record.local_rtp
        async with RtpCapture.to_port(port, host=local, peer=host) as capture:
            if talk is not None:
                await asyncio.sleep(1.0)
                await sip.play(talk)
            # The greeting, the bot's answer, and the bot hangs up.
            await sip.wait_disconnected(timeout=units(60))
        return capture.packets
    finally:
        with contextlib.suppress(Exception):
            await sip.hangup()


def _loud(packets: list[RtpPacket]) -> int:
    return sum(1 for p in packets if audio.level(p.payload) > 300)


async def test_demo_bot_speaks_paced_by_marks_then_hangs_up(
    running: Running, phone: SipPhone, capture_ok: None
) -> None:
    packets = await _call_demo_bot(running, phone)
    heard_s = len(packets) * audio.FRAME_MS / 1000
    report("demo bot call: RTP to the caller", f"{heard_s:.2f} s, {_loud(packets)} loud packets")
    assert heard_s >= 2.0, "the greeting and the goodbye were played"
    assert _loud(packets) >= 25, "speech, not silence"
    if running.bot_log is not None:
        log = running.bot_log.read_text()
        assert "MEDIA_MARK_PROCESSED seq:" in log, log
        assert "MARK_CLEARED" not in log, log  # nor MEDIA_MARK_CLEARED
        assert "hanging up" in log, log
        assert "Traceback" not in log, log


async def test_demo_bot_stops_when_the_caller_talks(
    running: Running, phone: SipPhone, capture_ok: None, tmp_path: Path
) -> None:
    talk = audio.write_wav(tmp_path / "talk.wav", audio.tone(300.0, 800, level=0.5))
    packets = await _call_demo_bot(running, phone, talk=talk)
    assert _loud(packets) >= 25
    if running.bot_log is not None:
        log = running.bot_log.read_text()
        assert "the caller talks: barge-in" in log, log
        heard = [line for line in log.splitlines() if "MEDIA_FLUSHED: the caller heard" in line]
        assert len(heard) == 1, log
        heard_ms = int(heard[0].rsplit("heard ", 1)[1].split()[0])
        report("demo bot barge-in: heard before the flush", f"{heard_ms} ms")
        # Talk started 1 s in; the bot needs 200 ms of it, plus a poll.
        assert 800 <= heard_ms <= 2500, log
        assert "hanging up" in log and "Traceback" not in log, log
