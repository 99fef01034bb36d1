"""From captures and events to facts: which frame left when, how late each mark was.

The bot knows what it sent; the capture knows what left Asterisk for the
caller and when (kernel timestamps). Frames are matched by content, in order:
the channel is ulaw end to end, so a frame's payload is unchanged on RTP.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from harness.audio import FRAME_BYTES, ULAW_SILENCE
from harness.capture import RtpPacket
from harness.events import Event

#: How many frames ahead to look for a match when a frame is missing.
LOOKAHEAD = 50


def split_frames(sent: bytes, frame_bytes: int = FRAME_BYTES) -> list[bytes]:
    """The frames chan_websocket makes of *sent* (the last may be short)."""
    return [sent[i : i + frame_bytes] for i in range(0, len(sent), frame_bytes)]


def departures(packets: Sequence[RtpPacket], frames: Sequence[bytes]) -> list[float | None]:
    """The RTP departure time of each frame in *frames*, or None if never seen.

    Packets are taken in capture order; each is matched against the next
    expected frame, or, if a frame went missing, one of the next few.
    """
    times: list[float | None] = [None] * len(frames)
    i = 0
    for pkt in sorted(packets, key=lambda p: p.t):
        if i >= len(frames):
            break
        for j in range(i, min(i + LOOKAHEAD, len(frames))):
            if pkt.payload == frames[j]:
                times[j] = pkt.t
                i = j + 1
                break
    return times


def delivered_bytes(packets: Sequence[RtpPacket]) -> bytes:
    """Every payload byte in sequence-number order (one SSRC assumed)."""
    ordered = sorted(packets, key=lambda p: (p.t, p.sequence))
    return b"".join(p.payload for p in ordered)


@dataclass(frozen=True)
class Summary:
    """n, median, p95, p99 and max of a list of values (ms)."""

    n: int
    median: float
    p95: float
    p99: float
    max: float
    min: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan)
        ordered = sorted(values)
        return cls(
            n=len(ordered),
            median=statistics.median(ordered),
            p95=percentile(ordered, 95),
            p99=percentile(ordered, 99),
            max=ordered[-1],
            min=ordered[0],
        )

    def __str__(self) -> str:
        if self.n == 0:
            return "n=0"
        return (
            f"n={self.n} median={self.median:+.2f} p95={self.p95:+.2f} "
            f"p99={self.p99:+.2f} min={self.min:+.2f} max={self.max:+.2f} ms"
        )


def percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class MarkTiming:
    """One mark: its id, the frame before it, and how its ack compares to RTP."""

    mark_id: str
    frame: int  # index of the last frame before the mark
    ack_t: float | None
    rtp_t: float | None

    @property
    def error_ms(self) -> float | None:
        """Ack arrival minus RTP departure of the frame before the mark, in ms."""
        if self.ack_t is None or self.rtp_t is None:
            return None
        return (self.ack_t - self.rtp_t) * 1000.0


def mark_timings(
    marks: Sequence[tuple[str, int]],
    acks: dict[str, float],
    frame_times: Sequence[float | None],
    frame_bytes: int = FRAME_BYTES,
) -> list[MarkTiming]:
    """Pair each mark (id, bytes sent before it) with its ack and its frame's departure."""
    result = []
    for mark_id, offset in marks:
        frame = math.ceil(offset / frame_bytes) - 1
        rtp_t = frame_times[frame] if 0 <= frame < len(frame_times) else None
        result.append(MarkTiming(mark_id, frame, acks.get(mark_id), rtp_t))
    return result


def acked_mark_timings(
    sent: bytes,
    marks: Sequence[tuple[str, int]],
    events: Sequence[Event],
    packets: Sequence[RtpPacket],
) -> list[MarkTiming]:
    """Each mark's acknowledgment (its event in *events*) against the RTP
    departure of the last frame of *sent* before it."""
    times = departures(packets, split_frames(sent))
    acks = {e.mark_id: e.t for e in events if e.mark_id is not None}
    return mark_timings(marks, acks, times)


