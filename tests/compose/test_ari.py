"""The topology most voice-bot apps use, on the compose network: an ARI app
answers the SIP call, creates a bridge, creates the WebSocket channel with
``POST /channels/externalMedia?transport=websocket`` and bridges the two. Marks
are timed against the RTP the caller's phone receives.
"""

from __future__ import annotations

from astmarks.protocol import ControlFormat
from harness import analysis
from harness.ari import Ari, ExternalMediaApp
from harness.config import ARI_EXTENSION
from harness.rig import Rig
from harness.timing import units
from tests.conftest import report, send_marked_chunks


async def test_marks_through_an_ari_external_media_channel(rig: Rig, ari: Ari) -> None:
    # The externalMedia channel dials the websocket_client connection that
    # points at this rig's bot (the one its extension uses too).
    async with ExternalMediaApp(ari, connection=rig.extension) as app:
        async with rig.call(control_format=ControlFormat.JSON, extension=ARI_EXTENSION) as call:
            s = call.session
            sent, marks = await send_marked_chunks(s, 8)
            await s.wait_mark("c7", timeout=units(5))
        assert not app.errors, app.errors
        bridged = app.calls[next(iter(app.calls))]
    assert s.media_start is not None
    assert s.media_start.get_str("channel_id") == bridged.media_channel_id
    played = s.named("MARK_PLAYED")
    assert [e.get_int("played_ms") for e in played] == [200 * (k + 1) for k in range(8)]
    timings = analysis.acked_mark_timings(sent, marks, played, call.packets)
    errors = [t.error_ms for t in timings]
    assert None not in errors, f"every mark acknowledged and its frame seen: {timings}"
    summary = analysis.Summary.of([e for e in errors if e is not None])
    report(f"ARI externalMedia, {bridged.technology} bridge: MARK_PLAYED - RTP (ms)", summary)
    # Two parties: Asterisk picks the simple bridge, and the ack leaves with
    # its frame. Loose bound: the machine is shared.
    assert bridged.technology == "simple_bridge"
    assert abs(summary.median) < 5.0, summary
