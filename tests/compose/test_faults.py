"""Faults made through the Docker engine (docker-py), on real calls.

- the bot's container is killed with marks pending;
- the bot is cut off the network for a few seconds;
- the Asterisk container restarts mid-call.

Each checks what the caller hears (the RTP capture) and what became of every
mark, and leaves the services as it found them. They run after the other
compose tests (file order); the restart one last.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from typing import Any

import pytest

from harness import audio
from harness.bot import BotError
from harness.caller import SipPhone
from harness.capture import RtpPacket
from harness.rig import Rig, Services
from harness.timing import poll, units
from tests.compose.conftest import DemoCall, MarkFates, Project, demo_call
from tests.conftest import report

#: RMS level above which a packet carries speech rather than silence.
LOUD = 300
BOT_PORT = 8765


def loud_times(packets: list[RtpPacket]) -> list[float]:
    return [p.t for p in packets if audio.level(p.payload) > LOUD]


async def fates_when(
    project: Project, call: DemoCall, ok: Callable[[MarkFates], object], *, what: str
) -> MarkFates:
    """Poll the demo bot's log until *ok(fates)* holds for *call*."""

    async def check() -> MarkFates | None:
        fates = await project.bot_fates(call.tag, call.started)
        return fates if ok(fates) else None

    return await poll(check, timeout=units(20), what=what, interval=0.02)


async def test_killed_bot_the_call_ends_cleanly_and_the_next_call_works(
    project: Project, services: Services, phone: SipPhone, capture_ok: None
) -> None:
    bot = project.container("bot")
    try:
        async with demo_call(phone, services) as call:
            # Speech under way, and a mark the bot is still waiting for.
            before = await fates_when(
                project,
                call,
                lambda f: len(f.played) >= 6 and f.unanswered,
                what="6 marks played and 1 pending",
            )
            killed = time.time()
            await asyncio.to_thread(bot.kill)
            await call.sip.wait_disconnected(timeout=units(10))
            hung_up = time.time()
    finally:
        await asyncio.to_thread(bot.reload)
        if bot.status != "running":
            await asyncio.to_thread(bot.start)
        await project.wait_listening("bot", BOT_PORT, units(30))
    fates = await project.bot_fates(call.tag, call.started)
    report("bot killed: its marks", f"{fates} (before the kill: {before})")
    report("bot killed: the caller's hang-up after the kill", f"{1000 * (hung_up - killed):.0f} ms")
    assert hung_up - killed < units(5), "Asterisk hangs the call up when the bot's socket dies"
    loud = loud_times(call.packets)
    assert len(loud) >= 10, "the caller heard the greeting start"
    # The bot keeps about a chunk queued in Asterisk; nothing plays after that.
    assert max(loud) - killed < 1.0, f"speech {max(loud) - killed:.2f} s after the kill"
    assert max(p.t for p in call.packets) <= hung_up + 0.1
    # Asterisk lets go of both channels, and stays up.
    await project.wait_no_channels(units(5))
    # The next call works, with the bot back.
    async with demo_call(phone, services) as again:
        await fates_when(
            project, again, lambda f: len(f.played) >= 2, what="2 marks played in the next call"
        )
    assert len(loud_times(again.packets)) >= 5


async def test_bot_cut_off_the_network_for_seconds_loses_no_mark(
    project: Project, services: Services, phone: SipPhone, capture_ok: None
) -> None:
    bot = project.container("bot")
    network, address, alias = project.network("bot")
    cut_s = 3.0
    async with demo_call(phone, services) as call:
        await fates_when(project, call, lambda f: len(f.played) >= 3, what="3 marks played")
        await asyncio.to_thread(network.disconnect, bot)
        try:
            await asyncio.sleep(cut_s)
        finally:
            await asyncio.to_thread(network.connect, bot, ipv4_address=address, aliases=[alias])
        back = time.time()
        # The bot finishes its greeting and its goodbye, then hangs up.
        await call.sip.wait_disconnected(timeout=units(90))
    fates = await project.bot_fates(call.tag, call.started)
    report("bot cut off for 3 s: its marks", str(fates))
    assert fates.sent
    assert sorted(fates.played) == sorted(fates.sent), "every mark played once, none lost"
    assert not fates.cleared
    loud = loud_times(call.packets)
    gaps = [(b - a, a) for a, b in itertools.pairwise(loud)]
    gap, gap_start = max(gaps)
    report("bot cut off for 3 s: longest silence the caller heard", f"{gap:.2f} s")
    assert gap >= cut_s - 1.0, "the caller hears the outage as silence"
    assert gap_start < back, "the silence is the outage"
    assert any(t > back for t in loud), "speech resumes after the bot is back"


