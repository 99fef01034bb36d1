"""The WebSocket under a session, from whichever library the bot uses.

:class:`~astmarks.session.MediaSession` reads and writes through a
:class:`Transport`; :func:`as_transport` picks one for the object the bot
hands it:

- a ``websockets`` connection (server or client, new or legacy API);
- a Starlette WebSocket, which is what a FastAPI endpoint gets: accepted by
  the session with chan_websocket's ``media`` subprotocol if the endpoint has
  not accepted it yet;
- an aiohttp WebSocket (``web.WebSocketResponse`` prepared with
  ``protocols=("media",)``, or the client's ``ClientWebSocketResponse``).

A connection that drops without a close frame ends with close code 1006
(uvicorn says 1005). Anything else works once wrapped in a subclass of
:class:`Transport`; :func:`as_transport` refuses what it does not know with a
TypeError (a synchronous connection among them). The library imports none
of these frameworks (it recognises their WebSockets among the modules the bot
imported): it still needs only ``websockets``.
"""

from __future__ import annotations

import abc
import logging
import sys
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

if TYPE_CHECKING:  # the frameworks are the bot's, not the library's dependencies
    from aiohttp.client_ws import ClientWebSocketResponse
    from aiohttp.web_ws import WebSocketResponse
    from starlette.websockets import WebSocket as StarletteWebSocket

    AiohttpWebSocket = WebSocketResponse | ClientWebSocketResponse

log = logging.getLogger(__name__)

#: chan_websocket's WebSocket subprotocol.
SUBPROTOCOL = "media"


class TransportClosed(Exception):
    """The WebSocket is closed: the call ended, or the connection failed."""

    def __init__(self, code: int | None = None, reason: str = "") -> None:
        super().__init__(f"closed (code {code}){': ' + reason if reason else ''}")
        self.code = code
        self.reason = reason


class Transport(abc.ABC):
    """A WebSocket as a session needs it: whole messages in and out, text as
    ``str`` and media as ``bytes``, and the end of the connection as
    :class:`TransportClosed`."""

    @property
    def close_code(self) -> int | None:
        """The close code, once the connection is closed and if it is known."""
        return None

    @property
    def label(self) -> str:
        """A short name for the connection in the log."""
        return f"{id(self):x}"[-8:]

    async def open(self) -> None:  # noqa: B027 - most transports are open already
        """Called once, before the first :meth:`receive`."""

    @abc.abstractmethod
    async def receive(self) -> str | bytes:
        """The next message; :class:`TransportClosed` when there is none to come."""

    @abc.abstractmethod
    async def send(self, message: str | bytes) -> None:
        """Send one message; :class:`TransportClosed` if the connection is closed."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Close the connection (normal closure); nothing if it is closed."""


