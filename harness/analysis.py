"""From captures and events to facts: which frame left when, how late each mark was.

The bot knows what it sent; the capture knows what left Asterisk for the
caller and when (kernel timestamps). Frames are matched by content, in order:
the channel is ulaw end to end, so a frame's payload is unchanged on RTP.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from astmarks.protocol import Event
from harness.audio import FRAME_BYTES, ULAW_LINEAR, ULAW_SILENCE
from harness.capture import RtpPacket

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


def summary_dict(s: Summary) -> dict[str, float]:
    """*s* as a dict for JSON, to three decimals."""
    return {k: round(v, 3) for k, v in vars(s).items()}


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
    the bot sent, from offset 0): the bytes that match are the bot's, and a
    tail of μ-law silence after them is padding.

    *mixed*: the stream went through a mixing bridge, which decodes it to
    signed linear, adds the other parties' audio (often near silence, not
    always exactly) and encodes the sum again: a byte then matches when its
    value is within an eighth of its magnitude of the bot's (a few μ-law
    steps), or within 64 of 32767 near zero; silence before the stream in a
    packet is padding too (a mixer's tick that began before the stream did),
    and a packet of silence alone is a tick without the bot's audio.
    """

    def __init__(self, packets: Sequence[RtpPacket], sent: bytes, *, mixed: bool = False) -> None:
        m = _MIXED if mixed else _EXACT
        self.sent = sent
        self.mixed = mixed
        self._m = m
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
            n = m.prefix(p.payload, sent, offset)
            lead = 0
            if n == 0 and mixed and (lead := _leading_silence(m, p.payload, sent, offset)):
                # Padding, then the stream: a mixer's tick that began before
                # the stream did (or resumed).
                self.padding += lead
                self.starts.append(offset)
                self.times.append(p.t)
                n = m.prefix(p.payload[lead:], sent, offset)
                offset += n
                self.padding += len(p.payload) - lead - n
                ambiguous = 0
                continue
            if not _is_stream_then_padding(m, p.payload, n):
                if m is _MIXED and all(m.quiet(c) for c in p.payload):
                    # A mixer's tick without the bot's audio (it ran dry):
                    # silence, which would fit any quiet stretch further on.
                    self.padding += len(p.payload)
                    continue
                # Step back over silence taken for stream bytes, or skip bytes
                # that never reached RTP (upstream drops partial frames).
                found, n = _resync(m, p.payload, sent, offset - ambiguous)
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
            ambiguous = m.quiet_tail(p.payload[:n])
        self.total = offset

    def anchored(self, offset: int) -> bool:
        """Whether byte *offset* can be placed for certain: in a mixed stream a
        stretch of quiet bytes fits the mixer's silence as well, so only a
        byte with audible ones among the ANCHOR_BYTES up to it."""
        if not self.mixed:
            return True
        window = self.sent[max(0, offset + 1 - ANCHOR_BYTES) : offset + 1]
        return not all(self._m.quiet(c) for c in window)

    def departure(self, offset: int) -> float | None:
        """When the packet carrying stream byte *offset* left, or None."""
        if not 0 <= offset < self.total:
            return None
        i = bisect.bisect_right(self.starts, offset) - 1
        return self.times[i]

    def played_by(self, t: float) -> float:
        """Bytes of the stream played out by *t*, continuously: each packet's
        bytes from its departure, at 8 a millisecond (μ-law).

        Continuous, so that an estimate sampled at any moment compares with
        it without the 20 ms steps of whole packets (sampled every 0.5 s plus
        a little, those steps alias into a slow sawtooth that looks like
        drift).
        """
        i = bisect.bisect_right(self.times, t) - 1
        if i < 0:
            return 0.0
        end = self.starts[i + 1] if i + 1 < len(self.starts) else self.total
        return self.starts[i] + min(float(end - self.starts[i]), (t - self.times[i]) * 8000)

    def gaps(self, slot_ms: float = 20.0) -> list[tuple[float, int, int]]:
        """Silences inside the stream: (time, slots missed, offset resumed at)."""
        result = []
        for i in range(1, len(self.times)):
            missed = round((self.times[i] - self.times[i - 1]) * 1000 / slot_ms) - 1
            if missed > 0:
                result.append((self.times[i - 1], missed, self.starts[i]))
        return result


