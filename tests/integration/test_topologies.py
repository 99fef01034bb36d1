"""Marks in every topology voice bots use (:mod:`harness.topology`).

The bot's channel made by ``Dial`` or by an ARI app's externalMedia, with
Asterisk connecting out to the bot or the bot connecting in, in a two-party
bridge or a mixing one (softmix forced, or a silent third party present).
Each test runs in every topology and both control formats, against one
Asterisk per topology (its log since the test began is printed if it fails).

What must hold everywhere: every mark resolved exactly once and in order,
positions exact to the byte (every byte sent before a mark reaches the
caller's RTP, in order), flush and hangup clearing, partial frames, bad input.
Timing: in a two-party bridge MARK_PLAYED leaves with its frame's RTP; in a
mixing bridge the frame leaves at the mixer's next tick, up to one mixing
interval after MARK_PLAYED, so the bound is that interval earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import statistics
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from astmarks.pacer import Pacer
from astmarks.protocol import ControlFormat
from harness import analysis, audio, tts
from harness.caller import SipPhone
from harness.rig import LiveCall, Rig
from harness.topology import TOPOLOGIES, Creation, Topology
from tests.conftest import (
    SLACK_MS,
    check_cleared_by_hangup,
    check_mark_timing,
    failed,
    hang_up_with_marks_pending,
    report,
    send_marked_chunks,
)
from tests.integration.test_bad_input import expect_error
from tests.integration.test_strict_client import check_strictly, masked, upstream_session


@pytest.fixture(scope="module", params=list(TOPOLOGIES.values()), ids=str)
def topology(request: pytest.FixtureRequest) -> Topology:
    value: Topology = request.param
    return value


@contextlib.asynccontextmanager
async def shared_rig(
    install: Path, name: str, phone: SipPhone, factory: pytest.TempPathFactory
) -> AsyncIterator[Rig]:
    """One Asterisk with ARI for every test of a topology (a module's)."""
    async with Rig(install, factory.mktemp(name), phone=phone, ari=True, name=name) as r:
        yield r


@pytest.fixture(scope="module")
async def topology_rig(
    topology: Topology,
    install: Path,
    phone: SipPhone,
    capture_ok: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Rig]:
    """The patched build's."""
    async with shared_rig(install, f"asterisk-{topology}", phone, tmp_path_factory) as r:
        yield r


@pytest.fixture
def rig(request: pytest.FixtureRequest, topology_rig: Rig) -> Iterator[Rig]:
    """The topology's rig; what its Asterisk logged during a failed test is printed."""
    assert topology_rig.asterisk is not None
    offset = topology_rig.asterisk.log_offset()
    yield topology_rig
    if failed(request):
        text, _ = topology_rig.asterisk.log_since(offset)
        print(f"--- {topology_rig.name}: messages.log during the test ---\n{text}")  # noqa: T201


def stream_map(call: LiveCall, sent: bytes) -> analysis.StreamMap:
    """Where each byte of *sent* reached the caller; through a mixer, within
    what the mixer adds (the other parties' near silence)."""
    check_bridge(call, call.topology)
    stream = analysis.StreamMap(call.packets, sent, mixed=call.topology.mixes)
    if stream.total == 0:  # say what arrived instead
        heads = [f"{p.sequence}:{p.payload[:8].hex()}" for p in call.packets[:12]]
        print(f"no byte of the stream matched; first packets {heads}, stream {sent[:8].hex()}")  # noqa: T201
    return stream


def check_bridge(call: LiveCall, topology: Topology) -> None:
    """The bridge Asterisk chose is the one the topology is about."""
    if topology.creation is Creation.ARI:
        assert call.bridged is not None
        expected = "softmix" if topology.mixes else "simple_bridge"
        assert call.bridged.technology == expected, call.bridged
        media_start = call.session.media_start
        assert media_start is not None
        assert media_start.get_str("channel_id") == call.bridged.media_channel_id


def check_timing(errors_ms: list[float], topology: Topology, what: str) -> analysis.Summary:
    """MARK_PLAYED minus the RTP departure of the byte before the mark: about
    0 in a two-party bridge; in a mixing one up to one mixing interval earlier,
    up to four when the mixer's thread has fallen behind (a loaded machine)."""
    summary = analysis.Summary.of(errors_ms)
    report(f"{topology}: {what}", summary)
    check_mark_timing(errors_ms, topology.max_lag_ms)
    return summary


async def test_marks_resolve_once_in_order_at_exact_positions(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        sent, marks = await send_marked_chunks(s, 8)
        await s.wait_mark("c7", timeout=5)
        await asyncio.sleep(0.2)
    check_bridge(call, topology)
    resolved = s.named("MARK_PLAYED", "MARK_CLEARED", "MEDIA_MARK_PROCESSED")
    assert [e.name for e in resolved] == ["MARK_PLAYED"] * 8
    assert [e.mark_id for e in resolved] == [m for m, _ in marks], "each once, in order"
    assert [e.get_int("seq") for e in resolved] == list(range(1, 9))
    assert [e.get_int("played_ms") for e in resolved] == [200 * (k + 1) for k in range(8)]
    stream = stream_map(call, sent)
    assert (stream.total, stream.lost) == (len(sent), 0), "every byte reached RTP, in order"
    acks = [(e.mark_id or "", e.t) for e in resolved]
    result = analysis.mark_report(marks, acks, stream)
    assert len(result.errors_ms) == 8
    check_timing(result.errors_ms, topology, f"MARK_PLAYED - RTP, ms ({fmt.value})")


async def test_flush_clears_pending_marks_and_reports_what_was_played(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        sent, marks = await send_marked_chunks(s, 5)
        await asyncio.sleep(0.3)
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
        await asyncio.sleep(0.2 + topology.mixing_interval_ms / 1000)
    resolved = s.named("MARK_PLAYED", "MARK_CLEARED")
    assert [e.mark_id for e in resolved] == [m for m, _ in marks], "each once, in order"
    cleared = s.named("MARK_CLEARED")
    assert cleared, "a flush after 300 ms leaves marks pending"
    assert {e.get_str("reason") for e in cleared} == {"flush"}
    assert all(e.index < flushed.index for e in resolved)
    assert flushed.get_int("cleared_marks") == len(cleared)
    played_ms = flushed.get_int("played_ms")
    assert played_ms + flushed.get_int("discarded_ms") == audio.ms_of(len(sent))
    # What reached the caller is what the driver says it handed over: a
    # mixer sends what it had taken, so both are within a frame.
    stream = stream_map(call, sent)
    report(
        f"{topology}: flush, played_ms vs the caller's RTP ({fmt.value})",
        f"reported {played_ms} ms, RTP {audio.ms_of(stream.total):.0f} ms",
    )
    assert stream.lost == 0
    assert abs(audio.ms_of(stream.total) - played_ms) <= audio.FRAME_MS


async def test_caller_hangup_clears_pending_marks(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt, topology=topology) as call:
        await hang_up_with_marks_pending(call)
    check_bridge(call, topology)
    check_cleared_by_hangup(call.session)


async def test_bot_hangup_clears_pending_marks_and_ends_the_call(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 50))
        await s.command("MARK", "pending")
        await s.command("HANGUP")
        cleared = await s.wait_for("MARK_CLEARED")
        await s.wait_closed()
        await call.sip.wait_disconnected()
    check_bridge(call, topology)
    assert cleared.mark_id == "pending"
    assert cleared.get_str("reason") == "hangup"


async def test_partial_frame_is_played_to_the_byte_before_its_mark(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    """10 frames and 50 bytes, a mark, then (300 ms later) 5 more frames.

    In a two-party bridge the 50 bytes leave at once as a short packet. A
    mixer (softmix) mixes whole intervals only: the 50 bytes wait in it until
    the next audio comes, and go out first then (and the last 50 bytes of
    that audio wait in turn). The mark says when the driver handed them
    over, in both.
    """
    first = audio.tagged_frames(0, 10) + audio.tagged_frame(10, 50)
    more = audio.tagged_frames(11, 5)
    async with rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        assert await s.probe_marks()  # in the mode before the audio: its end is kept
        await s.send_audio(first)
        await s.command("MARK", "after-partial")
        mark = await s.wait_mark("after-partial")
        await asyncio.sleep(0.3)
        resumed = time.time()
        await s.send_audio(more)
        await s.command("MARK", "more")
        await s.wait_mark("more")
        await asyncio.sleep(0.1 + topology.mixing_interval_ms / 1000)
    assert mark.name == "MARK_PLAYED"
    assert mark.get_int("played_ms") == 206  # 1650 bytes = 206.25 ms
    sent = first + more
    stream = stream_map(call, sent)
    # A mixer keeps what does not fill an interval until more audio comes:
    # the last 50 bytes now.
    held = len(sent) % audio.FRAME_BYTES if topology.mixes else 0
    assert (stream.total, stream.lost) == (len(sent) - held, 0), "every byte, in order"
    partial = stream.departure(len(first) - 1)
    assert partial is not None
    report(
        f"{topology}: the partial frame's RTP after its MARK_PLAYED ({fmt.value})",
        f"{(partial - mark.t) * 1000:+.1f} ms",
    )
    if topology.mixes:
        assert partial > resumed, "softmix holds a partial interval until more audio comes"
        # Timed against the last whole frame instead, handed over one tick
        # (a frame) before the partial one.
        whole = [("whole", len(first) - 50)]
        result = analysis.mark_report(whole, [("whole", mark.t)], stream)
        errors = [e - audio.FRAME_MS for e in result.errors_ms]
    else:
        result = analysis.mark_report([("partial", len(first))], [("partial", mark.t)], stream)
        errors = result.errors_ms
    check_timing(errors, topology, f"MARK_PLAYED after a partial frame ({fmt.value})")


async def test_unaligned_messages_lose_no_byte(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    """Messages of odd sizes, a mark after each: positions to the byte."""
    sent = audio.tagged_frames(0, 30)  # 4800 bytes in messages of 1 to 997 bytes
    sizes = [997, 1, 333, 160, 159, 1024, 777, 349, 1000]
    marks: list[tuple[str, int]] = []
    async with rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        assert await s.probe_marks()  # without the mode each message's end is dropped
        offset = 0
        for k, size in enumerate(sizes):
            await s.send_audio(sent[offset : offset + size])
            offset += size
            marks.append((f"u{k}", offset))
            await s.command("MARK", f"u{k}")
        assert offset == len(sent)
        await s.wait_mark(f"u{len(sizes) - 1}")
        await asyncio.sleep(0.1 + topology.mixing_interval_ms / 1000)
    played = s.named("MARK_PLAYED")
    assert [e.mark_id for e in played] == [m for m, _ in marks]
    assert [e.get_int("played_ms") for e in played] == [n // 8 for _, n in marks]
    stream = stream_map(call, sent)
    assert (stream.total, stream.lost) == (len(sent), 0)


async def test_bad_input_gets_an_error_and_the_call_goes_on(
    rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    bad = (
        ("MARK two words", "visible ASCII")
        if fmt is ControlFormat.PLAIN
        else ('{"command":"MARK"}', "id is required")
    )
    async with rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 5))
        await expect_error(s, *bad)
        await s.command("MARK", "after-error")
        played = await s.wait_mark("after-error")
        await s.send_audio(audio.tagged_frames(5, 5))
        await s.command("MARK", "again")
        again = await s.wait_mark("again")
    check_bridge(call, topology)
    assert (played.get_int("played_ms"), again.get_int("played_ms")) == (100, 200)
    assert not s.named("MARK_CLEARED")


async def test_the_pacer_keeps_the_caller_fed_and_knows_what_was_heard(
    rig: Rig, topology: Topology
) -> None:
    """The pacing client paces by positions, so it works in every topology: a
    streamed response with no gap, a barge-in after 1.5 s, and what the caller
    heard (MEDIA_FLUSHED) against the caller's RTP."""
    profile = tts.TtsProfile(ttfb=0.05, seed=11)
    async with rig.call(topology=topology) as call:
        pacer = Pacer(call.session)
        task = asyncio.create_task(pacer.play(tts.stream(3000, profile)))
        await asyncio.sleep(1.5)
        pacer.barge_in()
        result = await task
        await asyncio.sleep(0.2 + topology.mixing_interval_ms / 1000)
    assert not result.fallback and result.interrupted and result.heard_ms is not None
    sent = b"".join(d for d, _ in tts.plan(3000, profile))
    stream = stream_map(call, sent)
    on_rtp = audio.ms_of(stream.total)
    report(
        f"{topology}: pacer barge-in, heard_ms vs the caller's RTP",
        f"{result.heard_ms:.0f} ms vs {on_rtp:.0f} ms; {len(stream.gaps())} gaps",
    )
    assert stream.lost == 0
    # A mixer still sends what it had taken, less a partial interval it holds.
    assert abs(result.heard_ms - on_rtp) <= audio.FRAME_MS + topology.mixing_interval_ms
    assert 1000 < on_rtp <= 1600, "the barge-in acts at once"
    missed = sum(n for _, n, _ in stream.gaps())
    assert missed <= 2, f"paced by marks, the caller's audio has no gap: {stream.gaps()}"


@pytest.mark.parametrize(
    "topology", [t for t in TOPOLOGIES.values() if t.mixes], ids=str, indirect=True
)
async def test_in_a_mixing_bridge_the_lead_is_fixed_in_a_call_and_varies_between_calls(
    rig: Rig, topology: Topology
) -> None:
    """Eight calls of eight marks: MARK_PLAYED before the RTP of its byte by
    the phase of the channel's timer against the mixer's, steady through a
    call, anywhere within one mixing interval from call to call; more in a
    call whose mixer fell behind (seen under AddressSanitizer: 26 ms), never
    more than the four intervals softmix queues."""
    medians, spreads = [], []
    for _ in range(8):
        async with rig.call(topology=topology) as call:
            sent, marks = await send_marked_chunks(call.session, 8, frames=5)
            await call.session.wait_mark("c7")
            await asyncio.sleep(0.1 + topology.mixing_interval_ms / 1000)
        played = [(e.mark_id or "", e.t) for e in call.session.named("MARK_PLAYED")]
        errors = analysis.mark_report(marks, played, stream_map(call, sent)).errors_ms
        assert len(errors) == 8
        medians.append(statistics.median(errors))
        spreads.append(statistics.quantiles(errors, n=4)[2] - statistics.quantiles(errors, n=4)[0])
    report(
        f"{topology}: MARK_PLAYED - RTP per call, ms (8 calls)",
        f"medians {min(medians):+.1f} to {max(medians):+.1f}, "
        f"interquartile spread in a call at most {max(spreads):.1f}",
    )
    usual = [m for m in medians if -(topology.mixing_interval_ms + SLACK_MS) < m < SLACK_MS]
    assert len(usual) >= 0.75 * len(medians), medians
    assert all(-(topology.max_lag_ms + SLACK_MS) < m < SLACK_MS for m in medians), medians
    assert sorted(spreads)[len(spreads) // 2] < 3.0, spreads


@pytest.mark.parametrize(
    "topology",
    [t for t in TOPOLOGIES.values() if t.creation is Creation.ARI],
    ids=str,
    indirect=True,
)
async def test_audio_sent_before_the_app_bridges_the_channel_is_not_heard(
    rig: Rig, topology: Topology
) -> None:
    """MEDIA_START comes when the WebSocket connects; an ARI app adds the
    channel to its bridge after that (Dial bridges it as it answers). An app
    that takes 300 ms: what the bot sends at once is handed over, and
    reported played, with nowhere to go."""
    slow = dataclasses.replace(topology.plan(), bridge_delay=0.3)
    early = audio.tagged_frames(0, 5)
    assert rig.app is not None
    async with rig.call(topology=topology, plan=slow, capture=False, wait_for_bridge=False) as call:
        s = call.session
        await s.send_audio(early)
        await s.command("MARK", "early")
        mark = await s.wait_mark("early")
        bridged = await rig.app.wait_bridged(call.tag)
    assert rig.ari is not None
    _, entered = await rig.ari.wait_event(
        "ChannelEnteredBridge", channel_id=bridged.media_channel_id
    )
    stamp = entered["timestamp"]
    entered_t = datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    media_start = s.media_start
    assert media_start is not None
    report(
        f"{topology}: an app 300 ms slow to bridge",
        f"MARK_PLAYED for 100 ms sent at MEDIA_START +{(mark.t - media_start.t) * 1000:.0f} ms,"
        f" the channel in the bridge +{(entered_t - media_start.t) * 1000:.0f} ms",
    )
    assert mark.name == "MARK_PLAYED" and mark.get_int("played_ms") == 100
    assert mark.t < entered_t, "handed over before the channel was in the bridge"


@pytest.fixture(scope="module")
async def upstream_topology_rig(
    topology: Topology,
    upstream_install: Path,
    phone: SipPhone,
    capture_ok: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Rig]:
    """The unpatched build's."""
    async with shared_rig(upstream_install, f"upstream-{topology}", phone, tmp_path_factory) as r:
        yield r


async def test_an_app_without_marks_sees_exactly_what_upstream_sends(
    rig: Rig, upstream_topology_rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    """The strict client's session (test_strict_client) in this topology, on
    the patched and the unpatched build: the same messages."""
    texts = []
    for r in (rig, upstream_topology_rig):
        async with r.call(control_format=fmt, topology=topology, capture=False) as call:
            sent_ids = await upstream_session(call.session, fmt)
        check_strictly(call.session.texts, fmt, sent_ids)
        texts.append(masked(call.session.texts, fmt))
    assert texts[0] == texts[1]


async def test_upstream_mark_media_timing(
    upstream_topology_rig: Rig, topology: Topology, fmt: ControlFormat
) -> None:
    """What a bot gets without the series, for the table: MEDIA_MARK_PROCESSED
    comes at the start of the tick after the frame's (about one frame after its
    RTP in a two-party bridge, earlier by the mixer's delay in a mixing one)."""
    sent = b""
    marks: list[tuple[str, int]] = []
    async with upstream_topology_rig.call(control_format=fmt, topology=topology) as call:
        s = call.session
        for k in range(8):
            chunk = audio.tagged_frames(k * 10, 10)
            await s.send_audio(chunk)
            sent += chunk
            marks.append((f"c{k}", len(sent)))
            await s.command("MARK_MEDIA", f"c{k}")
        await s.wait_mark("c7", timeout=5)
        await asyncio.sleep(0.2)
    processed = s.named("MEDIA_MARK_PROCESSED")
    assert [e.mark_id for e in processed] == [m for m, _ in marks]
    stream = stream_map(call, sent)
    acks = [(e.mark_id or "", e.t) for e in processed]
    result = analysis.mark_report(marks, acks, stream)
    assert len(result.errors_ms) == 8
    summary = analysis.Summary.of(result.errors_ms)
    report(f"{topology}: upstream MEDIA_MARK_PROCESSED - RTP, ms ({fmt.value})", summary)
    low = audio.FRAME_MS - topology.mixing_interval_ms - 10
    assert low < summary.median < audio.FRAME_MS + 25, summary
