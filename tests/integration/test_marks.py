"""MARK -> MARK_PLAYED on real calls: timing against RTP, positions, lifecycle.

Every test runs in both control formats. Timing bounds here are loose (CI
machines are noisy); the measured figures are printed at the end of the run
and `make bench` reports them properly.
"""

from __future__ import annotations

import asyncio
import re
import time

import pytest

from astmarks.protocol import ControlFormat
from harness import analysis, audio
from harness.rig import Rig
from tests.conftest import (
    check_cleared_by_hangup,
    check_mark_timing,
    hang_up_with_marks_pending,
    need,
    report,
    send_marked_chunks,
)

FRAME = audio.FRAME_BYTES


async def test_mark_played_carries_id_sequence_and_position(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 10))
        await s.command("MARK", "first")
        await s.send_audio(audio.tagged_frames(10, 10))
        await s.command("MARK", "second")
        first = await s.wait_mark("first")
        second = await s.wait_mark("second")
    assert first.name == second.name == "MARK_PLAYED"
    assert (first.get_int("seq"), second.get_int("seq")) == (1, 2)
    assert first.get_int("played_ms") == 200
    assert first.get_int("queued_ms") == 200, "the second chunk is still queued"
    assert second.get_int("played_ms") == 400
    assert second.get_int("queued_ms") == 0
    if fmt is ControlFormat.JSON:
        assert first.get_str("channel_id") == s.media_start.get_str("channel_id")  # type: ignore[union-attr]


async def test_plain_mark_accepts_the_id_equals_form(rig: Rig) -> None:
    async with rig.call() as call:
        await call.session.send_audio(audio.tagged_frames(0, 3))
        await call.session.send_text("MARK id=chunk-7")
        event = await call.session.wait_mark("chunk-7")
    assert event.name == "MARK_PLAYED"
    assert event.get_int("played_ms") == 60


async def test_mark_played_is_sent_in_the_tick_that_dequeues_the_frame(
    rig: Rig, fmt: ControlFormat
) -> None:
    """A mark after every 200 ms chunk: ack arrival vs RTP departure of its last frame."""
    async with rig.call(control_format=fmt) as call:
        s = call.session
        sent, marks = await send_marked_chunks(s, 8)
        await s.wait_mark("c7", timeout=5)
    timings = analysis.acked_mark_timings(
        sent, marks, call.session.named("MARK_PLAYED"), call.packets
    )
    errors = [t.error_ms for t in timings]
    assert None not in errors, f"every mark acknowledged and its frame seen: {timings}"
    summary = analysis.Summary.of([e for e in errors if e is not None])
    report(f"MARK_PLAYED - RTP, 200 ms chunks ({fmt.value})", summary)
    check_mark_timing([e for e in errors if e is not None])


