"""Pace a streamed response into chan_websocket, and know what the caller heard.

A bot gets speech from a TTS engine as an async stream of chunks. Sending
them all at once fills Asterisk's queue (latency, and everything queued must
be discarded on barge-in); sending each only when the previous one has played
leaves gaps. :class:`Pacer` keeps about ``target_ms`` of audio queued in
Asterisk, using the positions in ``MARK_PLAYED`` (one mark per chunk), and on
barge-in flushes and returns how many ms of the response the caller got, from
``MEDIA_FLUSHED``.

On a driver without ``MARK`` (asked once per call, see
:meth:`harness.bot.BotSession.probe_marks`) it falls back to ``MARK_MEDIA``
and a clock estimate, and logs that it did. The
``clock`` and ``drained`` strategies exist for comparison (``make bench``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import itertools
import logging
import statistics
import time
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from harness import audio
from harness.bot import BotSession
from harness.events import Event

log = logging.getLogger(__name__)

_responses = itertools.count(1)
#: Seconds between round-trip measurements while a response plays.
ROUND_TRIP_EVERY_S = 2.0


class Strategy(enum.StrEnum):
    """How the pacer knows how much audio Asterisk still has queued."""

    MARKS = "marks"  # MARK per chunk, positions from MARK_PLAYED
    CLOCK = "clock"  # a local clock: 1 ms per 8 bytes since the audio was sent
    DRAINED = "drained"  # send the next chunk on QUEUE_DRAINED


@dataclass
class SentChunk:
    """One chunk of the response: where it sits in the stream and when it moved."""

    index: int
    offset: int  # bytes of the bot's stream before it (all responses)
    size: int
    generated: float  # time.time() when the TTS stream produced it
    sent: float | None = None


@dataclass
class PacingResult:
    """What happened to a response."""

    strategy: Strategy
    chunks: list[SentChunk] = field(default_factory=list)
    start_offset: int = 0  # bytes of the bot's stream before the response
    interrupted: bool = False
    heard_ms: float | None = None  # on barge-in: how much the caller got, as the pacer knows it
    flushed: Event | None = None
    fallback: bool = False  # MARK was not available
    #: (mark id, stream offset after the chunk) of each mark placed
    marks: list[tuple[str, int]] = field(default_factory=list)

    @property
    def sent_bytes(self) -> int:
        return sum(c.size for c in self.chunks if c.sent is not None)


class Pacer:
    """Streams responses into one call, keeping about ``target_ms`` queued."""

    def __init__(
        self,
        session: BotSession,
        *,
        target_ms: float = 40.0,
        prefetch_ms: float = 150.0,
        strategy: Strategy = Strategy.MARKS,
    ) -> None:
        self.session = session
        self.target_ms = target_ms
        self.prefetch_ms = prefetch_ms
        # How long the engine took for recent chunks (s): it is asked for the
        # next one that long before it is needed.
        self._generation: collections.deque[float] = collections.deque(maxlen=8)
        self.strategy = strategy
        #: MARK is not available: MARK_MEDIA and a clock instead (known once playing).
        self.fallback = False
        self._barge_in = asyncio.Event()
        self._current: PacingResult | None = None
        # When the audio sent so far will have finished playing: a clock
        # estimate, which the marks strategy re-anchors at every report.
        self._play_end = 0.0
        # The same from the clock alone, never re-anchored: what a bot
        # without marks would believe (the benchmark compares the two).
        self._wall_end = 0.0
        # Round trips of a command to Asterisk and back (s), measured while a
        # response plays: a report is half of one older than it looks, and
        # audio sent now arrives half of one later.
        self._round_trips: collections.deque[float] = collections.deque(maxlen=4)
        # Recent sends (time, ms), to replay those after a report on top of it.
        self._sends: list[tuple[float, float]] = []
        self._event_cursor = len(session.events) - 1

    # --- the queue estimate ----------------------------------------------------------

    def _clock_queued_ms(self, now: float) -> float:
        return max(0.0, self._play_end - now) * 1000

    def _update_anchor(self) -> None:
        """Re-anchor the estimate on the newest MARK_PLAYED or MEDIA_PROGRESS.

        The report says how much was queued when Asterisk sent it, a one-way
        delay before the bot read it. Audio the bot sent less than a round
        trip before reading it had not reached Asterisk then, so it was not
        in the report: it is added on top, each piece from the moment it
        arrives (a one-way delay after it was sent).
        """
        anchor = None
        for event in self.session.events[self._event_cursor + 1 :]:
            self._event_cursor = event.index
            if event.name in ("MARK_PLAYED", "MEDIA_PROGRESS"):
                anchor = event
        if anchor is None:
            return
        one_way = self._one_way_s()
        play_end = anchor.t - one_way + anchor.get_int("queued_ms") / 1000
        cutoff = anchor.t - 2 * one_way
        for sent_at, ms in self._sends:
            if sent_at > cutoff:
                play_end = max(play_end, sent_at + one_way) + ms / 1000
        self._play_end = play_end
        self._sends = [(t, ms) for t, ms in self._sends if t > cutoff]

    def _one_way_s(self) -> float:
        """Half the median recent round trip: the link's delay each way (s)."""
        return statistics.median(self._round_trips) / 2 if self._round_trips else 0.0

    def queued_ms(self) -> float:
        """How much audio the pacer believes Asterisk still has queued, now."""
        if self.strategy is Strategy.MARKS and not self.fallback:
            self._update_anchor()
            return self._clock_queued_ms(time.time())
        return max(0.0, self._wall_end - time.time()) * 1000

    def link_ms(self) -> float:
        """How much more than ``target_ms`` the marks strategy keeps queued (ms).

        Audio sent now reaches Asterisk a one-way delay later, so that much
        more must be queued by the bot's reckoning; and the round trips vary
        (jitter, a TCP retransmission), so the longest of the last few beyond
        their median is added. Measured by :meth:`_measure_round_trips` while a response
        plays. (A clock estimate needs no such allowance while the delay is
        steady: it is late by the same delay at both ends.)
        """
        if self.strategy is not Strategy.MARKS or self.fallback or not self._round_trips:
            return 0.0
        spread = max(self._round_trips) - statistics.median(self._round_trips)
        return (self._one_way_s() + spread) * 1000

    async def _measure_round_trips(self) -> None:
        """Time a GET_STATUS to its STATUS (answered at once) every few seconds.

        The bot must not send GET_STATUS itself while a response plays: its
        STATUS could be taken for this one's.
        """
        while True:
            after = len(self.session.events) - 1
            try:
                await self.session.command("GET_STATUS")
                sent = time.time()  # handed to the socket: its wait to be sent is not the link's
                status = await self.session.wait_for("STATUS", after=after, timeout=10)
            except Exception as exc:  # the call ended; nothing to measure
                log.debug("pacer: no round trip measured: %s", exc)
                return
            self._round_trips.append(max(0.0, status.t - sent))
            await asyncio.sleep(ROUND_TRIP_EVERY_S)

    async def _wait_event(self, names: tuple[str, ...], timeout: float) -> None:
        """Wait up to *timeout* s for one of *names* (none: just the time), or barge-in.

        A barge-in must act at once, not when the current wait ends.
        """
        stop = asyncio.ensure_future(self._barge_in.wait())
        waiters: set[asyncio.Future[Any]] = {stop}
        if names:
            after = len(self.session.events) - 1
            waiters.add(
                asyncio.ensure_future(
                    self.session.wait_for(names, after=after, timeout=max(timeout, 0.001))
                )
            )
        done, pending = await asyncio.wait(
            waiters, timeout=max(timeout, 0.001), return_when=asyncio.FIRST_COMPLETED
        )
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for fut in done - {stop}:
            error = fut.exception()
            if error is not None and self.session.closed.is_set():
                raise error  # the call is gone; a timeout is just the time passing

    async def _wait_queue_below(self, threshold_ms: float) -> None:
        """Wait until at most *threshold_ms* of audio is queued (or barge-in)."""
        while not self._barge_in.is_set():
            excess = self.queued_ms() - threshold_ms - self.link_ms()
            if excess <= 0:
                return
            if self.strategy is Strategy.MARKS and not self.fallback:
                await self._wait_event(("MARK_PLAYED", "MEDIA_PROGRESS"), excess / 1000)
            else:
                await self._wait_event((), excess / 1000)

    async def _wait_turn(self, drained_after: int) -> None:
        """Wait until the next chunk may be sent (or barge-in)."""
        if self.strategy is not Strategy.DRAINED:
            await self._wait_queue_below(self.target_ms)
            return
        while not self._barge_in.is_set():
            if drained_after < 0 or any(
                e.name == "QUEUE_DRAINED" for e in self.session.events[drained_after + 1 :]
            ):
                return
            await self._wait_event(("QUEUE_DRAINED",), 0.05)

    # --- streaming ----------------------------------------------------------------

    async def play(self, chunks: AsyncIterable[bytes]) -> PacingResult:
        """Send a response as it is generated; return when sent in full or interrupted.

        Call :meth:`barge_in` from another task to interrupt.
        """
        await self._check_marks()
        result = PacingResult(self.strategy, start_offset=self.session.bytes_sent)
        self._current = result
        result.fallback = self.fallback
        prefix = f"r{next(_responses)}"
        use_mark = self.strategy is Strategy.MARKS and not self.fallback
        if use_mark:
            # Its MARK_PLAYED gives the exact position where the response starts.
            await self.session.command("MARK", f"{prefix}-start")
        iterator = aiter(chunks)
        offset = self.session.bytes_sent
        drained_after = -1
        timing = asyncio.create_task(self._measure_round_trips()) if use_mark else None
        try:
            while not self._barge_in.is_set():
                # Ask the engine for the next chunk only once the queue is low
                # enough that the chunk will be needed soon: reading the stream
                # is what makes a streaming engine generate.
                if self.strategy is not Strategy.DRAINED:
                    await self._wait_queue_below(self.target_ms + self.lookahead_ms())
                data = await self._next_chunk(iterator)
                if data is None:
                    break
                chunk = SentChunk(len(result.chunks), offset, len(data), time.time())
                result.chunks.append(chunk)
                offset += len(data)
                await self._wait_turn(drained_after)
                if self._barge_in.is_set():
                    break
                mark_id = await self._send(chunk, data, prefix, use_mark)
                if mark_id is not None:
                    result.marks.append((mark_id, chunk.offset + chunk.size))
                if self.strategy is Strategy.DRAINED:
                    drained_after = len(self.session.events) - 1
                    await self.session.command("REPORT_QUEUE_DRAINED")
        finally:
            if timing is not None:
                timing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await timing
            close = getattr(iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        if self._barge_in.is_set():
            await self._flush(result, prefix, use_mark)
        else:
            await self._end_on_a_whole_frame()
        return result

    async def _end_on_a_whole_frame(self) -> None:
        """Complete the response's last frame with silence (no mark of its own).

        Asterisk does not pad. Where the phone negotiated a ptime, its RTP
        smoother holds a short last frame until more audio comes (measured:
        as long as the next response takes), so the caller would hear the end
        of this response only with the start of the next one, well after its
        last mark was answered.
        """
        pad = -self.session.bytes_sent % audio.FRAME_BYTES
        if pad:
            await self.session.send_audio(bytes([audio.ULAW_SILENCE]) * pad)

    async def _check_marks(self) -> None:
        """Find out, once, whether the driver has MARK; fall back if not."""
        if self.strategy is not Strategy.MARKS or self.fallback:
            return
        if not await self.session.probe_marks():
            log.warning(
                "pacer: the driver has no MARK; falling back to MARK_MEDIA "
                "and a clock estimate (acks one ptime late, none after a flush)"
            )
            self.fallback = True

    def lookahead_ms(self) -> float:
        """How long before it is needed to ask the engine for the next chunk.

        The slowest of the last few generation times plus a frame, capped at
        ``prefetch_ms``; ``prefetch_ms`` until a few have been seen.
        """
        if len(self._generation) < 3:
            return self.prefetch_ms
        return min(self.prefetch_ms, max(self._generation) * 1000 + audio.FRAME_MS)

    async def _next_chunk(self, iterator: AsyncIterator[bytes]) -> bytes | None:
        """The next chunk of the stream; None at its end or on barge-in."""
        asked = time.monotonic()
        fetch: asyncio.Future[Any] = asyncio.ensure_future(anext(iterator))
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._barge_in.wait())
        await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not fetch.done():
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await fetch
            return None
        try:
            data: bytes = fetch.result()
        except StopAsyncIteration:
            return None
        self._generation.append(time.monotonic() - asked)
        return data

    async def _send(self, chunk: SentChunk, data: bytes, prefix: str, use_mark: bool) -> str | None:
        """Send a chunk and its mark; return the mark's id, if one was placed."""
        now = time.time()
        await self.session.send_audio(data)
        chunk.sent = now
        # The marks' estimate runs on Asterisk's time: the audio arrives a
        # one-way delay after it is sent (0 for the clock's).
        arrives = now + (self._one_way_s() if use_mark else 0.0)
        self._play_end = max(self._play_end, arrives) + audio.ms_of(len(data)) / 1000
        self._wall_end = max(self._wall_end, now) + audio.ms_of(len(data)) / 1000
        self._sends.append((now, audio.ms_of(len(data))))
        mark_id = f"{prefix}-{chunk.index}"
        if use_mark:
            await self.session.command("MARK", mark_id)
        elif self.fallback:
            await self.session.command("MARK_MEDIA", mark_id)
        else:
            return None
        return mark_id

    def clock_heard_ms(self) -> float:
        """How much of the current response a clock alone says was played (ms).

        What a bot without marks would know: 1 ms per 8 bytes since each
        chunk was sent, never corrected by Asterisk's reports.
        """
        if self._current is None:
            return 0.0
        sent_ms = audio.ms_of(self._current.sent_bytes)
        return max(0.0, sent_ms - max(0.0, self._wall_end - time.time()) * 1000)

    def marks_heard_ms(self) -> float:
        """How much of the current response the marks say was played (ms).

        The clock estimate re-anchored at the newest MARK_PLAYED or
        MEDIA_PROGRESS (the position Asterisk reported, a one-way delay old);
        without marks, the clock's.
        """
        if self._current is None:
            return 0.0
        if self.strategy is not Strategy.MARKS or self.fallback:
            return self.clock_heard_ms()
        sent_ms = audio.ms_of(self._current.sent_bytes)
        return max(0.0, sent_ms - self.queued_ms())

    def barge_in(self) -> None:
        """Interrupt the response: stop sending, flush, and work out what was heard."""
        self._barge_in.set()

    async def _flush(self, result: PacingResult, prefix: str, use_mark: bool) -> None:
        result.interrupted = True
        clock_heard = self.clock_heard_ms()
        after = len(self.session.events) - 1
        await self.session.command("FLUSH_MEDIA")
        self._play_end = 0.0
        self._wall_end = 0.0
        self._sends.clear()
        if not use_mark:
            self._event_cursor = len(self.session.events) - 1
            result.heard_ms = clock_heard
            return
        flushed = await self.session.wait_for("MEDIA_FLUSHED", after=after)
        # Reports sent before the flush are about audio that is gone.
        self._event_cursor = flushed.index
        result.flushed = flushed
        start = next((e for e in self.session.events if e.mark_id == f"{prefix}-start"), None)
        if start is None or start.name != "MARK_PLAYED":
            result.heard_ms = 0.0  # the response had not started playing
        else:
            result.heard_ms = float(flushed.get_int("played_ms") - start.get_int("played_ms"))
