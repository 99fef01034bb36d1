"""The client library (astmarks) on real calls, as a bot author uses it.

The bot here is served by :func:`astmarks.serve` (a ``websockets`` server,
a :class:`astmarks.MediaSession` per call), or by FastAPI or aiohttp
(tests/webbots.py), nothing of the rig's; Asterisk
dials it, a real SIP phone is the caller, and what the library says is held
against the RTP the caller got.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from astmarks import (
    DriverError,
    Flushed,
    MarkCleared,
    MarkPlayed,
    MarkResult,
    MediaSession,
    MediaTimeout,
    SessionClosed,
    Status,
)
from astmarks.pacer import Pacer
from astmarks.protocol import ControlFormat
from harness import audio
from harness.caller import SipPhone
from harness.capture import RtpPacket
from harness.timing import units
from tests.conftest import check_mark_timing, report
from tests.integration.ownbot import asterisk_for, call
from tests.webbots import WebBot, web_bot

pytestmark = pytest.mark.integration


@pytest.fixture
async def own_bot() -> AsyncIterator[WebBot]:
    """A bot of the test's own, served by :func:`astmarks.serve`."""
    async with web_bot("websockets", timeout=units(10)) as bot:
        yield bot


def frames_heard(packets: list[RtpPacket], first: int, last: int) -> int:
    """How many of the tagged frames *first*..*last* reached the caller."""
    found = {audio.frame_index(p.payload) for p in packets}
    return sum(1 for i in range(first, last + 1) if i in found)


def departure(packets: list[RtpPacket], index: int) -> float:
    return next(p.t for p in packets if audio.frame_index(p.payload) == index)


@dataclass
class Played:
    """What the library said in :func:`marks_then_barge_in`."""

    played: list[MarkResult]
    flushed: Flushed
    cleared: MarkResult
    status: Status


async def marks_then_barge_in(s: MediaSession) -> Played:
    """Five marks 100 ms apart, then 2 s queued behind a mark, flushed half
    a second in (a barge-in)."""
    marks = []
    for i in range(5):
        await s.send_audio(audio.tagged_frames(i * 5, 5))
        marks.append(await s.mark(f"m{i}"))
    played = [await m for m in marks]
    await s.send_audio(audio.tagged_frames(100, 100))
    behind = await s.mark("behind")
    await asyncio.sleep(0.5)
    flushed = await s.flush()
    cleared = await behind
    status = await s.status()
    await asyncio.sleep(0.2)
    return Played(played, flushed, cleared, status)


def check_against_rtp(said: Played, packets: list[RtpPacket], what: str) -> None:
    """Positions exact, each MarkPlayed timed by its frame's RTP, the flush's
    position the RTP's to the frame."""
    assert all(isinstance(r, MarkPlayed) for r in said.played)
    assert [r.played_ms for r in said.played] == [100, 200, 300, 400, 500]
    errors = [
        (r.t - departure(packets, i * 5 + 4)) * 1000
        for i, r in enumerate(said.played)
        if isinstance(r, MarkPlayed)
    ]
    report(f"library: MarkPlayed - RTP of its frame ({what})", [f"{e:+.2f}" for e in errors])
    check_mark_timing(errors)
    assert isinstance(said.cleared, MarkCleared) and said.cleared.reason == "flush"
    flushed = said.flushed
    heard_ms = flushed.played_ms - 500
    on_rtp = frames_heard(packets, 100, 199) * audio.FRAME_MS
    report(f"library: flush heard ({what})", f"{heard_ms:.0f} ms, RTP {on_rtp} ms")
    assert heard_ms == on_rtp, "MEDIA_FLUSHED's position is the RTP's, to the frame"
    assert heard_ms + flushed.discarded_ms == 2000
    assert not flushed.estimated and flushed.cleared_marks == 1
    assert said.status.pending_marks == 0 and said.status.queued_ms == 0