#: How many bytes up to a mark must hold audible audio to time it in a mixed
#: stream (2 ms of μ-law).
ANCHOR_BYTES = 16
#: Bytes of a payload used to find it again after lost bytes, and how far ahead.
RESYNC_BYTES = 24
RESYNC_WINDOW = 8000


class _Exact:
    """Byte comparison for a stream that reached RTP as the bot sent it."""

    def same(self, a: int, b: int) -> bool:
        return a == b

    def prefix(self, payload: bytes, sent: bytes, offset: int) -> int:
        """How many leading bytes of *payload* match *sent* from *offset*."""
        window = sent[offset : offset + len(payload)]
        if payload == window:
            return len(payload)
        n = 0
        for a, b in zip(payload, window, strict=False):
            if not self.same(a, b):
                break
            n += 1
        return n

    def quiet(self, code: int) -> bool:
        return code == ULAW_SILENCE

    def quiet_tail(self, data: bytes) -> int:
        """How many bytes at the end of *data* are silence."""
        n = len(data)
        while n and self.quiet(data[n - 1]):
            n -= 1
        return len(data) - n

    def candidates(self, head: bytes, sent: bytes, start: int, end: int) -> Iterator[int]:
        """Offsets in [start, end) where *head* may begin."""
        found = sent.find(head, start, end)
        while found >= 0:
            yield found
            found = sent.find(head, found + 1, end)


class _Mixed(_Exact):
    """Comparison in signed linear, within an eighth (64 near zero): a mixer's output."""

    def same(self, a: int, b: int) -> bool:
        x, y = ULAW_LINEAR[a], ULAW_LINEAR[b]
        return abs(x - y) <= max(64, max(abs(x), abs(y)) >> 3)

    def quiet(self, code: int) -> bool:
        return abs(ULAW_LINEAR[code]) <= 64

    def candidates(self, head: bytes, sent: bytes, start: int, end: int) -> Iterator[int]:
        for offset in range(start, min(end, len(sent) - len(head) + 1)):
            if self.prefix(head, sent, offset) == len(head):
                yield offset


_EXACT = _Exact()
_MIXED = _Mixed()


def _resync(m: _Exact, payload: bytes, sent: bytes, start: int) -> tuple[int, int]:
    """The nearest offset from *start* where *payload* fits *sent* (as stream
    bytes, then padding), and how many stream bytes it holds; (-1, 0) if none
    within the window. A short head can match in several places, so each
    candidate is checked against the whole payload."""
    head = payload[:RESYNC_BYTES]
    for found in m.candidates(head, sent, max(start, 0), start + RESYNC_WINDOW):
        n = m.prefix(payload, sent, found)
        if _is_stream_then_padding(m, payload, n):
            return found, n
    return -1, 0


def _leading_silence(m: _Exact, payload: bytes, sent: bytes, offset: int) -> int:
    """How many bytes of silence *payload* starts with, if the stream follows
    them from *offset* (then only silence); 0 if it does not."""
    lead = 0
    while lead < len(payload) and m.quiet(payload[lead]):
        lead += 1
    rest = payload[lead:]
    if not lead or not rest:
        return 0
    return lead if _is_stream_then_padding(m, rest, m.prefix(rest, sent, offset)) else 0


def _is_stream_then_padding(m: _Exact, payload: bytes, n: int) -> bool:
    """Whether *payload* is *n* > 0 stream bytes followed only by silence."""
    return n > 0 and all(m.quiet(c) for c in payload[n:])


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
    placed later was acknowledged before it. In a mixed stream only marks
    after an audible byte are timed (:meth:`StreamMap.anchored`).
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
        if mark_id in seen and rtp_t is not None and stream.anchored(offset - 1):
            errors.append((seen[mark_id] - rtp_t) * 1000.0)
    acked = sum(1 for mark_id, _ in marks if mark_id in seen)
    return MarkReport(errors, len(marks), acked, len(marks) - acked, duplicated, out_of_order)
