"""The WebSocket bot that Asterisk dials with ``Dial(WebSocket/bot/...)``.

A ``websockets`` server on a free loopback port. Each connection from
chan_websocket becomes a :class:`BotSession`: it records every event with its
arrival time and the caller's audio, and sends audio and commands. A bot can
also connect in to Asterisk (:meth:`BotServer.connect_in`, for
``WebSocket/INCOMING`` channels); its session is the same.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.client import connect
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import InvalidHandshake

from astmarks.protocol import Event, ProtocolError, parse_event
from astmarks.server import SUBPROTOCOL
from astmarks.session import MediaSession
from harness.ports import LOOPBACK
from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)


class BotError(RuntimeError):
    """The bot did not get what it waited for."""


@dataclass(frozen=True)
class ReceivedAudio:
    """One binary message from Asterisk (the caller's audio)."""

    data: bytes
    t: float


class BotSession(MediaSession):
    """One chan_websocket connection, from MEDIA_START to close, recorded.

    The library's :class:`~astmarks.session.MediaSession` (a pacer or a test
    can use its API), which also keeps every event and message with its
    arrival time, and sends anything, valid or not. It never waits for
    ``MEDIA_XON`` before sending audio (tests overflow the queue on purpose)
    nor splits a message too large for Asterisk (tests send one on purpose).
    """

    #: The ``websockets`` connection itself: tests reach into it.
    connection: Connection

    def __init__(self, connection: Connection, tag: str | None = None) -> None:
        """*tag*: the call's tag, where the URI has none (a bot that connected in)."""
        request = connection.request
        path = request.path if request is not None else "/"
        self.path = path
        self.params: dict[str, str] = {k: v[-1] for k, v in parse_qs(urlsplit(path).query).items()}
        if tag is not None:
            self.params["call"] = tag
        super().__init__(
            connection, timeout=units(10), flow_control=False, name=self.params.get("call")
        )
        self.max_message = 0  # a test sends what it means to, too large or not
        self.events: list[Event] = []
        #: Every TEXT message as it arrived, parsed or not.
        self.texts: list[str] = []
        self.audio_in: list[ReceivedAudio] = []
        self.protocol_errors: list[str] = []
        #: Whether the driver has MARK, once :meth:`probe_marks` has asked.
        self.marks_supported: bool | None = None

    @property
    def tag(self) -> str | None:
        """The ``call`` URI parameter (the harness's per-call tag), if any."""
        return self.params.get("call")

    @property
    def media_start(self) -> Event | None:
        return next((e for e in self.events if e.name == "MEDIA_START"), None)

    # --- receiving -------------------------------------------------------------------

    def _on_text(self, text: str) -> None:
        t, mono = time.time(), time.monotonic()
        self.texts.append(text)
        try:
            event = parse_event(text, t=t, mono=mono)
        except ProtocolError as exc:
            log.warning("bot: %s", exc)
            self.protocol_errors.append(str(exc))
            return
        event = Event(
            name=event.name,
            fields=event.fields,
            raw=event.raw,
            format=event.format,
            t=t,
            mono=mono,
            index=len(self.events),
        )
        log.debug("session %s: <- %s", self.name, text)
        self.events.append(event)
        self._handle(event)

    def _on_audio(self, data: bytes) -> None:
        self.audio_in.append(ReceivedAudio(data, time.time()))

    async def run(self) -> None:
        await super().run()
        log.debug("bot: session %s closed (code %s)", self.tag, self.close_code)

    # --- waiting ----------------------------------------------------------------------

    async def wait_for(
        self,
        name: str | tuple[str, ...],
        where: Callable[[Event], bool] | None = None,
        *,
        after: int = -1,
        timeout: float | None = None,
    ) -> Event:
        """The first event named *name* (and matching *where*) with index > *after*.

        Raises BotError if the connection closes or *timeout* passes first.
        """
        names = (name,) if isinstance(name, str) else name
        timeout = units(10) if timeout is None else timeout

        def find() -> Event | None:
            for event in self.events[after + 1 :]:
                if event.name in names and (where is None or where(event)):
                    return event
            return None

        async def wait() -> Event:
            async with self._changed:
                while True:
                    found = find()
                    if found is not None:
                        return found
                    if self.closed.is_set():
                        raise BotError(
                            f"connection closed (code {self.close_code}) before "
                            f"{'/'.join(names)}; events: {self.summary()}"
                        )
                    await self._changed.wait()

        try:
            return await asyncio.wait_for(wait(), timeout)
        except TimeoutError:
            raise BotError(
                f"no {'/'.join(names)} within {timeout:.1f} s; events: {self.summary()}"
            ) from None

    async def wait_mark(
        self,
        mark_id: str,
        names: tuple[str, ...] = ("MARK_PLAYED", "MEDIA_MARK_PROCESSED"),
        *,
        timeout: float | None = None,
    ) -> Event:
        """The acknowledgment (any of *names*) of the mark *mark_id*."""
        return await self.wait_for(names, lambda e: e.mark_id == mark_id, timeout=timeout)

    async def wait_closed(self, timeout: float | None = None) -> None:
        timeout = units(10) if timeout is None else timeout
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            raise BotError(f"connection still open after {timeout:.1f} s") from None

    def event_names(self) -> list[str]:
        return [e.name for e in self.events]

    def summary(self, limit: int = 12) -> str:
        """The events so far, short enough for an error message: the first few
        by name, then how many of each name in all."""
        names = self.event_names()
        head = ", ".join(names[:limit]) + (", ..." if len(names) > limit else "")
        counts = ", ".join(f"{n} x{c}" for n, c in collections.Counter(names).items())
        return f"[{head}] ({len(names)} events: {counts})"

    def named(self, *names: str) -> list[Event]:
        """Every received event with one of *names*, in arrival order."""
        return [e for e in self.events if e.name in names]

    # --- sending ----------------------------------------------------------------------

    async def send_text(self, text: str) -> None:
        """Send one raw TEXT message (for commands the helpers do not cover)."""
        log.debug("session %s: -> %s", self.name, text)
        await self.connection.send(text)

    async def send_raw_text(self, data: bytes) -> None:
        """Send *data* as a TEXT message as it is, valid UTF-8 or not (as a broken bot might)."""
        log.debug("session %s: -> %r (raw)", self.name, data)
        await self.connection.send(data, text=True)

    async def get_status(self, timeout: float | None = None) -> Event:
        """Send ``GET_STATUS`` and return the ``STATUS`` that answers it.

        Commands are answered in order, so once it is back, Asterisk has read
        everything sent before it.
        """
        after = len(self.events) - 1
        await self.command("GET_STATUS")
        return await self.wait_for("STATUS", after=after, timeout=timeout)

    async def probe_marks(self, timeout: float | None = None) -> bool:
        """Whether the driver has mark positions mode (and MARK); asked once.

        Sends ``REPORT_MARK_POSITIONS`` (the opt-in to the mode) and
        ``GET_STATUS``. A driver with the mode answers with a ``STATUS`` that
        carries ``pending_marks``; one without ignores the unknown command and
        answers with upstream's ``STATUS``. Either way nothing else is sent, so
        this works at any point in a call.
        """
        if self.marks_supported is None:
            after = len(self.events) - 1
            await self.command("REPORT_MARK_POSITIONS")
            await self.command("GET_STATUS")
            status = await self.wait_for("STATUS", after=after, timeout=timeout)
            self.marks_supported = "pending_marks" in status.fields
        return self.marks_supported

    def pause_reading(self) -> None:
        """Stop reading from the connection, as a stuck bot would.

        What Asterisk sends piles up in the TCP buffers and then in Asterisk.
        Commands and audio can still be sent.
        """
        log.info("bot %s: stops reading", self.tag)
        self.connection.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read again after :meth:`pause_reading`."""
        log.info("bot %s: reads again", self.tag)
        self.connection.transport.resume_reading()

    async def close(self) -> None:
        await self.connection.close()


class BotServer(Service):
    """The WebSocket server; an async context manager.

    ``uri`` is what websocket_client.conf points Asterisk at.
    """

    def __init__(
        self,
        host: str = LOOPBACK,
        port: int = 0,
        *,
        on_session: Callable[[BotSession], Coroutine[Any, Any, None]] | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """*sock*, if given, is a listening socket on *host* to serve on (one made in
        another network namespace, say)."""
        self.host = host
        self._port = port
        self._sock = sock
        self._server: Server | None = None
        self._pending: dict[str | None, asyncio.Queue[BotSession]] = {}
        self._on_session = on_session
        self.sessions: list[BotSession] = []
        #: Sessions of connections the bot opened (connect_in), running.
        self._outgoing: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        if self._server is None:
            raise BotError("bot server is not running")
        sockets = list(self._server.sockets)
        port: int = sockets[0].getsockname()[1]
        return port

    @property
    def uri(self) -> str:
        return f"ws://{self.host}:{self.port}/media"

    def _queue(self, tag: str | None) -> asyncio.Queue[BotSession]:
        return self._pending.setdefault(tag, asyncio.Queue())

    async def _handler(self, connection: ServerConnection) -> None:
        session = BotSession(connection)
        log.info("bot: connection from %s (%s)", connection.remote_address, session.path)
        await self._serve(session)

    async def connect_in(
        self, uri: str, tag: str | None = None, timeout: float | None = None
    ) -> None:
        """Connect to Asterisk at *uri* (``ws://host:port/media/<connection_id>``),
        as a bot does for a ``WebSocket/INCOMING`` channel; the session is then
        served, or accepted under *tag*, like one Asterisk opened. Raises
        BotError if Asterisk refuses or does not answer within *timeout*."""
        timeout = units(10) if timeout is None else timeout
        try:
            connection = await asyncio.wait_for(
                connect(
                    uri,
                    subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
                    max_size=None,
                    ping_interval=None,
                    compression=None,
                    open_timeout=None,
                ),
                timeout,
            )
        except TimeoutError:
            raise BotError(f"cannot connect in to {uri}: no answer in {timeout:.1f} s") from None
        except (OSError, InvalidHandshake) as exc:
            raise BotError(f"cannot connect in to {uri}: {exc}") from None
        log.info("bot: connected in to %s (call %s)", uri, tag)
        task = asyncio.create_task(self._serve_outgoing(BotSession(connection, tag=tag)))
        self._outgoing.add(task)
        task.add_done_callback(self._outgoing.discard)

    async def _serve_outgoing(self, session: BotSession) -> None:
        try:
            await self._serve(session)
        finally:
            await session.connection.close()

    async def _serve(self, session: BotSession) -> None:
        """Record *session* until it closes; hand it to accept() or run the bot on it."""
        self.sessions.append(session)
        if self._on_session is None:
            self._queue(session.tag).put_nowait(session)
            await session.run()
            return
        # A serving bot: its handler runs beside the receiving loop and ends with it.
        handler = asyncio.create_task(self._on_session(session))
        try:
            await session.run()
        finally:
            handler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await handler
            self.sessions.remove(session)

    async def start(self) -> None:
        where: dict[str, Any] = (
            {"sock": self._sock}
            if self._sock is not None
            else {"host": self.host, "port": self._port}
        )
        self._server = await serve(
            self._handler,
            **where,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=None,
            ping_interval=None,
            compression=None,
        )
        log.info("bot: listening on %s", self.uri)

    def set_receive_buffer(self, size: int) -> None:
        """Give the connections accepted from now on a TCP receive buffer of *size*
        bytes (Linux lets it grow to megabytes), so that what a bot that stops
        reading leaves unread fills Asterisk's side after kilobytes."""
        if self._server is None:
            raise BotError("bot server is not running")
        for sock in self._server.sockets:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)

    async def accept(self, tag: str | None = None, timeout: float | None = None) -> BotSession:
        """The next session (for *tag*, if given) once its MEDIA_START arrived."""
        timeout = units(10) if timeout is None else timeout
        try:
            session = await asyncio.wait_for(self._queue(tag).get(), timeout)
        except TimeoutError:
            raise BotError(
                f"Asterisk did not connect to the bot (call {tag}) within {timeout:.1f} s"
            ) from None
        await session.wait_for("MEDIA_START", timeout=timeout)
        return session

    async def stop(self) -> None:
        for task in list(self._outgoing):
            task.cancel()
        await asyncio.gather(*self._outgoing, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