async def test_marks_after_every_frame(rig: Rig, fmt: ControlFormat) -> None:
    n = 25
    sent = audio.tagged_frames(0, n)
    marks = [(f"f{i}", (i + 1) * FRAME) for i in range(n)]
    async with rig.call(control_format=fmt) as call:
        s = call.session
        for i in range(n):
            await s.send_audio(sent[i * FRAME : (i + 1) * FRAME])
            await s.command("MARK", f"f{i}")
        await s.wait_mark(f"f{n - 1}")
    played = call.session.named("MARK_PLAYED")
    assert [e.mark_id for e in played] == [m for m, _ in marks], "in order, once each"
    assert [e.get_int("played_ms") for e in played] == [20 * (i + 1) for i in range(n)]
    timings = analysis.acked_mark_timings(sent, marks, played, call.packets)
    errors = [t.error_ms for t in timings if t.error_ms is not None]
    assert len(errors) == n
    summary = analysis.Summary.of(errors)
    report(f"MARK_PLAYED - RTP, a mark per 20 ms frame ({fmt.value})", summary)
    assert sorted(abs(e) for e in errors)[n // 2] < 5, summary


async def test_mark_with_nothing_queued_is_acknowledged_at_once(
    rig: Rig, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("MARK", "drained")
        await s.wait_mark("drained")
        await asyncio.sleep(0.1)
        t0 = time.time()
        await s.command("MARK", "idle")
        idle = await s.wait_mark("idle")
    delay_ms = (idle.t - t0) * 1000
    report(f"MARK on an empty queue: command -> MARK_PLAYED ({fmt.value})", f"{delay_ms:.2f} ms")
    assert idle.get_int("played_ms") == 100
    assert idle.get_int("queued_ms") == 0
    assert delay_ms < 15, "answered at once, not at the next 20 ms tick"


async def test_back_to_back_marks_resolve_together_in_order(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 5))
        for name in ("a", "b", "c"):
            await s.command("MARK", name)
        await s.wait_mark("c")
    played = call.session.named("MARK_PLAYED")
    assert [e.mark_id for e in played] == ["a", "b", "c"]
    assert [e.get_int("seq") for e in played] == [1, 2, 3]
    assert {e.get_int("played_ms") for e in played} == {100}
    assert (played[-1].t - played[0].t) * 1000 < 5, "sent in the same tick"


async def test_flush_resolves_every_mark_and_reports_the_position(
    rig: Rig, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        sent, marks = await send_marked_chunks(s, 5)
        await asyncio.sleep(0.3)
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
        await asyncio.sleep(0.2)
    events = call.session.named("MARK_PLAYED", "MARK_CLEARED")
    ids = [m for m, _ in marks]
    assert sorted(e.mark_id or "" for e in events) == ids, "every mark resolved exactly once"
    assert [e.mark_id for e in events] == ids, "in queue order"
    cleared = call.session.named("MARK_CLEARED")
    assert cleared, "a flush after 300 ms leaves marks pending"
    assert {e.get_str("reason") for e in cleared} == {"flush"}
    assert all(e.index < flushed.index for e in events), "MARK_CLEARED comes before MEDIA_FLUSHED"
    assert flushed.get_str("reason") == "flush"
    assert flushed.get_int("cleared_marks") == len(cleared)
    played_ms, discarded_ms = flushed.get_int("played_ms"), flushed.get_int("discarded_ms")
    assert played_ms + discarded_ms == audio.ms_of(len(sent))
    # The reported position matches what left on RTP, within a frame.
    delivered = sum(1 for p in call.packets if audio.frame_index(p.payload) is not None)
    report(
        f"flush: played_ms vs RTP frames ({fmt.value})",
        f"reported {played_ms} ms, RTP {delivered * 20} ms",
    )
    assert abs(played_ms - delivered * 20) <= 20
    assert 200 <= played_ms <= 400


async def test_flushed_mark_media_gets_media_mark_cleared(rig: Rig, fmt: ControlFormat) -> None:
    """Once an app has opted in, its MARK_MEDIA marks are answered exactly once too."""
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks()
        await s.send_audio(audio.tagged_frames(0, 50))
        await s.command("MARK_MEDIA", "legacy")
        await s.command("FLUSH_MEDIA")
        cleared = await s.wait_for("MEDIA_MARK_CLEARED")
        await s.wait_for("MEDIA_FLUSHED")
    assert cleared.mark_id == "legacy"
    assert not call.session.named("MEDIA_MARK_PROCESSED")


async def test_caller_hangup_clears_pending_marks_before_the_socket_closes(
    rig: Rig, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt) as call:
        await hang_up_with_marks_pending(call)
    check_cleared_by_hangup(call.session)


async def test_media_direction_in_holds_media_and_marks(rig: Rig) -> None:
    """Direction 'in' stops the timer; 'both' re-creates it and the queue plays on."""
    async with rig.call(control_format=ControlFormat.JSON) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 50))
        await s.command("MARK", "before")
        await asyncio.sleep(0.2)
        await s.command("SET_MEDIA_DIRECTION", "in")
        await asyncio.sleep(0.5)
        held = s.named("MARK_PLAYED", "MARK_CLEARED", "MEDIA_FLUSHED")
        # With no timer, a new mark is refused rather than left hanging.
        await s.command("MARK", "while-in")
        error = await s.wait_for("ERROR")
        await s.command("SET_MEDIA_DIRECTION", "both")
        mark = await s.wait_mark("before")
        await asyncio.sleep(0.1)
    assert held == [], "nothing is discarded or answered while the direction is 'in'"
    assert "MARK" in error.get_str("error_text")
    assert mark.name == "MARK_PLAYED"
    assert mark.get_int("played_ms") == 1000
    assert [audio.frame_index(p.payload) for p in call.packets] == list(range(50))


async def test_partial_frame_is_played_before_its_mark(rig: Rig, fmt: ControlFormat) -> None:
    """10 frames + 50 bytes in one message, no buffering, then a mark.

    The 50 bytes go out as they are (no padding, as upstream decided): without
    a negotiated ptime, Asterisk sends them as a short RTP packet at once.
    """
    sent = audio.tagged_frames(0, 10) + audio.tagged_frame(10, 50)
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks()  # in the mode before the audio: its end is kept
        await s.send_audio(sent)
        await s.command("MARK", "after-partial")
        mark = await s.wait_mark("after-partial")
        await asyncio.sleep(0.1)
    payloads = [p.payload for p in call.packets]
    frames = analysis.split_frames(sent)
    assert payloads[:10] == frames[:10]
    short = call.packets[10]
    assert len(payloads) == 11, "nothing after the partial frame"
    assert short.payload == frames[10], "the 50 bytes, unpadded"
    assert mark.get_int("played_ms") == 206  # 1650 bytes = 206.25 ms
    error_ms = (mark.t - short.t) * 1000
    report(
        f"MARK_PLAYED after a 50-byte partial frame - its RTP ({fmt.value})", f"{error_ms:+.2f} ms"
    )
    assert abs(error_ms) < 15


