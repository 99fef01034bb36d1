"""Frame matching and mark timing on synthetic packet lists."""

from __future__ import annotations

import array
import math

import pytest

from harness import analysis, audio
from harness.capture import RtpPacket


def pkt(t: float, payload: bytes, seq: int = 0) -> RtpPacket:
    return RtpPacket(
        t=t,
        src=("127.0.0.1", 1),
        dst=("127.0.0.1", 2),
        sequence=seq,
        timestamp=seq * 160,
        ssrc=1,
        payload_type=0,
        marker=False,
        payload=payload,
    )


def test_departures_in_order_with_a_missing_frame_and_noise() -> None:
    frames = [audio.tagged_frame(i) for i in range(5)]
    packets = [
        pkt(1.0, frames[0]),
        pkt(1.02, b"\xff" * 160),
        pkt(1.04, frames[1]),
        pkt(1.08, frames[3]),
        pkt(1.10, frames[4]),
    ]
    assert analysis.departures(packets, frames) == [1.0, 1.04, None, 1.08, 1.10]


def test_split_frames_keeps_the_remainder() -> None:
    assert [len(f) for f in analysis.split_frames(b"z" * 350)] == [160, 160, 30]


def test_mark_timings() -> None:
    times: list[float | None] = [1.0, 1.02, 1.04]
    marks = [("a", 160), ("b", 480), ("c", 330), ("late", 800)]
    acks = {"a": 1.0005, "b": 1.0401}
    result = {m.mark_id: m for m in analysis.mark_timings(marks, acks, times)}
    assert result["a"].frame == 0
    assert result["a"].error_ms is not None and math.isclose(result["a"].error_ms, 0.5)
    assert result["b"].frame == 2
    assert result["c"].frame == 2 and result["c"].error_ms is None
    assert result["late"].rtp_t is None


def test_summary() -> None:
    s = analysis.Summary.of([float(v) for v in range(1, 101)])
    assert (s.n, s.median, s.p95, s.p99, s.max, s.min) == (100, 50.5, 95, 99, 100, 1)
    assert analysis.Summary.of([]).n == 0
    assert "median" in str(s)


def test_stream_map_aligns_padding_and_lost_bytes() -> None:
    sent = audio.tagged_frames(0, 4)[:600]  # 3 frames + 120 bytes
    padded = sent[480:600] + b"\xff" * 40
    packets = [
        pkt(1.00, sent[0:160], 1),
        pkt(1.02, sent[160:320], 2),
        pkt(1.04, sent[320:480], 3),
        pkt(1.06, padded, 4),
    ]
    m = analysis.StreamMap(packets, sent)
    assert m.total == 600
    assert m.padding == 40
    assert m.lost == 0
    assert m.departure(0) == 1.00 and m.departure(479) == 1.04 and m.departure(599) == 1.06
    assert m.departure(600) is None
    # Upstream drops a partial frame: the map finds the next payload further on.
    dropped = [pkt(1.0, sent[0:160], 1), pkt(1.02, sent[200:360], 2)]
    m = analysis.StreamMap(dropped, sent)
    assert m.lost == 40
    assert m.departure(200) == 1.02


def test_played_by_is_continuous_within_a_packet_and_waits_in_a_gap() -> None:
    sent = audio.tagged_frames(0, 3)
    packets = [pkt(1.0, sent[0:160]), pkt(1.02, sent[160:320]), pkt(1.1, sent[320:480])]
    m = analysis.StreamMap(packets, sent)
    assert m.played_by(0.99) == 0
    assert m.played_by(1.005) == pytest.approx(40)  # a quarter of the first packet
    assert m.played_by(1.03) == pytest.approx(240)
    assert m.played_by(1.06) == 320  # the second has played out; nothing until 1.1
    assert m.played_by(1.2) == 480


def test_stream_map_gaps() -> None:
    sent = audio.tagged_frames(0, 4)
    packets = [pkt(1.0, sent[0:160]), pkt(1.02, sent[160:320]), pkt(1.1, sent[320:480])]
    assert analysis.StreamMap(packets, sent).gaps() == [(1.02, 3, 320)]


def test_mark_report_counts_lost_duplicated_and_out_of_order() -> None:
    sent = audio.tagged_frames(0, 3)
    stream = analysis.StreamMap(
        [pkt(1.0, sent[:160]), pkt(1.02, sent[160:320]), pkt(1.04, sent[320:])], sent
    )
    marks = [("a", 160), ("b", 320), ("c", 480), ("d", 480)]
    acks = [("a", 1.0001), ("c", 1.0402), ("b", 1.0203), ("b", 1.03)]
    report = analysis.mark_report(marks, acks, stream)
    assert (report.marks, report.acked, report.lost) == (4, 3, 1)
    assert report.duplicated == 1
    assert report.out_of_order == 1
    assert [round(e, 2) for e in report.errors_ms] == [0.1, 0.3, 0.2]


