"""Real calls: pjsua2 -> PJSIP -> Dial(WebSocket) -> bot, RTP captured on loopback."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from pathlib import Path

import pytest

from astmarks.protocol import ControlFormat
from harness import analysis, audio
from harness.caller import SipCall, SipPhone
from harness.rig import Rig
from tests.conftest import report

FORMATS = [ControlFormat.PLAIN, ControlFormat.JSON]


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
async def test_bot_audio_reaches_the_caller_byte_for_byte(rig: Rig, fmt: ControlFormat) -> None:
    n = 60
    sent = audio.tagged_frames(0, n)
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert s.format is fmt
        # Uneven message sizes, all whole frames: chan_websocket re-frames them.
        for piece in (sent[: 160 * 7], sent[160 * 7 : 160 * 40], sent[160 * 40 :]):
            await s.send_audio(piece)
        await asyncio.sleep(n * 0.02 + 0.3)
        assert isinstance(call.sip, SipCall)
        stats = await call.sip.stats()
    packets = call.packets
    indices = [audio.frame_index(p.payload) for p in packets]
    assert indices == list(range(n)), "every frame once, in order, unchanged"
    assert {p.payload_type for p in packets} == {0}  # PCMU: no transcoding
    seqs = [p.sequence for p in packets]
    assert all((b - a) % 65536 == 1 for a, b in itertools.pairwise(seqs))
    gaps = [(b.t - a.t) * 1000 for a, b in itertools.pairwise(packets)]
    assert 15 < statistics.median(gaps) < 25, "paced at one frame per 20 ms"
    assert stats.rx_packets >= n, "the SIP caller received the RTP"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
async def test_media_start_and_event_times(rig: Rig, fmt: ControlFormat) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        start = s.media_start
        assert start is not None
        assert start.get_str("format") == "ulaw"
        assert start.get_int("optimal_frame_size") == 160
        assert start.get_int("ptime") == 20
        assert start.get_str("connection_id") == rig.extension
        assert s.tag == call.tag
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("MARK_MEDIA", "m1")
        await s.command("GET_STATUS")
        status = await s.wait_for("STATUS")
        mark = await s.wait_for("MEDIA_MARK_PROCESSED")
        assert mark.mark_id == "m1"
        assert status.get_int("queue_length") >= 0
        assert call.started <= mark.t
        assert [e.index for e in s.events] == list(range(len(s.events)))
        assert all(a.mono <= b.mono for a, b in zip(s.events, s.events[1:], strict=False))


async def test_bot_receives_the_callers_audio(rig: Rig) -> None:
    async with rig.call() as call:
        # The caller's first packets may take a moment on a loaded machine.
        for _ in range(60):
            if len(call.session.audio_in) >= 10:
                break
            await asyncio.sleep(0.05)
        received = list(call.session.audio_in)
    assert len(received) >= 10
    assert {len(r.data) for r in received} == {160}


async def test_caller_hangup_closes_the_websocket(rig: Rig) -> None:
    async with rig.call() as call:
        await call.sip.hangup()
        await call.sip.wait_disconnected()
        await call.session.wait_closed()
    assert call.session.closed.is_set()


async def test_bot_hangup_ends_the_sip_call(rig: Rig) -> None:
    async with rig.call() as call:
        await call.session.command("HANGUP")
        await call.sip.wait_disconnected()
        await call.session.wait_closed()
    assert call.sip.record.state == "DISCONNECTED"


async def test_upstream_build_is_one_ptime_late_and_silent_on_flush(
    upstream_install: Path, phone: SipPhone, capture_ok: None, tmp_path: Path
) -> None:
    """The baseline the patch is measured against, on the unpatched build."""
    sent = audio.tagged_frames(0, 40)
    marks = [(f"u{k}", (k + 1) * 1600) for k in range(4)]
    rig = Rig(upstream_install, tmp_path, phone=phone, name="upstream")
    async with rig, rig.call() as call:
        s = call.session
        assert s.media_start is not None
        assert "capabilities" not in s.media_start.fields
        for k, (mark, _) in enumerate(marks):
            await s.send_audio(sent[k * 1600 : (k + 1) * 1600])
            await s.command("MARK_MEDIA", mark)
        await s.wait_mark("u3")
        await s.send_audio(audio.tagged_frames(40, 20))
        await s.command("MARK_MEDIA", "flushed")
        await s.command("FLUSH_MEDIA")
        await asyncio.sleep(0.3)
    assert [audio.frame_index(p.payload) for p in call.packets][:40] == list(range(40))
    times = analysis.departures(call.packets, analysis.split_frames(sent))
    acks = {e.mark_id: e.t for e in s.named("MEDIA_MARK_PROCESSED") if e.mark_id}
    errors = [t.error_ms for t in analysis.mark_timings(marks, acks, times)]
    assert None not in errors
    summary = analysis.Summary.of([e for e in errors if e is not None])
    report("MEDIA_MARK_PROCESSED - RTP, the upstream build", summary)
    assert summary.median > 10, "upstream acknowledges one ptime (20 ms) late"
    assert "flushed" not in acks and not s.named("MARK_CLEARED", "MEDIA_FLUSHED"), (
        "upstream drops a flushed mark silently"
    )