async def test_with_ptime_a_short_frame_waits_in_the_smoother(rig: Rig) -> None:
    """The padding question, measured. The phone offers a=ptime:20, so Asterisk
    sends through its RTP smoother, which holds a short frame until more audio
    completes it. MARK_PLAYED still comes when the frame is handed to the core
    (the driver's promise); the caller gets those bytes only with the next
    audio, merged into its first packet."""
    first = audio.tagged_frames(0, 10) + audio.tagged_frame(10, 50)
    later = audio.tagged_frames(20, 10)
    async with rig.call(ptime=20) as call:
        s = call.session
        assert await s.probe_marks()
        await s.send_audio(first)
        await s.command("MARK", "after-partial")
        mark = await s.wait_mark("after-partial")
        await asyncio.sleep(0.5)
        await s.send_audio(later)
        await s.command("MARK", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.1)
    payloads = [p.payload for p in call.packets]
    assert payloads[:10] == analysis.split_frames(first)[:10]
    held = call.packets[10]
    delay_ms = (held.t - mark.t) * 1000
    report(
        "ptime 20 offered: the 50 bytes before a mark leave after its MARK_PLAYED by",
        f"{delay_ms:+.0f} ms, in a {len(held.payload)}-byte packet",
    )
    assert held.payload[:50] == first[1600:], "the 50 bytes come next, unchanged"
    assert len(held.payload) == 160, "merged with the next audio into a whole frame"
    assert held.payload[50:] == later[:110]
    assert delay_ms > 400, "held until the next audio, 500 ms later"


async def test_buffered_partial_frame_is_played_before_the_mark(
    rig: Rig, fmt: ControlFormat
) -> None:
    """START_MEDIA_BUFFERING, 10.5 frames, a mark; four times, each after the
    queue has run dry.

    As upstream does since #2006, the half frame is played when the queue runs
    dry, buffering or not; the mark after it is answered in that tick (timed
    over the four, so that one stall of a loaded machine is told from a
    mark a tick late: under AddressSanitizer one ack came 74 ms late once).
    """
    chunks = [audio.tagged_frames(k * 10, 10) + bytes(range(16, 96)) for k in range(4)]
    acks = []
    async with rig.call(control_format=fmt) as call:
        s = call.session
        for k, chunk in enumerate(chunks):
            await s.command("START_MEDIA_BUFFERING")
            await s.send_audio(chunk)
            await s.command("MARK", f"mid{k}")
            acks.append(await s.wait_mark(f"mid{k}"))
            await asyncio.sleep(0.3)  # the half frame alone, and nothing after it
            after = len(s.events) - 1
            await s.command("STOP_MEDIA_BUFFERING", f"done{k}")
            await s.wait_for("MEDIA_BUFFERING_COMPLETED", after=after)
        await asyncio.sleep(0.1)
    payloads = [p.payload for p in call.packets]
    expected = [frame for chunk in chunks for frame in analysis.split_frames(chunk)]
    assert payloads == expected, "10 frames, then the half frame alone, four times"
    assert [a.get_int("played_ms") for a in acks] == [210 * (k + 1) for k in range(4)]
    errors = [(a.t - call.packets[11 * k + 10].t) * 1000 for k, a in enumerate(acks)]
    report(
        f"MARK_PLAYED after a buffered half frame - its RTP ({fmt.value})",
        analysis.Summary.of(errors),
    )
    check_mark_timing(errors)


async def test_unaligned_messages_lose_no_byte(rig: Rig, fmt: ControlFormat) -> None:
    """1024-byte messages (what res_http_websocket reassembles) are not whole frames."""
    sent = audio.tagged_frames(0, 32)  # 5120 bytes = 5 messages of 1024
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks()  # without the mode each message's end is dropped
        for i in range(0, len(sent), 1024):
            await s.send_audio(sent[i : i + 1024])
        await s.command("MARK", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.1)
    assert analysis.delivered_bytes(call.packets) == sent


async def test_without_the_mode_a_message_end_is_dropped_as_upstream(rig: Rig) -> None:
    """An app that never opted in keeps upstream's contract: the partial frame at
    the end of a message that is neither buffered nor a piece of a fragmented
    one is dropped, and the next message starts a frame of its own (in the mode,
    test_unaligned_messages_lose_no_byte: it is kept)."""
    first = audio.tagged_frames(0, 10) + audio.tagged_frame(10, 50)
    second = audio.tagged_frames(20, 10)
    async with rig.call() as call:
        s = call.session
        await s.send_audio(first)
        await s.send_audio(second)
        await s.command("MARK_MEDIA", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.1)
    assert not s.named("ERROR")
    payloads = [p.payload for p in call.packets]
    assert payloads == analysis.split_frames(first)[:10] + analysis.split_frames(second)


