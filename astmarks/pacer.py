"""Pace a streamed response into chan_websocket, and know what the caller heard.

A bot gets speech from a TTS engine as an async stream of chunks. Sending
them all at once fills Asterisk's queue (latency, and everything queued must
be discarded on barge-in); sending each only when the previous one has played
leaves gaps. :class:`Pacer` keeps about ``target_ms`` of audio queued in
Asterisk, using the positions Asterisk reports (a mark per chunk), and on
barge-in flushes and returns how many ms of the response the caller got, from
``MEDIA_FLUSHED``.

It works on a :class:`~astmarks.session.MediaSession` through its public
API. On a driver without ``MARK`` (the session finds out once, see
:meth:`~astmarks.session.MediaSession.started`) it falls back to
``MARK_MEDIA`` and a clock estimate. The ``clock`` and ``drained``
strategies exist for comparison (``make bench``).

Example::

    pacer = Pacer(session)                      # an open MediaSession
    playing = asyncio.create_task(pacer.play(tts_chunks()))
    ...                                         # the caller talks:
    pacer.barge_in()
    result = await playing
    print(result.heard_ms)                      # how much of it they heard
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import inspect
import itertools
import logging
import statistics
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from astmarks.session import (
    Capabilities,
    Flushed,
    Mark,
    MarkPlayed,
    MarkResult,
    MediaSession,
    MediaSessionError,
    MediaTimeout,
)

log = logging.getLogger(__name__)

_responses = itertools.count(1)
#: Seconds between round-trip measurements while a response plays.
ROUND_TRIP_EVERY_S = 2.0
#: The byte of digital silence of each media format (signed linear: 0).
SILENCE = {"ulaw": 0xFF, "alaw": 0xD5}


class Strategy(enum.StrEnum):
    """How the pacer knows how much audio Asterisk still has queued."""

    MARKS = "marks"  # a mark per chunk, positions from Asterisk's reports
    CLOCK = "clock"  # a local clock: the time since the audio was sent
    DRAINED = "drained"  # send the next chunk on QUEUE_DRAINED


@dataclass
class SentChunk:
    """One chunk of the response: where it sits in the stream and when it moved."""

    index: int
    offset: int  # bytes the bot sent before it (all responses)
    size: int
    generated: float  # time.time() when the TTS stream produced it
    sent: float | None = None


@dataclass
class PacingResult:
    """What happened to a response."""

    strategy: Strategy
    chunks: list[SentChunk] = field(default_factory=list)
    start_offset: int = 0  # bytes the bot sent before the response
    interrupted: bool = False
    #: On barge-in: how much of the response the caller got (ms), exact from
    #: MEDIA_FLUSHED with marks, a clock estimate without.
    heard_ms: float | None = None
    flushed: Flushed | None = None
    fallback: bool = False  # MARK was not available
    #: The mark after each chunk (marks strategy, or MARK_MEDIA on fallback).
    marks: list[Mark] = field(default_factory=list)
    #: The mark before the response (marks strategy): its position is where it starts.
    start: Mark | None = None

    @property
    def sent_bytes(self) -> int:
        return sum(c.size for c in self.chunks if c.sent is not None)

    async def played(self, timeout: float | None = None) -> MarkResult | None:
        """Until the response has played: its last mark's result. None at once
        for a response without marks (the clock and drained strategies, or
        an empty response)."""
        if not self.marks:
            return None
        return await self.marks[-1].result(timeout)


class Pacer:
    """Streams responses into one call, keeping about ``target_ms`` queued.

    *target_ms*: audio kept queued in Asterisk beyond what the link needs
    (:meth:`link_ms`); *prefetch_ms*: at most how long before a chunk is
    needed the TTS stream is asked for it; *chunk_timeout*: how long (s) the
    stream may take for one chunk before :meth:`play` raises
    :class:`~astmarks.session.MediaTimeout` (None: as long as it takes).
    """

    def __init__(
        self,
        session: MediaSession,
        *,
        target_ms: float = 40.0,
        prefetch_ms: float = 150.0,
        strategy: Strategy = Strategy.MARKS,
        chunk_timeout: float | None = None,
    ) -> None:
        self.session = session
        self.chunk_timeout = chunk_timeout
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
        # The time of the newest report the estimate is anchored on.
        self._anchored = 0.0
        self._caps: Capabilities | None = None
        # Set while play() runs.
        self._sending = asyncio.Event()
        self._sent = asyncio.Event()
        self._sent.set()
        self._coro: Coroutine[Any, Any, PacingResult] | None = None

    # --- the queue estimate ----------------------------------------------------------

    def _ms(self, nbytes: int) -> float:
        per_ms = self._caps.bytes_per_ms if self._caps is not None else 8.0
        return nbytes / per_ms

    def _update_anchor(self) -> None:
        """Re-anchor the estimate on the newest position Asterisk reported.

        The report says how much was queued when Asterisk sent it, a one-way
        delay before the bot read it. Audio the bot sent less than a round
        trip before reading it had not reached Asterisk then, so it was not
        in the report: it is added on top, each piece from the moment it
        arrives (a one-way delay after it was sent).
        """
        anchor = self.session.position
        if anchor is None or anchor.estimated or anchor.t <= self._anchored:
            return
        self._anchored = anchor.t
        one_way = self._one_way_s()
        play_end = anchor.t - one_way + anchor.queued_ms / 1000
        cutoff = anchor.t - 2 * one_way
        for sent_at, ms in self._sends:
            if sent_at > cutoff:
                play_end = max(play_end, sent_at + one_way) + ms / 1000
        self._play_end = play_end
        self._sends = [(t, ms) for t, ms in self._sends if t > cutoff]

    def _one_way_s(self) -> float:
        """Half the median recent round trip: the link's delay each way (s)."""
        return statistics.median(self._round_trips) / 2 if self._round_trips else 0.0

    def _by_marks(self) -> bool:
        return self.strategy is Strategy.MARKS and not self.fallback

    def queued_ms(self) -> float:
        """How much audio the pacer believes Asterisk still has queued, now."""
        if self._by_marks():
            self._update_anchor()
            return max(0.0, self._play_end - time.time()) * 1000
        return max(0.0, self._wall_end - time.time()) * 1000

    def link_ms(self) -> float:
        """How much more than ``target_ms`` the marks strategy keeps queued (ms).

        Audio sent now reaches Asterisk a one-way delay later, so that much
        more must be queued by the bot's reckoning; and the round trips vary
        (jitter, a TCP retransmission), so the longest of the last few beyond
        their median is added. Measured (``GET_STATUS`` to ``STATUS``) every
        :data:`ROUND_TRIP_EVERY_S` while a response plays. (A clock estimate
        needs no such allowance while the delay is steady: it is late by the
        same delay at both ends.)
        """
        if not self._by_marks() or not self._round_trips:
            return 0.0
        spread = max(self._round_trips) - statistics.median(self._round_trips)
        return (self._one_way_s() + spread) * 1000

    async def _measure_round_trips(self) -> None:
        """Time a GET_STATUS to its STATUS (answered at once) every few seconds."""
        while True:
            try:
                self._round_trips.append(await self.session.round_trip(timeout=10))
            except MediaSessionError as exc:  # the call ended; nothing to measure
                log.debug("pacer: no round trip measured: %s", exc)
                return
            await asyncio.sleep(ROUND_TRIP_EVERY_S)

    async def _until(self, awaitable: Awaitable[Any] | None, timeout: float) -> None:
        """Wait up to *timeout* s for *awaitable* (None: just the time), or barge-in.

        A barge-in must act at once, not when the current wait ends. A
        timeout is just the time passing; the call ending is raised.
        """
        stop = asyncio.ensure_future(self._barge_in.wait())
        waiters: set[asyncio.Future[Any]] = {stop}
        if awaitable is not None:
            waiters.add(asyncio.ensure_future(awaitable))
        done, pending = await asyncio.wait(
            waiters, timeout=max(timeout, 0.001), return_when=asyncio.FIRST_COMPLETED
        )
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for fut in done - {stop}:
            error = fut.exception()
            if error is not None and not isinstance(error, MediaTimeout):
                raise error

    async def _wait_queue_below(self, threshold_ms: float) -> None:
        """Wait until at most *threshold_ms* of audio is queued (or barge-in)."""
        while not self._barge_in.is_set():
            excess = self.queued_ms() - threshold_ms - self.link_ms()
            if excess <= 0:
                return
            wait_s = excess / 1000
            if self._by_marks():
                await self._until(self.session.next_position(max(wait_s, 0.001)), wait_s)
            else:
                await self._until(None, wait_s)

    # --- streaming ----------------------------------------------------------------

    def play(self, chunks: AsyncIterable[bytes]) -> Coroutine[Any, Any, PacingResult]:
        """Send a response as it is generated; await it: it returns when the
        response has been sent in full or interrupted.

        The response is this pacer's current one from the call on, so
        :meth:`interrupt` or :meth:`barge_in` right after
        ``asyncio.create_task(pacer.play(...))`` stop this response, not the
        one before. The result's :meth:`PacingResult.played` waits until it
        has been played.
        """
        coro = self._coro
        if self._sending.is_set() and (
            coro is None or inspect.getcoroutinestate(coro) != inspect.CORO_CLOSED
        ):
            raise RuntimeError("this pacer is already playing a response")
        self._sending.set()
        self._sent.clear()
        self._barge_in = asyncio.Event()  # this response's
        result = PacingResult(self.strategy, start_offset=self.session.bytes_sent)
        self._current = result
        self._coro = self._run(result, chunks)
        return self._coro

    async def _run(self, result: PacingResult, chunks: AsyncIterable[bytes]) -> PacingResult:
        try:
            await self._play(result, chunks)
            return result
        finally:
            self._sending.clear()
            self._sent.set()

    async def _play(self, result: PacingResult, chunks: AsyncIterable[bytes]) -> None:
        self._caps = await self.session.started()
        if self.strategy is Strategy.MARKS and not self._caps.marks:
            self.fallback = True
        result.fallback = self.fallback
        prefix = f"r{next(_responses)}"
        start: Mark | None = None
        if self._by_marks():
            # Its MARK_PLAYED gives the exact position where the response starts.
            start = await self.session.mark(f"{prefix}-start")
            result.start = start
        iterator = aiter(chunks)
        offset = self.session.bytes_sent
        drained: asyncio.Future[None] | None = None
        timing = asyncio.create_task(self._measure_round_trips()) if self._by_marks() else None
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
                if self.strategy is Strategy.DRAINED:
                    if drained is not None:
                        await self._until(drained, 3600.0)
                else:
                    await self._wait_queue_below(self.target_ms)
                if self._barge_in.is_set():
                    break
                mark = await self._send(chunk, data, prefix)
                if mark is not None:
                    result.marks.append(mark)
                if self.strategy is Strategy.DRAINED:
                    drained = asyncio.ensure_future(self.session.queue_drained(timeout=3600.0))
        finally:
            for task in (timing, drained):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, MediaSessionError):
                        await task
            close = getattr(iterator, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
        if self._barge_in.is_set():
            await self._flush(result, start)
        else:
            await self._end_on_a_whole_frame()

    async def _end_on_a_whole_frame(self) -> None:
        """Complete the response's last frame with silence (no mark of its own).

        Asterisk does not pad. Where the phone negotiated a ptime, its RTP
        smoother holds a short last frame until more audio comes (measured:
        as long as the next response takes), so the caller would hear the end
        of this response only with the start of the next one, well after its
        last mark was answered.
        """
        caps = self._caps
        assert caps is not None
        if str(caps.fields.get("passthrough", "")).lower() == "true":
            return  # frames of a passthrough codec are the app's: none to complete
        if caps.codec in SILENCE:
            byte = SILENCE[caps.codec]
        elif caps.codec.startswith("slin"):
            byte = 0x00
        else:
            return  # no silence byte known for this format
        partial = self.session.partial_frame_bytes
        if partial:
            await self.session.send_audio(bytes([byte]) * (caps.optimal_frame_size - partial))

    def lookahead_ms(self) -> float:
        """How long before it is needed to ask the engine for the next chunk.

        The slowest of the last few generation times plus a frame, capped at
        ``prefetch_ms``; ``prefetch_ms`` until a few have been seen.
        """
        if len(self._generation) < 3:
            return self.prefetch_ms
        frame_ms = self._caps.ptime if self._caps is not None else 20
        return min(self.prefetch_ms, max(self._generation) * 1000 + frame_ms)

    async def _next_chunk(self, iterator: AsyncIterator[bytes]) -> bytes | None:
        """The next chunk of the stream; None at its end or on barge-in;
        MediaTimeout if the stream takes longer than ``chunk_timeout``."""
        asked = time.monotonic()
        fetch: asyncio.Future[Any] = asyncio.ensure_future(anext(iterator))
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._barge_in.wait())
        await asyncio.wait(
            {fetch, stop}, timeout=self.chunk_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        stop.cancel()
        if not fetch.done():
            fetch.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await fetch
            if not self._barge_in.is_set():
                raise MediaTimeout(
                    f"the TTS stream gave no chunk within {self.chunk_timeout:.1f} s"
                )
            return None
        try:
            data: bytes = fetch.result()
        except StopAsyncIteration:
            return None
        self._generation.append(time.monotonic() - asked)
        return data

    async def _send(self, chunk: SentChunk, data: bytes, prefix: str) -> Mark | None:
        """Send a chunk and its mark; return the mark, if one was placed."""
        now = time.time()
        await self.session.send_audio(data)
        chunk.sent = now
        ms = self._ms(len(data))
        # The marks' estimate runs on Asterisk's time: the audio arrives a
        # one-way delay after it is sent (0 for the clock's).
        arrives = now + (self._one_way_s() if self._by_marks() else 0.0)
        self._play_end = max(self._play_end, arrives) + ms / 1000
        self._wall_end = max(self._wall_end, now) + ms / 1000
        self._sends.append((now, ms))
        if self.strategy is not Strategy.MARKS:
            return None
        return await self.session.mark(f"{prefix}-{chunk.index}")

    def clock_heard_ms(self) -> float:
        """How much of the current response a clock alone says was played (ms).

        What a bot without marks would know: the time since each chunk was
        sent, never corrected by Asterisk's reports.
        """
        if self._current is None:
            return 0.0
        sent_ms = self._ms(self._current.sent_bytes)
        return max(0.0, sent_ms - max(0.0, self._wall_end - time.time()) * 1000)

    def marks_heard_ms(self) -> float:
        """How much of the current response the marks say was played (ms).

        The clock estimate re-anchored at the newest position Asterisk
        reported (a one-way delay old); without marks, the clock's.
        """
        if self._current is None:
            return 0.0
        if not self._by_marks():
            return self.clock_heard_ms()
        sent_ms = self._ms(self._current.sent_bytes)
        return max(0.0, sent_ms - self.queued_ms())

    def barge_in(self) -> None:
        """Interrupt the response: stop sending, flush, and work out what was heard.

        :meth:`play` then returns the result, with ``heard_ms``. Only while
        :meth:`play` runs; :meth:`interrupt` also stops a response that has
        been sent in full and is still playing.
        """
        if self._sending.is_set():
            self._barge_in.set()

    async def interrupt(self) -> PacingResult | None:
        """Barge-in, wherever the last response is: still being sent (as
        :meth:`barge_in`, waiting for :meth:`play` to return) or sent in full
        and still playing (the pacer keeps a little queued). Returns its
        result, with ``heard_ms``; None if it had been played in full (or
        there was none).
        """
        result = self._current
        if result is None:
            return None
        if self._sending.is_set():
            self._barge_in.set()
            await self._sent.wait()
        if result.interrupted:
            return result
        # Without marks (the clock strategy), the clock's estimate.
        playing = not result.marks[-1].done() if result.marks else self._wall_end > time.time()
        if not playing:
            return None
        await self._flush(result, result.start)
        return result

    async def _flush(self, result: PacingResult, start: Mark | None) -> None:
        result.interrupted = True
        clock_heard = self.clock_heard_ms()
        flushed = await self.session.flush()
        self._play_end = 0.0
        self._wall_end = 0.0
        self._sends.clear()
        if start is None:
            result.heard_ms = clock_heard
            return
        self._anchored = flushed.t
        result.flushed = flushed
        began = await start.result()  # answered: played, or cleared by this flush
        if isinstance(began, MarkPlayed) and began.played_ms is not None:
            result.heard_ms = flushed.played_ms - began.played_ms
        else:
            result.heard_ms = 0.0  # the response had not started playing
