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

Anything else works once wrapped in a subclass of :class:`Transport`. None of
these libraries is imported unless the bot passes one of its WebSockets: the
library still needs only ``websockets``.
"""

from __future__ import annotations

import abc
import logging
from typing import Any

from websockets.exceptions import ConnectionClosed

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

    The session accepts it (with the ``media`` subprotocol when Asterisk asks
    for it, as it does) unless the endpoint did already.
    """

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket
        self._close_code: int | None = None

    @property
    def close_code(self) -> int | None:
        return self._close_code

    @property
    def label(self) -> str:
        client = getattr(self.websocket, "client", None)
        return f"{client[0]}:{client[1]}" if client else super().label

    async def open(self) -> None:
        if self.websocket.client_state.name == "CONNECTING":
            offered = self.websocket.scope.get("subprotocols") or []
            await self.websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)

    async def receive(self) -> str | bytes:
        try:
            message = await self.websocket.receive()
        except RuntimeError as exc:  # receive() after the disconnect
            raise TransportClosed(self.close_code, str(exc)) from exc
        if message["type"] == "websocket.disconnect":
            self._close_code = message.get("code")
            raise TransportClosed(self.close_code, message.get("reason") or "")
        text = message.get("text")
        if text is not None:
            return str(text)
        return bytes(message.get("bytes") or b"")

    async def send(self, message: str | bytes) -> None:
        try:
            if isinstance(message, str):
                await self.websocket.send_text(message)
            else:
                await self.websocket.send_bytes(message)
        except (RuntimeError, OSError) as exc:  # after a close; the peer gone
            raise TransportClosed(self.close_code, str(exc)) from exc
        except Exception as exc:
            if type(exc).__name__ != "WebSocketDisconnect":
                raise
            self._close_code = getattr(exc, "code", None)
            raise TransportClosed(self.close_code, str(exc)) from exc

    async def close(self) -> None:
        if "DISCONNECTED" in (
            self.websocket.client_state.name,
            self.websocket.application_state.name,
        ):
            return
        try:
            await self.websocket.close(1000)
        except (RuntimeError, OSError) as exc:
            log.debug("astmarks: closing the WebSocket: %s", exc)


class AiohttpTransport(Transport):
    """An aiohttp WebSocket: ``web.WebSocketResponse`` (prepared) or
    ``ClientWebSocketResponse``."""

    def __init__(self, websocket: Any) -> None:
        self.websocket = websocket

    @property
    def close_code(self) -> int | None:
        code: int | None = self.websocket.close_code
        return code

    async def receive(self) -> str | bytes:
        while True:
            message = await self.websocket.receive()
            kind = message.type.name
            if kind == "TEXT":
                return str(message.data)
            if kind == "BINARY":
                return bytes(message.data)
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
        except (ConnectionError, RuntimeError) as exc:
            raise TransportClosed(self.close_code, str(exc)) from exc

    async def close(self) -> None:
        await self.websocket.close()


def as_transport(websocket: object) -> Transport:
    """The :class:`Transport` for *websocket*; TypeError if it is none of the
    kinds above."""
    if isinstance(websocket, Transport):
        return websocket
    kind = type(websocket)
    module = kind.__module__.split(".")[0]
    if module == "websockets" or (hasattr(websocket, "recv") and hasattr(websocket, "send")):
        return WebsocketsTransport(websocket)
    if module in ("starlette", "fastapi") or (
        hasattr(websocket, "send_text") and hasattr(websocket, "receive_text")
    ):
        return StarletteTransport(websocket)
    if module == "aiohttp" or (hasattr(websocket, "send_str") and hasattr(websocket, "receive")):
        return AiohttpTransport(websocket)
    raise TypeError(
        f"astmarks: cannot use a {kind.__module__}.{kind.__qualname__} as a WebSocket: "
        "pass a websockets, Starlette (FastAPI) or aiohttp WebSocket, "
        "or wrap it in a subclass of astmarks.transport.Transport"
    )