@pytest.mark.parametrize("fragmented", [False, True], ids=["whole-messages", "fragmented"])
async def test_a_partial_frame_held_at_stop_buffering_does_not_shift_what_follows(
    rig: Rig, fragmented: bool
) -> None:
    """Without the mode: 10.5 frames buffered, STOP_MEDIA_BUFFERING, then 20
    frames sent while the 10 still play, one message a frame, or one message in
    two fragments of 1600 bytes (each handed over as a piece of its own). The
    half frame held at the stop goes out as a frame of its own, as upstream
    queues it, and every later frame whole (reviews found the half frame joined
    to the next message, or to its first piece, which then lost its last half
    frame, each message after it shifted)."""
    first = audio.tagged_frames(0, 10) + audio.tagged_frame(10, 80)
    later = audio.tagged_frames(20, 20)
    async with rig.call() as call:
        s = call.session
        await s.command("START_MEDIA_BUFFERING")
        await s.send_audio(first)
        await s.command("STOP_MEDIA_BUFFERING", "b")
        if fragmented:
            await s.connection.send([later[:1600], later[1600:]])
        else:
            for frame in analysis.split_frames(later):
                await s.send_audio(frame)
        await s.command("MARK_MEDIA", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.1)
    payloads = [p.payload for p in call.packets]
    assert payloads == analysis.split_frames(first) + analysis.split_frames(later)