def test_stream_map_tells_padding_from_silence_in_the_stream() -> None:
    # Speech with silence (0xFF) right after a partial frame that was padded.
    sent = bytes(range(1, 121)) + b"\xff" * 100 + bytes(range(121, 241))
    padded = sent[:120] + b"\xff" * 40  # taken at first as 160 stream bytes
    packets = [pkt(1.0, padded, 1), pkt(1.5, sent[120:280], 2), pkt(1.52, sent[280:], 3)]
    m = analysis.StreamMap(packets, sent)
    assert (m.lost, m.unmatched) == (0, 0)
    assert m.padding == 40
    assert m.total == len(sent)
    assert m.departure(125) == 1.5


def test_stream_map_follows_upstreams_dropped_remainders() -> None:
    """Upstream drops each message's bytes past its last whole frame."""
    from harness import tts

    plan = tts.plan(6000, tts.TtsProfile(seed=7))
    sent = b"".join(d for d, _ in plan)
    packets: list[RtpPacket] = []
    t = 1.0
    for data, _ in plan:
        for i in range(0, len(data) // 160 * 160, 160):
            packets.append(pkt(t, data[i : i + 160], len(packets)))
            t += 0.02
    m = analysis.StreamMap(packets, sent)
    assert m.unmatched == 0
    assert m.lost == sum(len(d) % 160 for d, _ in plan[:-1])
    assert m.total == len(sent) - len(plan[-1][0]) % 160


def test_stream_map_takes_silence_before_the_stream_as_a_mixers_padding() -> None:
    """A mixer's tick that began before the stream: silence, then the stream."""
    sent = audio.tagged_frames(0, 3)
    silence = b"\xff" * 160
    packets = [
        pkt(0.98, silence, 1),
        pkt(1.00, b"\xff" * 60 + sent[0:100], 2),
        pkt(1.02, sent[100:260], 3),
        pkt(1.04, sent[260:420], 4),
        pkt(1.06, sent[420:480] + b"\xff" * 100, 5),
    ]
    m = analysis.StreamMap(packets, sent, mixed=True)
    assert (m.total, m.lost) == (480, 0)
    assert m.padding == 160 + 60 + 100, "a packet of silence, 60 bytes before, 100 after"
    assert m.departure(0) == m.departure(99) == 1.00
    assert m.departure(100) == 1.02 and m.departure(479) == 1.06


def test_ulaw_linear_is_g711() -> None:
    assert audio.ULAW_LINEAR[0xFF] == audio.ULAW_LINEAR[0x7F] == 0
    assert audio.ULAW_LINEAR[0x80] == 32124 and audio.ULAW_LINEAR[0x00] == -32124
    assert audio.ULAW_LINEAR[0xFE] == 8 and audio.ULAW_LINEAR[0x7E] == -8
    slin = audio.ulaw_to_slin(bytes(range(256)))
    assert list(audio.ULAW_LINEAR) == list(array.array("h", slin)), "as audioop decodes"


def test_stream_map_of_a_mixed_stream_allows_what_a_mixer_adds() -> None:
    """A mixer decodes, adds the others' near silence, and encodes again."""
    sent = audio.tagged_frames(0, 3)

    def mixed(data: bytes) -> bytes:
        # -0 becomes +0, and a code one step away here and there.
        out = bytearray(data.replace(b"\x7f", b"\xff"))
        for k in range(5, len(out), 37):
            out[k] = out[k] + 1 if out[k] not in (0x7F, 0xFF) else out[k]
        return bytes(out)

    packets = [pkt(1.0, mixed(sent[0:160]), 1), pkt(1.02, mixed(sent[160:320]), 2)]
    packets.append(pkt(1.04, mixed(sent[320:480]), 3))
    assert analysis.StreamMap(packets, sent).total < 480, "not byte-exact"
    m = analysis.StreamMap(packets, sent, mixed=True)
    assert (m.total, m.lost, m.unmatched) == (480, 0, 0)
    assert m.departure(479) == 1.04
    # Someone else's speech is not the bot's.
    loud = pkt(1.06, bytes([0x80]) * 160, 4)
    assert analysis.StreamMap([*packets, loud], sent, mixed=True).unmatched == 1
