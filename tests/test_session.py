"""The library's waits end, whatever the other side does (no Asterisk needed).

A real ``websockets`` connection on loopback whose far end is the test: it
stays silent, or closes. (What Asterisk answers is tested on real calls, in
tests/integration/test_library.py.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from astmarks import MediaSession, MediaTimeout, SessionClosed

#: The far end's connection, for the test to drive.
Far = asyncio.Queue[ServerConnection]


@pytest.fixture
async def pair() -> AsyncIterator[tuple[MediaSession, Far]]:
    far: Far = asyncio.Queue()
    done = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        await far.put(connection)
        await done.wait()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}") as ws, MediaSession(ws, timeout=5) as s:
            yield s, far
            done.set()


async def test_started_times_out_without_media_start(pair: tuple[MediaSession, Far]) -> None:
    s, _ = pair
    t0 = time.monotonic()
    with pytest.raises(MediaTimeout, match=r"MEDIA_START within 0\.2 s"):
        await s.started(timeout=0.2)
    assert time.monotonic() - t0 < 2


async def test_marks_need_started_and_a_silent_driver_times_out(
    pair: tuple[MediaSession, Far],
) -> None:
    s, far = pair
    with pytest.raises(RuntimeError, match="started"):
        await s.mark("early")
    peer = await far.get()
    await peer.send("MEDIA_START connection_id:c channel:WebSocket/x channel_id:1 format:ulaw")
    # The probe's GET_STATUS is never answered: the default timeout applies.
    s.timeout = 0.3
    with pytest.raises(MediaTimeout, match="STATUS"):
        await s.started()


async def test_everything_waiting_gets_session_closed_when_the_call_ends(
    pair: tuple[MediaSession, Far],
) -> None:
    s, far = pair
    peer = await far.get()
    waiting = asyncio.gather(s.status(timeout=30), s.wait_closed(), return_exceptions=True)
    await asyncio.sleep(0.05)
    await peer.close()
    status, closed = await asyncio.wait_for(waiting, 5)
    assert isinstance(status, SessionClosed) and closed is None
    with pytest.raises(SessionClosed):
        await s.send_audio(b"\xff" * 160)


async def test_the_callers_audio_is_read_and_a_slow_reader_loses_the_oldest() -> None:
    far: Far = asyncio.Queue()

    async def handler(connection: ServerConnection) -> None:
        for i in range(5):
            await connection.send(bytes([i]) * 160)
        await connection.close()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with (
            connect(f"ws://127.0.0.1:{port}") as ws,
            MediaSession(ws, audio_buffer=3) as s,
        ):
            await s.wait_closed()
            got = [piece[0] async for piece in s.audio()]
    assert far.empty()
    assert got == [2, 3, 4], "the newest three kept"
