"""One chan_websocket media connection, as a bot sees it.

The bot owns the WebSocket (its own server accepted it, or it connected in to
Asterisk); :class:`MediaSession` wraps it::

    async def handler(ws):
        async with MediaSession(ws) as session:
            caps = await session.started()
            await session.send_audio(chunk)
            mark = await session.mark()
            played = await mark.result()        # MarkPlayed, or MarkCleared
            ...
            flushed = await session.flush()     # on barge-in: what was heard

While the session is open it reads the connection in a task of its own: every
event resolves what waits for it (a mark's result, a flush, a status), the
caller's audio goes to :meth:`MediaSession.audio`. Every await takes a
timeout (the session's ``timeout`` by default) and raises
:class:`MediaTimeout` when it passes; a closed connection raises
:class:`SessionClosed`; an ``ERROR`` about a mark fails that mark with
:class:`DriverError`. Nothing waits forever.

Several tasks may use one session (one streams, another flushes on
barge-in): messages go out one at a time, and what the session counts (a
mark's offset, which answer is whose) follows their order on the wire.

Marks are ``MARK_MEDIA``. On a driver with mark positions mode (this
project's), the session turns the mode on (``REPORT_MARK_POSITIONS``) and each
mark is answered in the tick that hands its audio to the call, with positions.
A driver without it (Asterisk as released) is found out once, at
:meth:`MediaSession.started`, and said once in the log: marks are then
acknowledged one ptime late, without positions, and positions come from a
clock: the time since the audio was sent. Either way the log says which.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Generator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar

from astmarks.protocol import (
    MARK_CLEARED_EVENTS,
    MARK_REACHED_EVENTS,
    ControlFormat,
    Event,
    ProtocolError,
    format_command,
    parse_event,
)
from astmarks.transport import Transport, TransportClosed, as_transport

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A mark id: 1 to 64 visible ASCII characters (what the driver accepts).
MARK_ID = re.compile(r"[!-~]{1,64}")
#: How long an await waits by default (s).
DEFAULT_TIMEOUT = 10.0
#: The most media sent in one WebSocket message: Asterisk reads a frame into
#: 65,535 bytes with its header (65,527 of payload when the bot connected in,
#: its frames masked); a larger one closes the call (1009).
MAX_MESSAGE = 65_000


class MediaSessionError(Exception):
    """Something the bot waited for did not happen."""


class MediaTimeout(MediaSessionError, TimeoutError):
    """An await's timeout passed first."""


class SessionClosed(MediaSessionError):
    """The connection closed (the call ended) first."""


# The ERROR of a driver whose mark positions mode is JSON only, asked under plain text.
JSON_ONLY_MODE = "REPORT_MARK_POSITIONS only supports JSON"


class DriverError(MediaSessionError):
    """Asterisk refused a command: its ``ERROR`` event's text."""

    def __init__(self, text: str, event: Event | None = None) -> None:
        super().__init__(text)
        self.text = text
        self.event = event


# --- what the driver tells -----------------------------------------------------------


@dataclass(frozen=True)
class Capabilities:
    """What ``MEDIA_START`` said, and whether the driver has mark positions mode."""

    channel: str
    channel_id: str
    connection_id: str
    #: The media format (``ulaw``, ``alaw``, ``slin16``...).
    codec: str
    optimal_frame_size: int
    ptime: int
    control_format: ControlFormat
    #: Mark positions mode: ``MARK_MEDIA`` answered exactly, with positions
    #: (this project's driver); False: ``MARK_MEDIA`` one ptime late, and a clock.
    marks: bool
    #: Every field of ``MEDIA_START`` as the wire carried it.
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def bytes_per_ms(self) -> float:
        """Bytes of media per millisecond (from the optimal frame size and ptime)."""
        return self.optimal_frame_size / self.ptime if self.ptime else 8.0


@dataclass(frozen=True)
class Position:
    """Where playback stood when Asterisk reported it (or the clock says so).

    ``played_ms``: media played since the call started; ``queued_ms``: media
    waiting to be played; ``t``: when the bot read it (``time.time()``).
    """

    played_ms: float
    queued_ms: float
    t: float
    #: From the bot's clock, not from Asterisk (a driver without MARK).
    estimated: bool = False


