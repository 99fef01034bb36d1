"""A WebSocket server for chan_websocket to dial: a :class:`MediaSession` per call.

Asterisk's ``websocket_client.conf`` points a connection at it
(``uri = ws://HOST:PORT/media``) and the dialplan dials it with
``Dial(WebSocket/<connection>/c(ulaw))``::

    async def call(session: MediaSession) -> None:
        caps = await session.started()
        ...

    async with astmarks.serve(call, "0.0.0.0", 8765):
        await asyncio.Future()  # serve until cancelled

It is ``websockets``' server with what chan_websocket needs: the ``media``
subprotocol, messages of any size (Asterisk sends a frame of audio whole),
and no keepalive pings of its own (a bot busy generating speech must not be
hung up on for a late pong). A bot that connects in to Asterisk instead
(``WebSocket/INCOMING``) wraps its client connection in a
:class:`MediaSession` itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve

from astmarks.session import DEFAULT_TIMEOUT, MediaSession, MediaSessionError
from astmarks.transport import SUBPROTOCOL

log = logging.getLogger(__name__)

__all__ = ["SUBPROTOCOL", "serve"]


@contextlib.asynccontextmanager
async def serve(
    handler: Callable[[MediaSession], Awaitable[None]],
    host: str | None = None,
    port: int | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    **options: Any,
) -> AsyncIterator[Server]:
    """Serve calls while the ``async with`` block runs: *handler* runs once per
    call with its open session; the block gets the server (its ``sockets``
    say where it listens, with port 0).

    *timeout* is each session's default timeout; *options* go to
    ``websockets.asyncio.server.serve`` (they override the defaults above).
    The session closes when *handler* returns. A call that ends while the
    handler waits (``MediaSessionError``) is logged, not raised; anything
    else the handler raises is websockets' to log.
    """

    async def connection(ws: ServerConnection) -> None:
        async with MediaSession(ws, timeout=timeout) as session:
            try:
                await handler(session)
            except MediaSessionError as exc:
                log.info("astmarks: session %s ended: %s", session.name, exc)

    settings: dict[str, Any] = {
        "subprotocols": [SUBPROTOCOL],
        "max_size": None,
        "ping_interval": None,
        "compression": None,
    }
    settings.update(options)
    server = await ws_serve(connection, host, port, **settings)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
