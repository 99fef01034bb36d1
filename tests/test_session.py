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
from astmarks.pacer import Pacer
from astmarks.transport import Transport, TransportClosed

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


async def _started(s: MediaSession, peer: ServerConnection, status: str = "") -> None:
    """Answer MEDIA_START and the probe's GET_STATUS as a driver with mark positions mode."""
    await peer.send("MEDIA_START connection_id:c channel:WebSocket/x channel_id:1 format:ulaw")
    probing = asyncio.create_task(s.started())
    assert await peer.recv() == "REPORT_MARK_POSITIONS"
    assert await peer.recv() == "GET_STATUS"
    await peer.send(status or STATUS.format(played=0))
    await probing


STATUS = (
    "STATUS channel_id:1 queue_length:0 xon_level:800 xoff_level:900 queue_full:false "
    "bulk_media:false media_paused:false pending_marks:0 played_ms:{played} queued_ms:0"
)


async def test_a_late_answer_goes_to_the_request_it_answers(
    pair: tuple[MediaSession, Far],
) -> None:
    s, far = pair
    peer = await far.get()
    await _started(s, peer)
    with pytest.raises(MediaTimeout):
        await s.status(timeout=0.05)  # answered late
    await s.command("GET_STATUS")  # the bot's own, answered too
    asked = asyncio.create_task(s.status())
    for played in (111, 222, 333):
        await peer.send(STATUS.format(played=played))
    assert (await asked).played_ms == 333, "not the late answer to an earlier one"


async def test_only_a_flush_answers_a_flush(pair: tuple[MediaSession, Far]) -> None:
    s, far = pair
    peer = await far.get()
    await _started(s, peer)
    flushing = asyncio.create_task(s.flush())
    await peer.send("MEDIA_FLUSHED reason:hangup played_ms:10 discarded_ms:0 cleared_marks:0")
    await peer.send("MEDIA_FLUSHED reason:flush played_ms:20 discarded_ms:5 cleared_marks:0")
    flushed = await flushing
    assert (flushed.reason, flushed.played_ms) == ("flush", 20)


async def test_a_failed_probe_is_asked_again_and_a_bad_callback_ends_nothing() -> None:
    far: Far = asyncio.Queue()
    done = asyncio.Event()

    async def handler(connection: ServerConnection) -> None:
        await far.put(connection)
        await done.wait()

    def callback(event: object) -> None:
        raise ValueError("the bot's own bug")

    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with (
            connect(f"ws://127.0.0.1:{port}") as ws,
            MediaSession(ws, timeout=0.3, on_event=callback) as s,
        ):
            try:
                peer = await far.get()
                await peer.send("MEDIA_START connection_id:c channel:x channel_id:1 format:ulaw")
                with pytest.raises(MediaTimeout):
                    await s.started()  # the probe's STATUS does not come in time
                s.timeout = 5
                probing = asyncio.create_task(s.started())
                # Both GET_STATUS answered now: the first (late), and the second.
                for _ in range(2):
                    while await peer.recv() != "GET_STATUS":
                        pass
                    await peer.send(STATUS.format(played=0))
                assert (await probing).marks
                assert not s.closed.is_set()
            finally:
                done.set()


async def test_audio_over_one_message_goes_in_several(pair: tuple[MediaSession, Far]) -> None:
    s, far = pair
    peer = await far.get()
    await _started(s, peer)
    await s.send_audio(b"\xff" * 150_000)
    sizes: list[int] = []
    while sum(sizes) < 150_000:
        message = await peer.recv()
        assert isinstance(message, bytes)
        sizes.append(len(message))
    assert max(sizes) <= 65_000 and all(n % 160 == 0 for n in sizes[:-1])
    assert s.partial_frame_bytes == 150_000 % 160


async def test_a_stalled_tts_stream_times_the_pacer_out(pair: tuple[MediaSession, Far]) -> None:
    s, far = pair
    peer = await far.get()
    await _started(s, peer)

    async def stalls() -> AsyncIterator[bytes]:
        yield b"\xff" * 160
        await asyncio.sleep(3600)
        yield b""

    answering = asyncio.create_task(_answer_marks(peer))
    try:
        with pytest.raises(MediaTimeout, match="no chunk within"):
            await asyncio.wait_for(Pacer(s, chunk_timeout=0.3).play(stalls()), 5)
    finally:
        answering.cancel()


async def _answer_marks(peer: ServerConnection) -> None:
    """Answer each MARK_MEDIA at once, as played in mark positions mode, and
    each GET_STATUS."""
    async for message in peer:
        if isinstance(message, str) and message.startswith("MARK_MEDIA "):
            mark_id = message.split()[1]
            await peer.send(
                f"MEDIA_MARK_PROCESSED seq:1 played_ms:0 queued_ms:0 correlation_id:{mark_id}"
            )
        elif message == "GET_STATUS":
            await peer.send(STATUS.format(played=0))


class SlowWire(Transport):
    """A transport whose every send takes a moment (a busy socket), and which
    answers ``GET_STATUS`` as a driver with mark positions mode does."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[str | None] = asyncio.Queue()
        self.wire: list[str | bytes] = []

    async def receive(self) -> str | bytes:
        message = await self.incoming.get()
        if message is None:
            raise TransportClosed(1000)
        return message

    async def send(self, message: str | bytes) -> None:
        await asyncio.sleep(0.001)
        self.wire.append(message)
        if message == "GET_STATUS":
            self.incoming.put_nowait(STATUS.format(played=0))

    async def close(self) -> None:
        self.incoming.put_nowait(None)


async def test_a_mark_placed_while_another_task_sends_counts_what_went_before_it() -> None:
    """The offset of a mark placed by one task while another sends a long
    chunk in pieces is the media before the MARK_MEDIA on the wire, to the byte."""
    wire = SlowWire()
    wire.incoming.put_nowait("MEDIA_START connection_id:c channel:WebSocket/x format:ulaw")
    async with MediaSession(wire, timeout=5) as s:
        await s.started()
        await _marks_while_sending(s, wire)


async def _marks_while_sending(s: MediaSession, wire: SlowWire) -> None:
    sending = asyncio.create_task(s.send_audio(b"\xff" * 400_000))
    marks = []
    while not sending.done():
        marks.append(await s.mark())
    await sending
    before: dict[str, int] = {}
    sent = 0
    for message in wire.wire:
        if isinstance(message, bytes):
            sent += len(message)
        elif message.startswith("MARK_MEDIA "):
            before[message.split()[1]] = sent
    assert len(marks) >= 5, "marks placed between the pieces"
    assert [m.offset for m in marks] == [before[m.mark_id] for m in marks]
    assert s.bytes_sent == 400_000