@dataclass(frozen=True)
class MarkPlayed:
    """The media before the mark has been handed to the core."""

    mark_id: str
    #: The position after the media before the mark (None: MARK_MEDIA fallback).
    played_ms: int | None
    queued_ms: int | None
    seq: int | None
    t: float
    #: Inferred by the session: a driver without MARK flushed the mark after
    #: its media had played by the clock, before answering it.
    inferred: bool = False

    played = True


@dataclass(frozen=True)
class MarkCleared:
    """The mark will never play: flushed (``reason`` "flush") or hung up ("hangup")."""

    mark_id: str
    reason: str
    played_ms: int | None
    seq: int | None
    t: float
    #: Inferred by the session (a driver without MARK says nothing of cleared marks).
    inferred: bool = False

    played = False


MarkResult = MarkPlayed | MarkCleared


@dataclass(frozen=True)
class Flushed:
    """What ``FLUSH_MEDIA`` (or a hang-up) left: how much was heard and how much not."""

    reason: str
    #: Media played since the call started, when the queue was flushed.
    played_ms: float
    discarded_ms: float
    cleared_marks: int
    t: float
    #: From the bot's clock (a driver without MARK reports nothing).
    estimated: bool = False


@dataclass(frozen=True)
class Status:
    """``STATUS``: the queue and, on this project's driver, the positions."""

    queue_length: int
    queue_full: bool
    bulk_media: bool
    media_paused: bool
    pending_marks: int | None
    played_ms: int | None
    queued_ms: int | None
    t: float
    fields: dict[str, Any] = field(default_factory=dict)


class Mark:
    """A placed mark: await it (or :meth:`result`) for a :class:`MarkPlayed`
    or :class:`MarkCleared`."""

    def __init__(self, session: MediaSession, mark_id: str, offset: int, serial: int = 0) -> None:
        self.session = session
        self.mark_id = mark_id
        self.serial = serial
        #: Bytes of media the bot had sent before the mark.
        self.offset = offset
        self.sent = time.time()
        self._future: asyncio.Future[MarkResult] = asyncio.get_running_loop().create_future()

    def done(self) -> bool:
        return self._future.done()

    async def result(self, timeout: float | None = None) -> MarkResult:
        """The mark's fate; MediaTimeout, SessionClosed or DriverError if none comes."""
        return await self.session._wait(
            asyncio.shield(self._future), timeout, f"mark {self.mark_id!r}"
        )

    def __await__(self) -> Generator[Any, None, MarkResult]:
        return self.result().__await__()

    def _resolve(self, result: MarkResult) -> None:
        if not self._future.done():
            self._future.set_result(result)

    def _fail(self, error: Exception) -> None:
        if not self._future.done():
            self._future.set_exception(error)
            self._future.exception()  # retrieved: nobody may ever await it

    def __repr__(self) -> str:
        fut = self._future
        state = repr(fut.exception() or fut.result()) if fut.done() else "pending"
        return f"<Mark {self.mark_id!r} at byte {self.offset}: {state}>"


# --- the session ---------------------------------------------------------------------