class StreamMap:
    """Which RTP packet carried which bytes of the bot's audio stream.

    chan_websocket re-frames the bot's stream, and when its queue runs dry
    sends a partial frame padded with silence, so frame boundaries move;
    byte offsets do not. Each payload is aligned with *sent* (the stream
    the bot sent, from offset 0): the bytes that match are the bot's, a
    tail of μ-law silence after them is padding, and so is silence before
    them where a mixer's tick began before the stream did. In a mixing
    bridge pass the stream as the caller gets it (:func:`audio.through_slin`).
    """

    def __init__(self, packets: Sequence[RtpPacket], sent: bytes) -> None:
        ordered = sorted(packets, key=lambda p: (p.t, p.sequence))
        self.starts: list[int] = []
        self.times: list[float] = []
        self.padding = 0
        self.unmatched = 0
        self.lost = 0
        offset = 0
        # Silence in the stream looks like padding: how many of the bytes last
        # taken as the stream's might have been padding instead.
        ambiguous = 0
        for p in ordered:
            n = _common_prefix(p.payload, sent, offset)
            lead = 0
            if n == 0 and (lead := _leading_silence(p.payload, sent, offset)):
                # Padding, then the stream: a mixer's tick that began before
                # the stream did (or resumed).
                self.padding += lead
                self.starts.append(offset)
                self.times.append(p.t)
                n = _common_prefix(p.payload[lead:], sent, offset)
                offset += n
                self.padding += len(p.payload) - lead - n
                ambiguous = 0
                continue
            if not _is_stream_then_padding(p.payload, n):
                # Step back over silence taken for stream bytes, or skip bytes
                # that never reached RTP (upstream drops partial frames).
                found, n = _resync(p.payload, sent, offset - ambiguous)
                if found < 0:
                    self.unmatched += 1
                    continue
                if found < offset:
                    self.padding += offset - found
                else:
                    self.lost += found - offset
                offset = found
            self.padding += len(p.payload) - n
            self.starts.append(offset)
            self.times.append(p.t)
            offset += n
            tail = p.payload[:n]
            ambiguous = len(tail) - len(tail.rstrip(bytes([ULAW_SILENCE])))
        self.total = offset

    def departure(self, offset: int) -> float | None:
        """When the packet carrying stream byte *offset* left, or None."""
        if not 0 <= offset < self.total:
            return None
        i = bisect.bisect_right(self.starts, offset) - 1
        return self.times[i]

    def gaps(self, slot_ms: float = 20.0) -> list[tuple[float, int, int]]:
        """Silences inside the stream: (time, slots missed, offset resumed at)."""
        result = []
        for i in range(1, len(self.times)):
            missed = round((self.times[i] - self.times[i - 1]) * 1000 / slot_ms) - 1
            if missed > 0:
                result.append((self.times[i - 1], missed, self.starts[i]))
        return result


#: Bytes of a payload used to find it again after lost bytes, and how far ahead.
RESYNC_BYTES = 24
RESYNC_WINDOW = 8000


def _resync(payload: bytes, sent: bytes, start: int) -> tuple[int, int]:
    """The nearest offset from *start* where *payload* fits *sent* (as stream
    bytes, then padding), and how many stream bytes it holds; (-1, 0) if none
    within the window. A short head can match in several places, so each
    candidate is checked against the whole payload."""
    head = payload[:RESYNC_BYTES]
    end = start + RESYNC_WINDOW
    found = sent.find(head, max(start, 0), end)
    while found >= 0:
        n = _common_prefix(payload, sent, found)
        if _is_stream_then_padding(payload, n):
            return found, n
        found = sent.find(head, found + 1, end)
    return -1, 0


def _leading_silence(payload: bytes, sent: bytes, offset: int) -> int:
    """How many bytes of silence *payload* starts with, if the stream follows
    them from *offset* (then only silence); 0 if it does not."""
    rest = payload.lstrip(bytes([ULAW_SILENCE]))
    lead = len(payload) - len(rest)
    if not lead or not rest:
        return 0
    return lead if _is_stream_then_padding(rest, _common_prefix(rest, sent, offset)) else 0


def _is_stream_then_padding(payload: bytes, n: int) -> bool:
    """Whether *payload* is *n* > 0 stream bytes followed only by silence."""
    return n > 0 and not payload[n:].strip(bytes([ULAW_SILENCE]))


def _common_prefix(payload: bytes, sent: bytes, offset: int) -> int:
    """How many leading bytes of *payload* equal *sent* from *offset*."""
    window = sent[offset : offset + len(payload)]
    if payload == window:
        return len(payload)
    n = 0
    for a, b in zip(payload, window, strict=False):
        if a != b:
            break
        n += 1
    return n


@dataclass(frozen=True)
class MarkReport:
    """Acknowledgment timing and accounting of one set of marks."""

    errors_ms: list[float]
    marks: int
    acked: int
    lost: int
    duplicated: int
    out_of_order: int

    @property
    def summary(self) -> Summary:
        return Summary.of(self.errors_ms)


def mark_report(
    marks: Sequence[tuple[str, int]],
    acks: Sequence[tuple[str, float]],
    stream: StreamMap,
) -> MarkReport:
    """Compare each mark's ack time with the departure of the byte before it.

    *marks* are (id, stream offset after the mark's audio), in the order
    placed; *acks* are (id, time), in the order received. Lost marks have no
    ack; duplicated ones have several; an ack is out of order when a mark
    placed later was acknowledged before it.
    """
    index = {mark_id: i for i, (mark_id, _) in enumerate(marks)}
    seen: dict[str, float] = {}
    duplicated = 0
    out_of_order = 0
    highest = -1
    for mark_id, t in acks:
        if mark_id in seen:
            duplicated += 1
            continue
        seen[mark_id] = t
        i = index.get(mark_id, -1)
        if i < highest:
            out_of_order += 1
        highest = max(highest, i)
    errors = []
    for mark_id, offset in marks:
        rtp_t = stream.departure(offset - 1)
        if mark_id in seen and rtp_t is not None:
            errors.append((seen[mark_id] - rtp_t) * 1000.0)
    acked = sum(1 for mark_id, _ in marks if mark_id in seen)
    return MarkReport(errors, len(marks), acked, len(marks) - acked, duplicated, out_of_order)