def _crash(container: Any) -> None:
    """SIGKILL, then start again: what a crash and a supervisor's restart look like."""
    container.kill()
    container.start()


@pytest.mark.parametrize(
    "how",
    [
        pytest.param("restart", id="docker-restart"),  # SIGTERM: Asterisk shuts down
        pytest.param("crash", id="sigkill"),  # no shutdown at all
    ],
)
async def test_asterisk_restart_mid_call_fails_clearly_and_the_next_call_works(
    project: Project, rig: Rig, how: str
) -> None:
    asterisk = project.container("asterisk")
    try:
        await _restart_mid_call(project, rig, asterisk, how)
    finally:
        # Whatever happened, the next test finds Asterisk up.
        await project.wait_healthy("asterisk", units(90))


async def _restart_mid_call(project: Project, rig: Rig, asterisk: Any, how: str) -> None:
    restart: asyncio.Task[None] | None = None
    try:
        async with rig.call() as call:
            s = call.session
            for k in range(25):  # 5 s of audio, a mark every 200 ms
                await s.send_audio(audio.tagged_frames(k * 10, 10))
                await s.command("MARK", f"c{k}")
            await s.wait_mark("c2")
            restarted = time.time()
            if how == "restart":
                restart = asyncio.create_task(asyncio.to_thread(asterisk.restart, timeout=10))
            else:
                restart = asyncio.create_task(asyncio.to_thread(_crash, asterisk))
            await s.wait_closed(timeout=units(15))
            closed = time.time()
            # Waiting for a mark that never came fails at once, and says why.
            t0 = time.monotonic()
            try:
                await s.wait_mark("c24", ("MARK_PLAYED",), timeout=units(30))
            except BotError as exc:
                failure = str(exc)
            else:
                failure = ""
            waited = time.monotonic() - t0
        left = time.time()  # the call context has torn the call down
    finally:
        if restart is not None:
            await restart  # the restart ends before the test does, whatever it asserts
    played = [e.mark_id for e in s.named("MARK_PLAYED")]
    cleared = [e.mark_id for e in s.named("MARK_CLEARED")]
    report(
        f"Asterisk {how} mid-call",
        f"socket closed {1000 * (closed - restarted):.0f} ms after it began (code "
        f"{s.close_code}), call torn down {1000 * (left - restarted):.0f} ms after it; marks: "
        f"{len(played)} played, {len(cleared)} cleared, "
        f"{25 - len(played) - len(cleared)} unanswered",
    )
    assert "connection closed" in failure, failure
    assert waited < 1.0
    assert left - restarted < units(30), "nothing hangs"
    assert played[:3] == ["c0", "c1", "c2"]
    assert len(played) < 25
    if how == "restart":
        assert len(played) + len(cleared) == 25, "a shutdown clears every pending mark"
    packets = call.packets
    assert packets and max(p.t for p in packets) < closed + 0.5, "no audio after the restart"
    # Asterisk comes back; the next call works, with exact marks.
    healthy_after = await project.wait_healthy("asterisk", units(90))
    report(f"Asterisk {how}: healthy again after", f"{healthy_after:.1f} s")
    async with rig.call() as again:
        await again.session.send_audio(audio.tagged_frames(0, 10))
        await again.session.command("MARK", "m1")
        ack = await again.session.wait_mark("m1")
    assert ack.name == "MARK_PLAYED"
    assert ack.get_int("played_ms") == 200