class WebsocketsTransport(Transport):
    """A ``websockets`` connection (``websockets.asyncio`` or the legacy API)."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    @property
    def label(self) -> str:
        ident = getattr(self.connection, "id", None)
        return ident.hex[:8] if ident is not None else super().label

    @property
    def close_code(self) -> int | None:
        code: int | None = getattr(self.connection, "close_code", None)
        return code

    async def receive(self) -> str | bytes:
        try:
            message: str | bytes = await self.connection.recv()
        except ConnectionClosed as exc:
            raise TransportClosed(self.close_code, str(exc)) from exc
        return message

    async def send(self, message: str | bytes) -> None:
        try:
            await self.connection.send(message)
        except ConnectionClosed as exc:
            raise TransportClosed(self.close_code, str(exc)) from exc

    async def close(self) -> None:
        await self.connection.close()


class StarletteTransport(Transport):
    """A Starlette WebSocket: what a FastAPI ``@app.websocket`` endpoint gets.

    :meth:`open` accepts it (with the ``media`` subprotocol when Asterisk asks
    for it, as it does) unless the endpoint did already; the session opens
    its transport before anything is sent.
    """

    def __init__(self, websocket: StarletteWebSocket) -> None:
        self.websocket = websocket
        self._close_code: int | None = None

    @property
    def close_code(self) -> int | None:
        return self._close_code

    @property
    def label(self) -> str:
        client = self.websocket.client
        return f"{client.host}:{client.port}" if client else super().label

    def _closed(self, code: int | None, why: object) -> TransportClosed:
        if self._close_code is None:  # the first code says what happened
            self._close_code = code
        return TransportClosed(self._close_code, str(why))

    def _disconnected(self) -> bool:
        return "DISCONNECTED" in (
            self.websocket.client_state.name,
            self.websocket.application_state.name,
        )

    def _lost(self, exc: OSError | RuntimeError) -> TransportClosed:
        """*exc* as the connection's end (1006): the socket failed, or the
        WebSocket is closed. A RuntimeError on an open WebSocket is a
        mistake, not the call's end: raised again."""
        if isinstance(exc, RuntimeError) and not self._disconnected():
            raise exc
        return self._closed(1006, exc)

    async def open(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        if self.websocket.application_state.name != "CONNECTING":
            return  # accepted (or closed) by the endpoint
        offered = self.websocket.scope.get("subprotocols") or []
        try:
            await self.websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
        except WebSocketDisconnect as exc:
            raise self._closed(exc.code, exc) from exc
        except (OSError, RuntimeError) as exc:
            raise self._lost(exc) from exc

    async def receive(self) -> str | bytes:
        try:
            message = await self.websocket.receive()
        except (OSError, RuntimeError) as exc:
            raise self._lost(exc) from exc
        if message["type"] == "websocket.disconnect":
            raise self._closed(message.get("code"), message.get("reason") or "")
        text = message.get("text")
        if text is not None:
            return str(text)
        return bytes(message.get("bytes") or b"")

    async def send(self, message: str | bytes) -> None:
        from starlette.websockets import WebSocketDisconnect

        try:
            if isinstance(message, str):
                await self.websocket.send_text(message)
            else:
                await self.websocket.send_bytes(message)
        except WebSocketDisconnect as exc:  # the peer is gone
            raise self._closed(exc.code, exc) from exc
        except (OSError, RuntimeError) as exc:
            raise self._lost(exc) from exc

    async def close(self) -> None:
        from starlette.websockets import WebSocketDisconnect

        if self._disconnected():
            return
        try:
            await self.websocket.close(1000)
        except (WebSocketDisconnect, OSError, RuntimeError) as exc:
            log.debug("astmarks: closing the WebSocket: %s", exc)


class AiohttpTransport(Transport):
    """An aiohttp WebSocket: ``web.WebSocketResponse`` (prepared) or
    ``ClientWebSocketResponse``."""

    def __init__(self, websocket: AiohttpWebSocket) -> None:
        self.websocket = websocket

    @property
    def close_code(self) -> int | None:
        return self.websocket.close_code

    async def receive(self) -> str | bytes:
        while True:
            if self.websocket.closed:
                raise TransportClosed(self.close_code, "the WebSocket is closed")
            try:
                message = await self.websocket.receive()
            except TimeoutError as exc:  # the WebSocket's receive_timeout
                await self.close()
                raise TransportClosed(self.close_code, "no message within receive_timeout") from exc
            kind = message.type.name
            if kind in ("TEXT", "BINARY"):
                data = message.data
                if kind == "TEXT":  # bytes with ws_connect(decode_text=False)
                    return data.decode() if isinstance(data, (bytes, bytearray)) else str(data)
                return bytes(data)
            if kind in ("CLOSE", "CLOSING", "CLOSED", "ERROR"):
                error = self.websocket.exception()
                raise TransportClosed(self.close_code, str(error or message.extra or ""))
            # PING and PONG (aiohttp answers pings itself): not for the session.

    async def send(self, message: str | bytes) -> None:
        if self.websocket.closed:
            raise TransportClosed(self.close_code, "the WebSocket is closed")
        try:
            if isinstance(message, str):
                await self.websocket.send_str(message)
            else:
                await self.websocket.send_bytes(message)
        except ConnectionError as exc:
            raise TransportClosed(self.close_code, str(exc)) from exc

    async def close(self) -> None:
        await self.websocket.close()


def _classes(*where: tuple[str, str]) -> tuple[type, ...]:
    """The classes named, from the modules already imported (none is imported here)."""
    found = []
    for module, name in where:
        kind = getattr(sys.modules.get(module), name, None)
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


def as_transport(websocket: object) -> Transport:
    """The :class:`Transport` for *websocket*; TypeError if it is none of the
    kinds above (or an aiohttp response not prepared yet)."""
    if isinstance(websocket, Transport):
        return websocket
    if isinstance(
        websocket,
        _classes(
            ("websockets.asyncio.connection", "Connection"),
            ("websockets.legacy.protocol", "WebSocketCommonProtocol"),
        ),
    ):
        return WebsocketsTransport(websocket)
    if isinstance(websocket, _classes(("starlette.websockets", "WebSocket"))):
        return StarletteTransport(websocket)  # type: ignore[arg-type]
    if isinstance(websocket, _classes(("aiohttp.web_ws", "WebSocketResponse"))):
        if not websocket.prepared:  # type: ignore[attr-defined]
            raise TypeError("astmarks: await websocket.prepare(request) before the session")
        return AiohttpTransport(websocket)  # type: ignore[arg-type]
    if isinstance(websocket, _classes(("aiohttp.client_ws", "ClientWebSocketResponse"))):
        return AiohttpTransport(websocket)  # type: ignore[arg-type]
    kind = type(websocket)
    raise TypeError(
        f"astmarks: cannot use a {kind.__module__}.{kind.__qualname__} as a WebSocket: "
        "pass an asyncio WebSocket from websockets, Starlette (FastAPI) or aiohttp, "
        "or wrap it in a subclass of astmarks.transport.Transport"
    )