async def test_full_queue_drop_is_reported(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks()  # an app that never opted in only gets XOFF, as upstream
        block = audio.tagged_frames(0, 50)
        for _ in range(22):  # 1100 frames: the last two messages overflow
            await s.send_audio(block)
        error = await s.wait_for("ERROR")
        await s.command("MARK", "after-drop")
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
    text = error.get_str("error_text")
    assert "queue full" in text.lower()
    # The limit holds within a message: the frames past it are dropped.
    dropped = [
        int(m.group(1))
        for e in s.named("ERROR")
        if (m := re.search(r"dropped (\d+) bytes", e.get_str("error_text")))
    ]
    assert dropped and all(0 < n <= len(block) for n in dropped), "says how many bytes"
    assert s.named("MEDIA_XOFF")
    total = flushed.get_int("played_ms") + flushed.get_int("discarded_ms")
    accepted = (22 * len(block) - sum(dropped)) // audio.BYTES_PER_MS
    assert accepted - 1 <= total <= accepted, "what was dropped is not counted, the rest is"


async def test_pause_holds_marks_until_continue(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("MARK", "held")
        await s.command("MARK", "held-too")
        await asyncio.sleep(0.4)
        assert not s.named("MARK_PLAYED")
        await s.command("CONTINUE_MEDIA")
        held = await s.wait_mark("held")
        await s.wait_mark("held-too")
        # A mark on an empty queue is also held while paused.
        await s.command("PAUSE_MEDIA")
        await s.command("MARK", "idle-paused")
        await asyncio.sleep(0.2)
        assert not s.named("MARK_PLAYED")[2:]
        await s.command("CONTINUE_MEDIA")
        await s.wait_mark("idle-paused")
    assert held.get_int("played_ms") == 100


async def test_passthrough_takes_marks_only_in_mark_positions_mode(
    rig: Rig, fmt: ControlFormat
) -> None:
    """Without the mode MARK_MEDIA is refused in passthrough mode, as upstream
    does; in the mode (here from the dial option with 'p') each message is a
    frame of its own, and a mark is answered when the message before it is
    handed to the core, with its position."""
    async with rig.call(control_format=fmt, options="p") as call:
        s = call.session
        await s.send_audio(audio.tagged_frame(0))
        await s.command("MARK_MEDIA", "refused")
        error = await s.wait_for("ERROR")
        await asyncio.sleep(0.1)
    assert "MARK_MEDIA not supported in passthrough mode" in error.get_str("error_text")
    assert not s.named("MEDIA_MARK_PROCESSED")

    sent = audio.tagged_frames(0, 12)
    marks: list[tuple[str, int]] = []
    async with rig.call(control_format=fmt, options="pm") as call:
        s = call.session
        assert s.media_start is not None and s.media_start.get_bool("mark_positions")
        for i in range(12):
            await s.send_audio(audio.tagged_frame(i))  # one frame per message
            if i % 3 == 2:
                marks.append((f"pt{i}", (i + 1) * FRAME))
                await s.command("MARK_MEDIA", f"pt{i}")
        await s.command("MARK", "req")
        await s.wait_mark("req")
        await asyncio.sleep(0.1)
    processed = s.named("MEDIA_MARK_PROCESSED")
    assert [e.mark_id for e in processed] == [m for m, _ in marks]
    assert [e.get_int("played_ms") for e in processed] == [n // 8 for _, n in marks]
    assert s.named("MARK_PLAYED")[0].get_int("played_ms") == 240
    assert [audio.frame_index(p.payload) for p in call.packets][:12] == list(range(12))
    timings = analysis.acked_mark_timings(sent, marks, processed, call.packets)
    errors = [t.error_ms for t in timings if t.error_ms is not None]
    assert len(errors) == len(marks), timings
    report(
        f"passthrough, mark positions mode: MEDIA_MARK_PROCESSED - RTP ({fmt.value})",
        analysis.Summary.of(errors),
    )
    check_mark_timing(errors)


async def test_mark_media_keeps_its_wire_format_and_its_timing(
    rig: Rig, fmt: ControlFormat
) -> None:
    """MEDIA_MARK_PROCESSED keeps upstream's timing, one tick after its frame:
    apps rely on it (upstream's testsuite counts the echo complete by then);
    MARK is the exact one."""
    sent = audio.tagged_frames(0, 10)
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.send_audio(sent)
        await s.command("MARK_MEDIA", "compat")
        compat = await s.wait_mark("compat")
        await s.command("MARK_MEDIA")
        bare = await s.wait_for("MEDIA_MARK_PROCESSED", after=compat.index)
        await s.command("START_MEDIA_BUFFERING")
        await s.send_audio(audio.tagged_frames(10, 2))
        await s.command("STOP_MEDIA_BUFFERING", "buf")
        done = await s.wait_for("MEDIA_BUFFERING_COMPLETED")
    assert compat.name == "MEDIA_MARK_PROCESSED"
    if fmt is ControlFormat.PLAIN:
        assert compat.raw == "MEDIA_MARK_PROCESSED compat"
        assert bare.raw == "MEDIA_MARK_PROCESSED"
        assert done.raw == "MEDIA_BUFFERING_COMPLETED buf"
    else:
        assert set(compat.fields) == {"channel_id", "correlation_id"}
        assert bare.get_str("correlation_id") == ""
        assert set(done.fields) == {"channel_id", "correlation_id"}
    times = analysis.departures(call.packets, analysis.split_frames(sent))
    error_ms = (compat.t - times[9]) * 1000  # type: ignore[operator]
    report(f"MEDIA_MARK_PROCESSED - RTP, patched ({fmt.value})", f"{error_ms:+.2f} ms")
    # Upstream: +20.1 to +21.6 ms (one ptime); loose bounds for a noisy machine.
    assert 10 < error_ms < 45


async def test_report_progress(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.command("REPORT_PROGRESS", 100)
        await s.send_audio(audio.tagged_frames(0, 50))  # 1 s
        await s.command("MARK", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.2)
        progress = s.named("MEDIA_PROGRESS")
        await s.command("REPORT_PROGRESS", 0)
        await s.send_audio(audio.tagged_frames(50, 10))
        await asyncio.sleep(0.4)
        after_off = s.named("MEDIA_PROGRESS")
    played = [e.get_int("played_ms") for e in progress]
    assert played == list(range(100, 1001, 100)), "every 100 ms of media, no drift"
    assert progress[-1].get_int("queued_ms") == 0
    assert all(e.get_int("pending_marks") >= 0 for e in progress)
    assert len(after_off) == len(progress), "0 turns it off"


async def test_status_and_the_probe_for_marks(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        supported = await s.probe_marks()
        probed = len(s.events) - 1
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, 10))
        await s.command("MARK", "x")
        await s.command("MARK", "y")
        await s.command("GET_STATUS")
        status = await s.wait_for("STATUS", after=probed)
        await s.command("CONTINUE_MEDIA")
        await s.wait_mark("y")
        await s.command("GET_STATUS")
        status2 = await s.wait_for("STATUS", after=status.index)
    assert supported is True
    assert "capabilities" not in s.media_start.fields  # type: ignore[union-attr]
    assert status.get_int("pending_marks") == 2
    assert status.get_int("played_ms") == 0
    assert status.get_int("queued_ms") == 200
    assert status.get_bool("media_paused") is True
    assert status2.get_int("pending_marks") == 0
    assert status2.get_int("played_ms") == 200
    assert status2.get_int("queued_ms") == 0


async def test_progress_every_ptime_and_a_last_report_when_dry(
    rig: Rig, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.command("REPORT_PROGRESS", 20)
        await s.send_audio(audio.tagged_frames(0, 25))
        await s.command("MARK", "end")
        await s.wait_mark("end")
        await s.command("REPORT_PROGRESS", 100)
        await s.send_audio(audio.tagged_frames(25, 3))  # 60 ms: the queue runs dry at 560
        await asyncio.sleep(0.3)
    played = [e.get_int("played_ms") for e in s.named("MEDIA_PROGRESS")]
    assert played[:25] == list(range(20, 501, 20)), "one per frame, none skipped"
    assert played[25:] == [560], "none due before 600, but one when the queue ran dry"


async def test_pending_marks_are_bounded_and_a_refusal_names_the_mark(
    rig: Rig, fmt: ControlFormat
) -> None:
    """In mark positions mode at most 1000 marks may be pending, of any kind:
    a mark past them is refused with an ERROR that names it, its only answer.
    STOP_MEDIA_BUFFERING is never refused (buffering stops either way) and is
    answered, even past the limit."""
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks()
        await s.command("PAUSE_MEDIA")
        await s.command("START_MEDIA_BUFFERING")
        await s.send_audio(audio.tagged_frames(0, 3))
        for i in range(999):
            await s.command("MARK_MEDIA", f"m{i}")
        await s.command("STOP_MEDIA_BUFFERING", "stop")
        await s.command("STOP_MEDIA_BUFFERING", "stop2")
        await s.command("MARK", "x")
        error = await s.wait_for("ERROR")
        after = len(s.events) - 1
        await s.command("GET_STATUS")
        status = await s.wait_for("STATUS", after=after)
        await s.command("CONTINUE_MEDIA")
        await s.wait_for("MEDIA_BUFFERING_COMPLETED", lambda e: e.mark_id == "stop2")
    assert "MARK 'x' ignored" in error.get_str("error_text")
    assert "1000 marks are already pending" in error.get_str("error_text")
    assert len(s.named("ERROR")) == 1
    assert status.get_int("pending_marks") == 1001
    completed = [e.mark_id for e in s.named("MEDIA_BUFFERING_COMPLETED")]
    assert completed == ["stop", "stop2"]
    processed = [e.get_str("correlation_id") for e in s.named("MEDIA_MARK_PROCESSED")]
    assert processed == [f"m{i}" for i in range(999)]
    assert not any(e.mark_id == "x" for e in s.events if e.name != "ERROR")


async def test_flush_plays_marks_that_only_a_pause_held(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 2))
        await s.command("MARK", "played")
        await s.wait_mark("played")
        await s.command("PAUSE_MEDIA")
        await s.command("MARK", "held")
        await s.send_audio(audio.tagged_frames(2, 5))
        await s.command("MARK", "unplayed")
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
    held = next(e for e in s.events if e.mark_id == "held")
    unplayed = next(e for e in s.events if e.mark_id == "unplayed")
    assert held.name == "MARK_PLAYED", "all its media had been handed over"
    assert held.get_int("played_ms") == 40
    assert unplayed.name == "MARK_CLEARED"
    assert held.index < unplayed.index < flushed.index
    assert flushed.get_int("discarded_ms") == 100
    assert flushed.get_int("cleared_marks") == 1


async def test_direction_in_keeps_a_pause_and_media_resumes_after_both(rig: Rig) -> None:
    async with rig.call(control_format=ControlFormat.JSON) as call:
        s = call.session
        await s.command("PAUSE_MEDIA")
        await s.command("SET_MEDIA_DIRECTION", "in")
        await s.command("SET_MEDIA_DIRECTION", "both")
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("MARK", "resumed")
        await asyncio.sleep(0.3)
        paused = s.named("MARK_PLAYED")
        await s.command("CONTINUE_MEDIA")
        mark = await s.wait_mark("resumed", timeout=3)
        await asyncio.sleep(0.1)
    assert paused == [], "still paused"
    assert mark.name == "MARK_PLAYED"
    assert [audio.frame_index(p.payload) for p in call.packets] == list(range(5))


async def test_flush_ends_a_pause_as_documented(rig: Rig) -> None:
    """An app that never sent MARK: no new events, but the pause ends (patch 2)."""
    async with rig.call() as call:
        s = call.session
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("FLUSH_MEDIA")
        await s.send_audio(audio.tagged_frames(5, 5))
        await s.command("MARK_MEDIA", "after-flush")
        mark = await s.wait_mark("after-flush", timeout=3)
        await asyncio.sleep(0.1)
    assert mark.name == "MEDIA_MARK_PROCESSED"
    assert [audio.frame_index(p.payload) for p in call.packets] == list(range(5, 10))
    assert s.event_names() == ["MEDIA_START", "MEDIA_MARK_PROCESSED"]


async def test_nothing_is_written_after_the_app_closed(rig: Rig) -> None:
    """Patch 3: no event is tried on a closed socket, so no error is logged."""
    if rig.asterisk is not None:
        log_path = rig.asterisk.messages_log
    else:
        assert rig.services is not None
        need(rig.services.logs is not None, "the services' messages.log (HARNESS_ASTERISK_LOGS)")
        log_path = rig.services.logs / "messages.log"  # type: ignore[operator]
    start = log_path.stat().st_size if log_path.exists() else 0
    async with rig.call() as call:
        s = call.session
        await s.command("MARK", "first")
        await s.send_audio(audio.tagged_frames(0, 50))
        for i in range(20):
            await s.command("MARK", f"m{i}")
        await s.command("REPORT_PROGRESS", 20)
        await s.close()
        await call.sip.wait_disconnected()
        await asyncio.sleep(0.2)
    with log_path.open(errors="replace") as f:
        f.seek(start)
        log = f.read()
    assert "Unable to send event" not in log


async def test_signed_linear_split_at_odd_bytes_keeps_positions_and_alignment(
    rig: Rig,
) -> None:
    """c(slin), sent a byte at a time and left to run dry in between, then whole frames.

    An odd byte is half a sample: it waits for its other half (never played
    alone, never shifting what follows), positions count whole samples and
    never exceed what was sent (no more underflow to 2^61 ms), and the mark
    after the last frame is answered when that frame is played.
    """
    ulaw = audio.tagged_frames(0, 10) + b"\x99\x99"  # the μ-law the caller must hear
    ulaw = ulaw.replace(b"\x7f", b"\xff")  # both code zero; Asterisk encodes 0 as 0xff
    slin = audio.ulaw_to_slin(ulaw)
    async with rig.call(codec="slin") as call:
        s = call.session
        assert await s.probe_marks()
        for piece in (slin[:1], slin[1:2], slin[2:3]):  # half, whole, half a sample
            await s.send_audio(piece)
            await asyncio.sleep(0.1)  # the queue runs dry: whole samples play
        await s.send_audio(slin[3:])
        await s.command("MARK", "end")
        mark = await s.wait_mark("end")
        await asyncio.sleep(0.1)
        after = len(s.events) - 1
        await s.command("GET_STATUS")
        status = await s.wait_for("STATUS", after=after)
    heard = b"".join(p.payload for p in call.packets)
    assert heard == ulaw, "every sample once, in order, none shifted by a byte"
    samples = len(slin) // 2
    assert mark.get_int("played_ms") == samples * 1000 // 8000
    assert mark.get_int("queued_ms") == 0
    assert status.get_int("played_ms") == samples * 1000 // 8000
    assert status.get_int("queued_ms") == 0
    last = max(call.packets, key=lambda p: p.t)
    error_ms = (mark.t - last.t) * 1000
    report("slin split at odd bytes: MARK_PLAYED - its RTP", f"{error_ms:+.2f} ms")
    assert abs(error_ms) < 15


async def test_stop_buffering_drops_a_fragment_and_says_so(rig: Rig) -> None:
    """An odd byte of signed linear left when the stream ends can never be played:
    STOP_MEDIA_BUFFERING drops it (an ERROR says so to an opted-in app), so the
    next prompt starts aligned instead of shifted by a byte."""
    first = audio.tagged_frames(0, 5).replace(b"\x7f", b"\xff")
    second = audio.tagged_frames(10, 5).replace(b"\x7f", b"\xff")

    async with rig.call(codec="slin") as call:
        s = call.session
        assert await s.probe_marks()
        await s.command("START_MEDIA_BUFFERING")
        await s.send_audio(audio.ulaw_to_slin(first) + b"\x01")
        await s.command("STOP_MEDIA_BUFFERING", "b1")
        error = await s.wait_for("ERROR")
        await s.wait_for("MEDIA_BUFFERING_COMPLETED")
        await s.send_audio(audio.ulaw_to_slin(second))
        await s.command("MARK", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.1)
    assert "STOP_MEDIA_BUFFERING: the last 1 bytes were dropped" in error.get_str("error_text")
    heard = b"".join(p.payload for p in call.packets)
    assert heard == first + second, "the second prompt is not shifted by the dropped byte"


# --- mark positions mode: MARK_MEDIA, exact --------------------------------------------

#: How a channel enters mark positions mode: the bot's command, or the dial
#: option (from the dialplan, or from ARI's transport_data).
OPT_INS = ("command", "dial-option")


@pytest.mark.parametrize("opt_in", OPT_INS)
async def test_mark_positions_mode_makes_mark_media_exact(
    rig: Rig, fmt: ControlFormat, opt_in: str
) -> None:
    """In mark positions mode MEDIA_MARK_PROCESSED goes out in the tick that
    hands the frame before it to the core, with the mark's sequence number and
    positions; the dial option says so in MEDIA_START, the command does not
    need to."""
    async with rig.call(control_format=fmt, options="m" if opt_in == "dial-option" else "") as call:
        s = call.session
        start = s.media_start
        assert start is not None
        if opt_in == "command":
            assert "mark_positions" not in start.fields
            await s.command("REPORT_MARK_POSITIONS")
        else:
            assert start.get_bool("mark_positions") is True
        sent, marks = await send_marked_chunks(s, 8, command="MARK_MEDIA")
        await s.wait_mark("c7", timeout=5)
    processed = s.named("MEDIA_MARK_PROCESSED")
    assert [e.mark_id for e in processed] == [f"c{k}" for k in range(8)]
    assert [e.get_int("seq") for e in processed] == list(range(1, 9))
    assert [e.get_int("played_ms") for e in processed] == [200 * (k + 1) for k in range(8)]
    assert processed[-1].get_int("queued_ms") == 0
    if fmt is ControlFormat.PLAIN:
        assert processed[0].raw.startswith("MEDIA_MARK_PROCESSED seq:1 played_ms:200 queued_ms:")
        assert processed[0].raw.endswith(" correlation_id:c0")
    else:
        assert set(processed[0].fields) == {
            "channel_id",
            "correlation_id",
            "seq",
            "played_ms",
            "queued_ms",
        }
    assert not s.named("MARK_PLAYED")
    timings = analysis.acked_mark_timings(sent, marks, processed, call.packets)
    errors = [t.error_ms for t in timings]
    assert None not in errors, f"every mark acknowledged and its frame seen: {timings}"
    exact = [e for e in errors if e is not None]
    report(
        f"MEDIA_MARK_PROCESSED - RTP, mark positions mode ({fmt.value}, {opt_in})",
        analysis.Summary.of(exact),
    )
    check_mark_timing(exact)


async def test_mark_positions_mode_clears_mark_media_with_its_own_event(
    rig: Rig, fmt: ControlFormat
) -> None:
    """A flush answers every pending MARK_MEDIA with MEDIA_MARK_CLEARED, which
    carries the mark's correlation_id as MEDIA_MARK_PROCESSED does, then
    MEDIA_FLUSHED; a MARK beside them keeps its own events."""
    async with rig.call(control_format=fmt, options="m") as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("MARK_MEDIA", "heard")
        await s.send_audio(audio.tagged_frames(5, 50))
        await s.command("MARK_MEDIA", "first words")
        await s.command("MARK", "req")
        await s.command("MARK_MEDIA")
        await s.wait_mark("heard")
        await asyncio.sleep(0.2)
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
    cleared = s.named("MEDIA_MARK_CLEARED")
    assert [e.mark_id for e in cleared] == ["first words", ""]
    assert [e.get_str("reason") for e in cleared] == ["flush", "flush"]
    assert [e.get_int("seq") for e in cleared] == [2, 4]
    assert [e.mark_id for e in s.named("MARK_CLEARED")] == ["req"]
    assert flushed.get_int("cleared_marks") == 3
    assert all(e.get_int("played_ms") == flushed.get_int("played_ms") for e in cleared)
    if fmt is ControlFormat.PLAIN:
        assert cleared[0].raw.endswith(" correlation_id:first words")
        assert cleared[1].raw.endswith(" correlation_id:")


async def test_without_the_mode_mark_media_and_media_start_are_upstreams(
    rig: Rig, fmt: ControlFormat
) -> None:
    """REPORT_PROGRESS asks for MEDIA_PROGRESS only: it does not turn the mode on."""
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.command("REPORT_PROGRESS", 100)
        await s.send_audio(audio.tagged_frames(0, 10))
        await s.command("MARK_MEDIA", "plain")
        done = await s.wait_mark("plain")
        await s.send_audio(audio.tagged_frames(10, 50))
        await s.command("MARK_MEDIA", "dropped")
        await s.command("FLUSH_MEDIA")
        await s.command("GET_STATUS")
        status = await s.wait_for("STATUS")
    assert "mark_positions" not in s.media_start.fields  # type: ignore[union-attr]
    assert done.name == "MEDIA_MARK_PROCESSED" and "played_ms" not in done.fields
    assert "pending_marks" not in status.fields
    assert not s.named("MEDIA_MARK_CLEARED", "MEDIA_FLUSHED", "MARK_CLEARED")
    assert s.named("MEDIA_PROGRESS"), "REPORT_PROGRESS still works on its own"


async def test_in_the_mode_a_mark_behind_stop_media_buffering_does_not_wait(
    rig: Rig, fmt: ControlFormat
) -> None:
    """In mark positions mode STOP_MEDIA_BUFFERING's mark is exact too (its
    event unchanged): a MARK_MEDIA right behind it is answered in the tick
    that hands the media over, not one ptime later."""
    errors: list[float] = []
    async with rig.call(control_format=fmt, options="m") as call:
        s = call.session
        sent = b""
        marks: list[tuple[str, int]] = []
        for k in range(4):
            await s.command("START_MEDIA_BUFFERING")
            chunk = audio.tagged_frames(k * 10, 10)
            await s.send_audio(chunk)
            sent += chunk
            await s.command("STOP_MEDIA_BUFFERING", f"buf{k}")
            await s.command("MARK_MEDIA", f"after{k}")
            marks.append((f"after{k}", len(sent)))
            await s.wait_mark(f"after{k}", timeout=5)
    completed = s.named("MEDIA_BUFFERING_COMPLETED")
    assert [e.mark_id for e in completed] == [f"buf{k}" for k in range(4)]
    assert "played_ms" not in completed[0].fields, "its event is unchanged"
    processed = s.named("MEDIA_MARK_PROCESSED")
    timings = analysis.acked_mark_timings(sent, marks, processed, call.packets)
    errors = [t.error_ms for t in timings if t.error_ms is not None]
    assert len(errors) == 4, timings
    report(
        f"MARK_MEDIA behind STOP_MEDIA_BUFFERING - RTP, in the mode ({fmt.value})",
        analysis.Summary.of(errors),
    )
    check_mark_timing(errors)
