"""A bot's WebSocket served by the web framework a bot author picked.

Each serves ``/media`` on a free loopback port and wraps every connection in
an :class:`astmarks.MediaSession` as the framework's documentation would have
it: websockets' ``serve`` (through :func:`astmarks.serve`), a FastAPI
endpoint on uvicorn, an aiohttp ``WebSocketResponse``. The sessions go to a
queue for the test to drive; each handler holds its session open until the
call ends.

(No ``from __future__ import annotations`` here: FastAPI reads the endpoint's
annotations at run time, and ``WebSocket`` is imported in a function.)
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from astmarks import MediaSession, serve
from astmarks.server import SUBPROTOCOL
from harness.ports import LOOPBACK
from harness.timing import units

FRAMEWORKS = ("websockets", "fastapi", "aiohttp")


@dataclass
class WebBot:
    framework: str
    uri: str = ""
    sessions: asyncio.Queue[MediaSession] = field(default_factory=asyncio.Queue)
    #: A command each handler sends the moment its session is open, if any.
    first: str | None = None

    async def session(self) -> MediaSession:
        return await asyncio.wait_for(self.sessions.get(), units(10))

    async def hold(self, session: MediaSession) -> None:
        if self.first is not None:
            await session.command(self.first)
        await self.sessions.put(session)
        await session.closed.wait()


@contextlib.asynccontextmanager
async def web_bot(
    framework: str, timeout: float = 10.0, first: str | None = None
) -> AsyncIterator[WebBot]:
    """A bot served by *framework* (one of :data:`FRAMEWORKS`), sending
    *first* as soon as each session is open."""
    bot = WebBot(framework, first=first)
    serving = {"websockets": _websockets, "fastapi": _fastapi, "aiohttp": _aiohttp}[framework]
    async with serving(bot, timeout) as port:
        bot.uri = f"ws://{LOOPBACK}:{port}/media"
        yield bot


@contextlib.asynccontextmanager
async def _websockets(bot: WebBot, timeout: float) -> AsyncIterator[int]:
    async with serve(bot.hold, LOOPBACK, 0, timeout=timeout) as server:
        yield next(iter(server.sockets)).getsockname()[1]


@contextlib.asynccontextmanager
async def _fastapi(bot: WebBot, timeout: float) -> AsyncIterator[int]:
    import uvicorn
    from fastapi import FastAPI, WebSocket

    app = FastAPI()

    @app.websocket("/media")
    async def media(websocket: WebSocket) -> None:
        # The session accepts the WebSocket, with the media subprotocol.
        async with MediaSession(websocket, timeout=timeout) as session:
            await bot.hold(session)

    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=0, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.02)
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def _aiohttp(bot: WebBot, timeout: float) -> AsyncIterator[int]:
    from aiohttp import web

    async def media(request: web.Request) -> web.WebSocketResponse:
        websocket = web.WebSocketResponse(protocols=(SUBPROTOCOL,), max_msg_size=0)
        await websocket.prepare(request)
        async with MediaSession(websocket, timeout=timeout) as session:
            await bot.hold(session)
        return websocket

    app = web.Application()
    app.router.add_get("/media", media)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, LOOPBACK, 0)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