async def test_marks_positions_and_flush_match_the_rtp(
    install: Path,
    phone: SipPhone,
    capture_ok: None,
    own_bot: WebBot,
    fmt: ControlFormat,
) -> None:
    async with (
        asterisk_for(install, own_bot.uri, "library") as asterisk,
        call(asterisk, phone, f"c(ulaw){fmt.dial_option}") as live,
    ):
        s = await own_bot.session()
        caps = await s.started()
        assert caps.marks and caps.control_format is fmt
        assert (caps.codec, caps.optimal_frame_size, caps.ptime) == ("ulaw", 160, 20)
        said = await marks_then_barge_in(s)
    check_against_rtp(said, live.packets, fmt.value)


@pytest.mark.parametrize("framework", ["fastapi", "aiohttp"])
async def test_a_bot_served_by_fastapi_or_aiohttp(
    install: Path, phone: SipPhone, capture_ok: None, framework: str
) -> None:
    """The session over another framework's WebSocket: the same marks and
    flush, and the caller hanging up ends what waits."""
    async with (
        web_bot(framework, timeout=units(10)) as bot,
        asterisk_for(install, bot.uri, f"library-{framework}") as asterisk,
        call(asterisk, phone) as live,
    ):
        s = await bot.session()
        assert (await s.started()).marks
        said = await marks_then_barge_in(s)
        await s.send_audio(audio.tagged_frames(200, 100))
        pending = await s.mark("pending")
        await live.sip.hangup()
        assert isinstance(await pending, MarkCleared)
        await s.wait_closed()
        with pytest.raises(SessionClosed):
            await s.status()
    check_against_rtp(said, live.packets, framework)
    assert s.close_code is not None, "the close code read from the framework"


async def test_bad_input_timeouts_progress_and_hangup(
    install: Path, phone: SipPhone, capture_ok: None, own_bot: WebBot
) -> None:
    async with (
        asterisk_for(install, own_bot.uri, "library") as asterisk,
        call(asterisk, phone) as live,
    ):
        s = await own_bot.session()
        await s.started()
        # Refused before anything is sent: the driver would refuse them too.
        for bad in ("has space", "x" * 65, "", "é"):
            with pytest.raises(ValueError, match="visible ASCII"):
                await s.mark(bad)
        with pytest.raises(ValueError, match="interval_ms"):
            await s.report_progress(5)
        # A timeout leaves the mark pending; its result still comes.
        await s.report_progress(100)
        await s.send_audio(audio.tagged_frames(0, 25))
        mark = await s.mark("half-second")
        with pytest.raises(MediaTimeout):
            await mark.result(timeout=0.05)
        first = await s.next_position()
        played = await mark
        assert isinstance(played, MarkPlayed) and played.played_ms == 500
        assert 0 < first.played_ms <= 500
        # Hang-up with a mark pending: cleared with the reason, then closed.
        await s.send_audio(audio.tagged_frames(100, 100))
        pending = await s.mark("pending")
        await s.command("HANGUP")
        cleared = await pending
        await s.wait_closed()
        with pytest.raises(SessionClosed):
            await s.status()
        with pytest.raises(SessionClosed):
            await s.mark("after")
        await live.sip.wait_disconnected()
    assert isinstance(cleared, MarkCleared) and cleared.reason == "hangup"
    assert s.errors == [], "nothing invalid reached Asterisk"


async def test_a_refused_mark_raises_the_drivers_error(
    install: Path, phone: SipPhone, capture_ok: None, own_bot: WebBot
) -> None:
    async with (
        asterisk_for(install, own_bot.uri, "library") as asterisk,
        call(asterisk, phone, "c(ulaw)f(json)"),
    ):
        s = await own_bot.session()
        await s.started()
        await s.command("SET_MEDIA_DIRECTION", direction="in")
        refused = await s.mark("while-in")
        with pytest.raises(DriverError, match="direction is 'in'"):
            await refused
        await s.command("SET_MEDIA_DIRECTION", direction="both")
        await s.send_audio(audio.tagged_frames(0, 5))
        assert isinstance(await (await s.mark("after")), MarkPlayed)
    assert len(s.errors) == 1


