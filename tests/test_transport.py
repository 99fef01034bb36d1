"""A MediaSession over each web framework's WebSocket (no Asterisk needed).

The bot is served by websockets, FastAPI on uvicorn, or aiohttp
(tests/webbots.py); the far end is a real ``websockets`` client playing
Asterisk's part: it offers the ``media`` subprotocol, sends events and audio,
and closes. The same session on real calls: tests/integration/test_library.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.typing import Subprotocol

from astmarks import MediaSession, SessionClosed
from astmarks.transport import (
    AiohttpTransport,
    StarletteTransport,
    Transport,
    WebsocketsTransport,
    as_transport,
)
from tests.test_session import SlowWire
from tests.webbots import FRAMEWORKS, WebBot, web_bot

MEDIA_START = "MEDIA_START connection_id:c channel:WebSocket/x channel_id:1 format:ulaw"
KINDS: dict[str, type[Transport]] = {
    "websockets": WebsocketsTransport,
    "fastapi": StarletteTransport,
    "aiohttp": AiohttpTransport,
}


@pytest.fixture(params=FRAMEWORKS)
async def bot(request: pytest.FixtureRequest) -> AsyncIterator[WebBot]:
    async with web_bot(request.param, timeout=5) as served:
        yield served


@contextlib.asynccontextmanager
async def dialled(bot: WebBot) -> AsyncIterator[tuple[ClientConnection, MediaSession]]:
    """Asterisk's side of a call to *bot*, and the bot's session."""
    async with connect(bot.uri, subprotocols=[Subprotocol("media")], max_size=None) as far:
        yield far, await asyncio.wait_for(bot.sessions.get(), 5)


async def test_messages_both_ways_and_the_end_of_the_call(bot: WebBot) -> None:
    events: list[str] = []
    async with dialled(bot) as (far, s):
        assert far.subprotocol == "media", "chan_websocket's subprotocol accepted"
        assert isinstance(s.transport, KINDS[bot.framework])
        s.on_event = lambda event: events.append(event.name)
        await far.send(MEDIA_START)
        await far.send(b"\x01" * 160)
        await far.send(b"\x02" * 160)
        received = []
        async for chunk in s.audio():
            received.append(chunk)
            if len(received) == 2:
                break
        assert received == [b"\x01" * 160, b"\x02" * 160], "whole binary messages, in order"
        assert events == ["MEDIA_START"]
        await s.send_audio(b"\xff" * 320)
        assert await asyncio.wait_for(far.recv(), 5) == b"\xff" * 320
        await s.command("GET_STATUS")
        assert await asyncio.wait_for(far.recv(), 5) == "GET_STATUS"
        # The call ends: Asterisk closes; what the bot waits for ends too.
        waiting = asyncio.create_task(s.status(timeout=30))
        await asyncio.sleep(0.05)
        await far.close(1000)
        with pytest.raises(SessionClosed):
            await asyncio.wait_for(waiting, 5)
        await asyncio.wait_for(s.closed.wait(), 5)
        assert s.close_code == 1000
        with pytest.raises(SessionClosed):
            await s.send_audio(b"\xff" * 160)


async def test_the_bot_closing_the_session_closes_the_websocket(bot: WebBot) -> None:
    async with dialled(bot) as (far, s):
        await far.send(MEDIA_START)
        await s.aclose()
        await asyncio.wait_for(far.wait_closed(), 5)
        assert far.close_code == 1000
        assert s.closed.is_set()
        await s.aclose()  # twice: nothing more happens


async def test_a_connection_dropped_without_a_close_ends_the_session(bot: WebBot) -> None:
    async with dialled(bot) as (far, s):
        await far.send(MEDIA_START)
        far.transport.abort()
        await asyncio.wait_for(s.closed.wait(), 5)
        with pytest.raises(SessionClosed):
            await s.command("GET_STATUS")
        # No close frame: 1006, or 1005 as uvicorn says it.
        assert s.close_code in (1005, 1006)


@pytest.mark.parametrize("framework", FRAMEWORKS)
async def test_a_bot_may_send_the_moment_its_session_is_open(framework: str) -> None:
    """Before MEDIA_START, before anything is read (Starlette: accepted first)."""
    async with web_bot(framework, timeout=5, first="ANSWER") as bot, dialled(bot) as (far, _):
        assert await asyncio.wait_for(far.recv(), 5) == "ANSWER"


async def test_a_bot_that_connects_in_with_aiohttp() -> None:
    """Asterisk as the server (WebSocket/INCOMING), the bot an aiohttp client,
    text left undecoded by aiohttp (decode_text=False)."""
    import aiohttp

    async def asterisk(connection: ServerConnection) -> None:
        await connection.send(MEDIA_START)
        assert await connection.recv() == "GET_STATUS"
        await connection.close(1000)

    async with serve(asterisk, "127.0.0.1", 0, subprotocols=[Subprotocol("media")]) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        events: list[str] = []
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(
                f"ws://127.0.0.1:{port}/media/c", protocols=("media",), decode_text=False
            ) as ws,
            MediaSession(ws, timeout=5, on_event=lambda e: events.append(e.raw)) as s,
        ):
            assert isinstance(s.transport, AiohttpTransport)
            await s.command("GET_STATUS")
            await s.wait_closed()
    assert events == [MEDIA_START], "text as str, not bytes"
    assert s.close_code == 1000


async def test_an_aiohttp_response_not_prepared_is_refused_clearly() -> None:
    from aiohttp import web

    with pytest.raises(TypeError, match=r"prepare\(request\)"):
        as_transport(web.WebSocketResponse())
    with pytest.raises(TypeError, match=r"aiohttp\.web_app\.Application as a WebSocket"):
        as_transport(web.Application())


def test_something_that_is_no_websocket_is_refused_clearly() -> None:
    with pytest.raises(TypeError, match=r"builtins\.str as a WebSocket.*Transport"):
        as_transport("ws://127.0.0.1/media")


async def test_a_transport_of_the_bots_own() -> None:
    """Anything else: a subclass of Transport (here, queues in memory)."""
    wire = SlowWire()
    seen = asyncio.Event()
    async with MediaSession(wire, timeout=5, on_event=lambda _: seen.set()) as s:
        assert s.transport is wire
        wire.incoming.put_nowait(MEDIA_START)
        await asyncio.wait_for(seen.wait(), 5)
        await s.command("GET_STATUS")
    assert wire.wire == ["GET_STATUS"]
    assert s.closed.is_set() and s.close_code == 1000