class MediaSession:
    """One chan_websocket connection; an async context manager."""

    def __init__(
        self,
        connection: object,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        audio_buffer: int = 500,
        on_event: Callable[[Event], None] | None = None,
        flow_control: bool = True,
        name: str | None = None,
    ) -> None:
        """*connection*: the bot's WebSocket, from ``websockets``, Starlette
        (FastAPI) or aiohttp, or a :class:`~astmarks.transport.Transport`
        (see :mod:`astmarks.transport`). *timeout*: the default of every
        await (s). *audio_buffer*: how many of the caller's audio messages
        :meth:`audio` keeps unread (the oldest go first). *on_event*: called
        with every event, as it is read.
        *flow_control*: :meth:`send_audio` waits while Asterisk's queue is
        nearly full (``MEDIA_XOFF`` to ``MEDIA_XON``). *name*: the session's
        name in the log (debug: every command and event), by default the
        start of the connection's id."""
        #: The WebSocket as the bot passed it.
        self.connection: Any = connection
        #: What the session reads and writes it through.
        self.transport: Transport = as_transport(connection)
        self.name = name or self.transport.label
        #: The most media :meth:`send_audio` puts in one message (0: no limit).
        self.max_message = MAX_MESSAGE
        self.timeout = timeout
        self.flow_control = flow_control
        self.on_event = on_event
        self.format = ControlFormat.PLAIN
        self.capabilities: Capabilities | None = None
        #: Bytes of media sent so far.
        self.bytes_sent = 0
        #: The newest position (a report from Asterisk, or the clock's).
        self.position: Position | None = None
        #: Every ERROR Asterisk sent, oldest first.
        self.errors: list[DriverError] = []
        self.close_code: int | None = None
        self.closed = asyncio.Event()
        self._media_start: asyncio.Future[Event] = asyncio.get_running_loop().create_future()
        self._marks: dict[str, Mark] = {}
        self._ids = itertools.count(1)
        # One waiter per GET_STATUS / FLUSH_MEDIA sent, in order: each answer
        # goes to the oldest (commands are answered in order), awaited or not.
        self._statuses: deque[asyncio.Future[Status]] = deque()
        self._flushes: deque[asyncio.Future[Flushed]] = deque()
        self._serial = 0  # marks placed so far
        # Marks placed from this serial on may be refused for the channel's
        # state (direction 'in', passthrough); None: none would be.
        self._refusable_from: int | None = None
        # Bytes sent since the driver's frames last started afresh (a flush
        # discards a partial frame): where the next frame boundary is.
        self._aligned_bytes = 0
        self._bytes_at_report = 0
        self._changed = asyncio.Condition()
        self._reports = 0  # positions reported so far
        self._drained = 0  # QUEUE_DRAINED so far
        self._xoff = False
        # One message on its way at a time: the order on the wire is the
        # order of the bookkeeping (a mark's offset, an answer's place in
        # line), whichever tasks send.
        self._sending = asyncio.Lock()
        self._audio: deque[bytes] = deque(maxlen=audio_buffer)
        self._audio_dropped = 0
        self._reader: asyncio.Task[None] | None = None
        self._opening: asyncio.Future[None] | None = None
        self._probe: asyncio.Task[bool] | None = None
        # The clock: when what was sent so far will have played (time.time()).
        self._play_end = 0.0
        #: Media sent but never played: flushed, or dropped by a full queue (ms).
        self._lost_ms = 0.0

    # --- lifetime --------------------------------------------------------------------

    async def __aenter__(self) -> MediaSession:
        self.start()
        # Open (a Starlette WebSocket: accepted) before the bot sends; if it
        # fails, the reader says how and the session is closed.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._open()), self.timeout)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _open(self) -> asyncio.Future[None]:
        """The transport's :meth:`~astmarks.transport.Transport.open`, once."""
        if self._opening is None:
            self._opening = asyncio.ensure_future(self.transport.open())
        return self._opening

    def start(self) -> None:
        """Start reading the connection in a task (``async with`` does it)."""
        if self._reader is None:
            self._reader = asyncio.create_task(self.run(), name="astmarks-reader")

    async def aclose(self) -> None:
        """Close the connection and stop reading; whatever still waits gets SessionClosed."""
        with contextlib.suppress(Exception):
            await self.transport.close()
        if self._reader is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._reader), 2.0)
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        self._closed_down()
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError  # the caller's own cancellation, not swallowed

    async def wait_closed(self, timeout: float | None = None) -> None:
        """Until the connection closes (the call ends)."""
        await self._wait(self.closed.wait(), timeout, "the end of the call", closing=False)

    # --- waiting ---------------------------------------------------------------------

    async def _wait(
        self, awaitable: Awaitable[T], timeout: float | None, what: str, *, closing: bool = True
    ) -> T:
        """*awaitable*, or MediaTimeout after *timeout*, or SessionClosed (if *closing*)."""
        timeout = self.timeout if timeout is None else timeout
        waiter = asyncio.ensure_future(awaitable)
        waiters: set[asyncio.Future[Any]] = {waiter}
        closed = asyncio.ensure_future(self.closed.wait()) if closing else None
        if closed is not None:
            waiters.add(closed)
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for fut in waiters:
                if not fut.done():
                    fut.cancel()
        if waiter in done:
            return waiter.result()
        if closed is not None and closed in done:
            raise SessionClosed(f"the call ended (code {self.close_code}) before {what}")
        raise MediaTimeout(f"no {what} within {timeout:.1f} s")

    # --- reading ---------------------------------------------------------------------

    async def run(self) -> None:
        """Read the connection until it closes (:meth:`start` runs this in a task;
        a bot may instead run it itself)."""
        ended: int | None = None
        try:
            await asyncio.shield(self._open())
            while True:
                message = await self.transport.receive()
                if isinstance(message, str):
                    self._on_text(message)
                else:
                    self._on_audio(bytes(message))
                async with self._changed:
                    self._changed.notify_all()
        except TransportClosed as exc:
            ended = exc.code
        except Exception:
            log.exception("astmarks: reading the connection failed; the session ends")
        finally:
            code = self.transport.close_code
            self.close_code = code if code is not None else ended
            self._closed_down()
            async with self._changed:
                self._changed.notify_all()

    def _closed_down(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        error = SessionClosed(f"the call ended (code {self.close_code})")
        for mark in self._marks.values():
            mark._fail(error)
        futures: list[asyncio.Future[Any]] = [*self._statuses, *self._flushes, self._media_start]
        for fut in futures:
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: nobody may be waiting

    def _on_audio(self, data: bytes) -> None:
        if len(self._audio) == self._audio.maxlen:
            self._audio_dropped += 1
            if self._audio_dropped == 1:
                log.warning("astmarks: the caller's audio is not being read; dropping the oldest")
        self._audio.append(data)

    def _on_text(self, text: str) -> None:
        log.debug("session %s: <- %s", self.name, text)
        try:
            event = parse_event(text, t=time.time(), mono=time.monotonic())
        except ProtocolError as exc:
            log.warning("astmarks: %s", exc)
            return
        self._handle(event)

    def _handle(self, event: Event) -> None:
        """Act on one event: resolve what waits for it, then ``on_event``."""
        try:
            self._dispatch(event)
        except (KeyError, ProtocolError) as exc:
            log.warning("astmarks: %s without a valid %s", event.name, exc)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:
                log.exception("astmarks: the on_event callback failed on %s", event.name)

    def _dispatch(self, event: Event) -> None:
        name = event.name
        if name == "MEDIA_START":
            self.format = event.format
            if not self._media_start.done():
                self._media_start.set_result(event)
        elif name in MARK_REACHED_EVENTS and "played_ms" in event.fields:
            # MARK_MEDIA in mark positions mode (what the session places), or MARK.
            mark_id = event.mark_id or ""
            self._report(event)
            if name == "MARK_PLAYED" or mark_id in self._marks:
                self._settle(
                    mark_id,
                    MarkPlayed(
                        mark_id,
                        event.get_int("played_ms"),
                        event.get_int("queued_ms"),
                        event.get_int("seq"),
                        event.t,
                    ),
                )
        elif name == "MEDIA_MARK_PROCESSED":
            mark_id = event.get_str("correlation_id")
            if mark_id in self._marks:  # one of ours (the fallback), not the app's own
                self._settle(mark_id, MarkPlayed(mark_id, None, None, None, event.t))
        elif name in MARK_CLEARED_EVENTS:
            mark_id = event.mark_id or ""
            played = event.get_int("played_ms")
            self._settle(
                mark_id,
                MarkCleared(
                    mark_id, event.get_str("reason"), played, event.get_int("seq"), event.t
                ),
            )
        elif name == "MEDIA_FLUSHED":
            flushed = Flushed(
                event.get_str("reason"),
                event.get_int("played_ms"),
                event.get_int("discarded_ms"),
                event.get_int("cleared_marks"),
                event.t,
            )
            self._set_position(Position(flushed.played_ms, 0.0, event.t))
            if flushed.reason == "flush" and self._flushes:
                fut = self._flushes.popleft()
                if not fut.done():
                    fut.set_result(flushed)
        elif name == "MEDIA_PROGRESS":
            self._report(event)
        elif name == "STATUS":
            self._on_status(event)
        elif name == "QUEUE_DRAINED":
            self._drained += 1
        elif name == "MEDIA_XOFF":
            self._xoff = True
        elif name == "MEDIA_XON":
            self._xoff = False
        elif name == "ERROR":
            self._on_error(event)

    def _report(self, event: Event) -> None:
        self._set_position(
            Position(event.get_int("played_ms"), event.get_int("queued_ms"), event.t)
        )

    def _set_position(self, position: Position) -> None:
        self.position = position
        self._bytes_at_report = self.bytes_sent
        self._reports += 1

    def _settle(self, mark_id: str, result: MarkResult) -> None:
        mark = self._marks.pop(mark_id, None)
        if mark is not None:
            mark._resolve(result)

    def _on_status(self, event: Event) -> None:
        opted = "pending_marks" in event.fields
        status = Status(
            event.get_int("queue_length"),
            event.get_bool("queue_full"),
            event.get_bool("bulk_media"),
            event.get_bool("media_paused"),
            event.get_int("pending_marks") if opted else None,
            event.get_int("played_ms") if opted else None,
            event.get_int("queued_ms") if opted else None,
            event.t,
            dict(event.fields),
        )
        if status.played_ms is not None and status.queued_ms is not None:
            self._set_position(Position(status.played_ms, status.queued_ms, event.t))
        if self._statuses:
            fut = self._statuses.popleft()
            if not fut.done():
                fut.set_result(status)

    def _on_error(self, event: Event) -> None:
        text = str(event.get("error_text", event.raw))
        error = DriverError(text, event)
        self.errors.append(error)
        log.warning("astmarks: Asterisk says: %s", text)
        # "MARK 'id' ...": the mark was not placed.
        match = re.match(r"(?:MARK|MARK_MEDIA) '([!-~]{1,64})'", text)
        if match and match.group(1) in self._marks:
            self._marks.pop(match.group(1))._fail(error)
        elif re.match(r"(?:MARK|MARK_MEDIA) not supported", text) and self._marks:
            # Refused for the channel's state (direction 'in', passthrough):
            # the oldest mark placed since that state began (commands are
            # answered in order), else the newest.
            since = self._refusable_from
            refused = [m for m in self._marks.values() if since is not None and m.serial >= since]
            mark = refused[0] if refused else next(reversed(self._marks.values()))
            self._marks.pop(mark.mark_id)._fail(error)
        dropped = re.match(r"Media queue full: dropped (\d+) bytes", text)
        if dropped:
            nbytes = int(dropped.group(1))
            ms = nbytes / self._bytes_per_ms()
            self._lost_ms += ms
            self._play_end -= ms / 1000  # never queued, so never played
            self._aligned_bytes = max(0, self._aligned_bytes - nbytes)

    # --- starting --------------------------------------------------------------------

    async def started(self, timeout: float | None = None) -> Capabilities:
        """``MEDIA_START`` and whether the driver has ``MARK`` (asked once).

        Asking sends ``REPORT_MARK_POSITIONS`` (the opt-in to mark positions
        mode) and ``GET_STATUS``: a driver with the mode answers with
        positions. A driver without says nothing of the first
        and answers the second as always; the session then falls back, and
        says so once in the log.
        """
        if self.capabilities is not None:
            return self.capabilities
        event = await self._wait(
            asyncio.shield(self._media_start), timeout, "MEDIA_START", closing=False
        )
        if self._probe is None:
            self._probe = asyncio.create_task(self._probe_marks(timeout))
        try:
            marks = await asyncio.shield(self._probe)
        except BaseException:
            if self._probe.done():
                self._probe = None  # ask again next time
            raise
        if self.capabilities is None:
            self.capabilities = Capabilities(
                channel=str(event.get("channel", "")),
                channel_id=str(event.get("channel_id", "")),
                connection_id=str(event.get("connection_id", "")),
                codec=str(event.get("format", "ulaw")),
                optimal_frame_size=event.get_int("optimal_frame_size")
                if "optimal_frame_size" in event.fields
                else 160,
                ptime=event.get_int("ptime") if "ptime" in event.fields else 20,
                control_format=event.format,
                marks=marks,
                fields=dict(event.fields),
            )
            if not marks and str(event.get("passthrough", "")).lower() == "true":
                # Without mark positions mode a driver may refuse MARK_MEDIA
                # in passthrough mode; in the mode it takes it there too.
                self._refusable_from = 0
            if marks:
                log.info(
                    "astmarks: mark positions mode: MARK_MEDIA is answered in the tick "
                    "that hands its audio over, with positions"
                )
            elif any(str(e).startswith(JSON_ONLY_MODE) for e in self.errors):
                # A driver whose mode is JSON only (upstream's form of it).
                log.warning(
                    "astmarks: this Asterisk offers mark positions mode in the JSON control "
                    "message format only (dial with f(json)): MARK_MEDIA is acknowledged one "
                    "ptime late, without positions, and positions come from a clock"
                )
            else:
                log.warning(
                    "astmarks: this Asterisk's chan_websocket has no mark positions mode: "
                    "MARK_MEDIA is acknowledged one ptime late, without positions, and "
                    "positions come from a clock"
                )
        return self.capabilities

    async def _probe_marks(self, timeout: float | None) -> bool:
        await self.command("REPORT_MARK_POSITIONS")
        status = await self.status(timeout)
        return status.pending_marks is not None

    @property
    def marks(self) -> bool:
        """The driver has mark positions mode (known once :meth:`started` returned)."""
        return self.capabilities is not None and self.capabilities.marks

    def _need_started(self) -> Capabilities:
        if self.capabilities is None:
            raise RuntimeError("await session.started() first")
        return self.capabilities

    # --- sending ---------------------------------------------------------------------

    async def command(self, name: str, argument: str | int | None = None, **extra: Any) -> None:
        """Send any command, in the connection's control format (no answer
        awaited). A ``GET_STATUS`` or ``FLUSH_MEDIA`` sent this way takes its
        answer, as those of :meth:`status` and :meth:`flush` do theirs."""
        await self._command(name, argument, **extra)

    async def _command(
        self,
        name: str,
        argument: str | int | None = None,
        _before: Callable[[], None] | None = None,
        _after: Callable[[], None] | None = None,
        **extra: Any,
    ) -> asyncio.Future[Any] | None:
        """Send a command; the future its answer resolves, for those answered.
        *_before* and *_after* run just before and after it goes on the wire,
        no other message between."""
        text = format_command(self.format, name, argument, **extra)
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] | None = None

        def book() -> None:
            nonlocal answer
            if _before is not None:
                _before()
            if name == "GET_STATUS":
                answer = loop.create_future()
                self._statuses.append(answer)
            elif name == "FLUSH_MEDIA" and self.marks:  # opted in: MEDIA_FLUSHED comes
                answer = loop.create_future()
                self._flushes.append(answer)
            elif name == "SET_MEDIA_DIRECTION":
                direction = extra.get("direction", argument)
                self._refusable_from = self._serial if direction == "in" else None

        try:
            await self._send(text, before=book, after=_after)
        except BaseException:
            for queue in (self._statuses, self._flushes):
                if answer in queue:
                    queue.remove(answer)  # type: ignore[arg-type]
            raise
        return answer

    async def _send(
        self,
        message: str | bytes,
        before: Callable[[], None] | None = None,
        after: Callable[[], None] | None = None,
    ) -> None:
        """Send one message, *before* and *after* run next to it on the wire."""
        if self.closed.is_set():
            raise SessionClosed(f"the call ended (code {self.close_code})")
        try:
            async with asyncio.timeout(self.timeout):
                await asyncio.shield(self._open())
                async with self._sending:
                    if self.closed.is_set():
                        raise SessionClosed(f"the call ended (code {self.close_code})")
                    if before is not None:
                        before()
                    if isinstance(message, str):
                        log.debug("session %s: -> %s", self.name, message)
                    await self.transport.send(message)
                    if after is not None:
                        after()
        except TimeoutError:
            raise MediaTimeout(
                f"sending did not complete within {self.timeout:.1f} s: the connection is stuck"
            ) from None
        except TransportClosed as exc:
            raise SessionClosed(f"the call ended while sending: {exc}") from exc

    async def answer(self) -> None:
        """``ANSWER``: answer the channel (dialled with the ``n`` option)."""
        await self.command("ANSWER")

    async def hangup(self, timeout: float | None = None) -> None:
        """``HANGUP``, and wait for the call to end. Pending marks are cleared
        first (``MarkCleared`` with reason ``hangup``) on this project's driver."""
        await self.command("HANGUP")
        await self.wait_closed(timeout)

    async def send_audio(self, data: bytes, timeout: float | None = None) -> None:
        """Send media. While Asterisk says its queue is nearly full
        (``MEDIA_XOFF``), wait for ``MEDIA_XON`` first. More than fits in one
        WebSocket message Asterisk accepts (:data:`MAX_MESSAGE`) goes in
        several, split at frame boundaries. Await :meth:`started` before the
        first audio, so that the mode is on: before it, Asterisk drops the end
        of a message that is not a whole number of frames."""
        if self._xoff and self.flow_control:
            await self._wait(self._until(lambda: not self._xoff), timeout, "MEDIA_XON")
        frame = self.capabilities.optimal_frame_size if self.capabilities is not None else 160
        step = max(frame, self.max_message // frame * frame) if self.max_message else len(data)
        for at in range(0, len(data), max(step, 1)):
            piece = data[at : at + step]
            await self._send(piece, after=functools.partial(self._count_sent, len(piece)))

    def _count_sent(self, size: int) -> None:
        self.bytes_sent += size
        self._aligned_bytes += size
        now = time.time()
        self._play_end = max(self._play_end, now) + size / self._bytes_per_ms() / 1000

    @property
    def partial_frame_bytes(self) -> int:
        """Bytes of a frame begun and not completed by the media sent so far
        (the driver keeps them until the rest comes, or plays them alone when
        nothing else is queued)."""
        frame = self.capabilities.optimal_frame_size if self.capabilities is not None else 160
        return self._aligned_bytes % frame

    def _bytes_per_ms(self) -> float:
        return self.capabilities.bytes_per_ms if self.capabilities is not None else 8.0

    async def _until(self, condition: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(condition)

    async def mark(self, mark_id: str | None = None) -> Mark:
        """Place a mark after the media sent so far (by any task: its
        ``offset`` is the media before it on the wire); await the
        :class:`Mark` for its result. *mark_id*: 1 to 64 visible ASCII characters (one is
        made up if not given); ValueError if it is not one, or is pending."""
        self._need_started()
        if mark_id is None:
            mark_id = f"astm-{next(self._ids)}"
        if not MARK_ID.fullmatch(mark_id):
            raise ValueError(f"a mark id is 1 to 64 visible ASCII characters: {mark_id!r}")
        if mark_id in self._marks:
            raise ValueError(f"mark {mark_id!r} is already pending")
        placed: list[Mark] = []

        def place() -> None:
            # Here, next to the MARK on the wire: the media sent before it
            # is all counted, even what another task was sending.
            if mark_id in self._marks:
                raise ValueError(f"mark {mark_id!r} is already pending")
            mark = Mark(self, mark_id, self.bytes_sent, self._serial)
            self._serial += 1
            self._marks[mark_id] = mark
            placed.append(mark)

        try:
            # MARK_MEDIA either way: in mark positions mode it is answered in
            # the tick that hands its audio over, with positions; without the
            # mode, one ptime late, and the clock gives the positions.
            await self._command("MARK_MEDIA", mark_id, _before=place)
        except SessionClosed as exc:
            for mark in placed:
                self._marks.pop(mark_id, None)
                mark._fail(exc)
            raise
        return placed[0]

    @property
    def pending_marks(self) -> list[Mark]:
        """Marks placed and not yet answered, oldest first."""
        return list(self._marks.values())

    async def flush(self, timeout: float | None = None) -> Flushed:
        """Discard the queued media and pending marks (barge-in): what was played.

        On this project's driver, ``MEDIA_FLUSHED`` tells exactly; pending
        marks get ``MARK_CLEARED`` first. Without it, the clock estimates and
        pending marks are cleared by the session (``inferred``).
        """
        caps = self._need_started()
        # The clock's view when FLUSH_MEDIA goes on the wire, no media after it.
        at: dict[str, float] = {}

        def flushing() -> None:
            now = at["now"] = time.time()
            at["played"] = self.clock_played_ms(now)
            at["discarded"] = max(0.0, self._play_end - now) * 1000
            at["played_bytes"] = self.bytes_sent - at["discarded"] * self._bytes_per_ms()
            self._clock_flushed(at["discarded"])

        answer = await self._command("FLUSH_MEDIA", _after=flushing)
        if caps.marks:
            assert answer is not None
            result_: Flushed = await self._wait(asyncio.shield(answer), timeout, "MEDIA_FLUSHED")
            return result_
        now = at["now"]
        for mark in list(self._marks.values()):
            # Its media played by the clock: MEDIA_MARK_PROCESSED was on its
            # way (a ptime late), and the flush took it.
            result: MarkResult = (
                MarkPlayed(mark.mark_id, None, None, None, now, inferred=True)
                if mark.offset <= at["played_bytes"]
                else MarkCleared(mark.mark_id, "flush", None, None, now, inferred=True)
            )
            self._settle(mark.mark_id, result)
        flushed = Flushed("flush", at["played"], at["discarded"], 0, now, estimated=True)
        self._set_position(Position(at["played"], 0.0, now, estimated=True))
        return flushed

    def _clock_flushed(self, discarded_ms: float) -> None:
        self._lost_ms += discarded_ms
        self._play_end = 0.0
        self._aligned_bytes = 0  # a partial frame is discarded too

    async def status(self, timeout: float | None = None) -> Status:
        """``GET_STATUS``, and the ``STATUS`` that answers it."""
        answer = await self._command("GET_STATUS")
        assert answer is not None
        status: Status = await self._wait(asyncio.shield(answer), timeout, "STATUS")
        return status

    async def round_trip(self, timeout: float | None = None) -> float:
        """Seconds from sending ``GET_STATUS`` to reading its ``STATUS``."""
        sent = time.time()
        status = await self.status(timeout)
        return max(0.0, status.t - sent)

    async def report_progress(self, interval_ms: int) -> None:
        """Ask for ``MEDIA_PROGRESS`` every *interval_ms* of media played (0: stop).
        ValueError outside 0 or 20..60000; RuntimeError on a driver without MARK."""
        if interval_ms != 0 and not 20 <= interval_ms <= 60000:
            raise ValueError(f"interval_ms is 0 (off) or 20 to 60000: {interval_ms}")
        if not self._need_started().marks:
            raise RuntimeError("this Asterisk's chan_websocket has no REPORT_PROGRESS")
        await self.command("REPORT_PROGRESS", interval_ms)

    async def next_position(self, timeout: float | None = None) -> Position:
        """The next position Asterisk reports (a mark played, progress, a flush)."""
        seen = self._reports
        await self._wait(self._until(lambda: self._reports > seen), timeout, "position report")
        assert self.position is not None
        return self.position

    async def queue_drained(self, timeout: float | None = None) -> None:
        """``REPORT_QUEUE_DRAINED``, and its ``QUEUE_DRAINED`` (the queue ran dry)."""
        seen = self._drained
        await self.command("REPORT_QUEUE_DRAINED")
        await self._wait(self._until(lambda: self._drained > seen), timeout, "QUEUE_DRAINED")

    # --- the caller's audio, and the clock -------------------------------------------

    async def audio(self) -> AsyncIterator[bytes]:
        """The caller's audio, message by message, until the call ends."""
        while True:
            while self._audio:
                yield self._audio.popleft()
            if self.closed.is_set():
                return
            await self._until(lambda: bool(self._audio) or self.closed.is_set())

    def clock_played_ms(self, now: float | None = None) -> float:
        """Media played since the call started, by the clock alone (ms): what a
        bot without marks knows. It assumes playing starts as the media is sent."""
        now = time.time() if now is None else now
        sent_ms = self.bytes_sent / self._bytes_per_ms() - self._lost_ms
        return max(0.0, sent_ms - max(0.0, self._play_end - now) * 1000)

    def played_ms(self, now: float | None = None) -> float:
        """Media played since the call started, now (ms): the newest report moved
        on by the time since (at most what was queued then); the clock without
        reports."""
        now = time.time() if now is None else now
        pos = self.position
        if pos is None or pos.estimated or not self.marks:
            return self.clock_played_ms(now)
        # What was queued then, and what was sent since, plays on.
        sent_since = (self.bytes_sent - self._bytes_at_report) / self._bytes_per_ms()
        return pos.played_ms + min(pos.queued_ms + sent_since, max(0.0, now - pos.t) * 1000)