async def test_on_upstream_it_falls_back_and_says_so_once(
    upstream_install: Path,
    phone: SipPhone,
    capture_ok: None,
    own_bot: WebBot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="astmarks"):
        async with (
            asterisk_for(upstream_install, own_bot.uri, "upstream") as asterisk,
            call(asterisk, phone) as live,
        ):
            s = await own_bot.session()
            caps = await s.started()
            assert not caps.marks and caps.codec == "ulaw"
            await s.started()  # asked once
            await s.send_audio(audio.tagged_frames(0, 10))
            played = await (await s.mark("fallback"))
            with pytest.raises(RuntimeError, match="no REPORT_PROGRESS"):
                await s.report_progress(100)
            await s.send_audio(audio.tagged_frames(100, 100))
            pending = await s.mark("pending")
            await asyncio.sleep(0.5)
            flushed = await s.flush()
            cleared = await pending
            await asyncio.sleep(0.2)
    assert caplog.text.count("has no mark positions mode") == 1
    assert isinstance(played, MarkPlayed) and played.played_ms is None
    late = (played.t - departure(live.packets, 9)) * 1000
    report("library on upstream: MARK_MEDIA's answer - RTP of its frame", f"{late:+.1f} ms")
    assert 10 < late < 60, "upstream answers a ptime late"
    assert isinstance(cleared, MarkCleared) and cleared.inferred and cleared.reason == "flush"
    heard = flushed.played_ms - 200
    on_rtp = frames_heard(live.packets, 100, 199) * audio.FRAME_MS
    report("library on upstream: clock heard vs RTP", f"{heard:.0f} ms vs {on_rtp} ms")
    assert flushed.estimated
    assert abs(heard - on_rtp) < 100, "the clock is about right on an idle loopback"


async def _frames(first: int, count: int, per_chunk: int = 5) -> AsyncIterator[bytes]:
    """Tagged frames, a few per chunk, as a TTS stream would yield them."""
    for i in range(first, first + count, per_chunk):
        yield audio.tagged_frames(i, min(per_chunk, first + count - i))


async def test_the_pacer_interrupts_this_response_wherever_it_is(
    install: Path, phone: SipPhone, capture_ok: None, own_bot: WebBot
) -> None:
    async with (
        asterisk_for(install, own_bot.uri, "library") as asterisk,
        call(asterisk, phone) as live,
    ):
        s = await own_bot.session()
        pacer = Pacer(s)
        first = await pacer.play(_frames(0, 25))
        assert isinstance(await first.played(), MarkPlayed)
        # Interrupted before it could start: this response, not the one before.
        task = asyncio.create_task(pacer.play(_frames(100, 100)))
        cut = await pacer.interrupt()
        result = await task
        assert cut is result and result.interrupted and result.heard_ms == 0
        # Sent in full, still playing (the pacer keeps some queued): flushed.
        sent = await pacer.play(_frames(200, 25))
        late = await pacer.interrupt()
        await asyncio.sleep(0.1)
        # The next response plays in full: a barge-in is its response's only.
        again = await pacer.play(_frames(300, 10))
        assert isinstance(await again.played(), MarkPlayed)
        await asyncio.sleep(0.1)
    assert late is sent and sent.interrupted and sent.heard_ms is not None
    on_rtp = frames_heard(live.packets, 200, 224) * audio.FRAME_MS
    report(
        "library: pacer interrupted while still playing", f"{sent.heard_ms:.0f} ms, RTP {on_rtp}"
    )
    assert sent.heard_ms == on_rtp and 0 < on_rtp < 500
    assert frames_heard(live.packets, 100, 199) == 0
    assert frames_heard(live.packets, 300, 309) == 10
