"""From captures and events to facts: which frame left when, how late each mark was.

The bot knows what it sent; the capture knows what left Asterisk for the
caller and when (kernel timestamps). Frames are matched by content, in order:
the channel is ulaw end to end, so a frame's payload is unchanged on RTP.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from harness.audio import FRAME_BYTES
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
