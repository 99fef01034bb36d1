"""Hostile and broken bots: nothing a bot sends makes Asterisk send an invalid
frame, lie about positions, pass a documented limit or stall the caller's audio.

Every frame Asterisk sends is checked by the bot's WebSocket library (a text
frame that is not valid UTF-8 fails the connection with 1007) and, in plain
text, for control characters that would split an event for a line reader.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import re
import struct
import subprocess
import time
from collections.abc import Awaitable, Callable

import pytest
from websockets.exceptions import ConnectionClosed

from astmarks.protocol import ControlFormat
from astmarks.session import SessionClosed
from harness import audio
from harness.bot import BotSession
from harness.capture import RtpPacket
from harness.rig import Rig
from harness.timing import units
from tests.conftest import report

FRAME = audio.FRAME_BYTES
#: A control character: it would split a plain-text event read as a line.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The most a single WebSocket frame from the bot may carry: res_http_websocket
#: reads a frame into a 65,535-byte buffer with its header, 4 bytes for a frame
#: of this size from the bot as a server (8 from a bot that connects in, whose
#: frames are masked).
MAX_FRAME_PAYLOAD = 65535 - 4


def assert_valid_texts(s: BotSession) -> None:
    """Every text frame from Asterisk was valid, and a single line in plain text."""
    assert not s.protocol_errors, s.protocol_errors
    # Invalid UTF-8 makes the bot's WebSocket library fail the connection (1007).
    assert s.close_code in (None, 1000, 1001), f"the connection closed (code {s.close_code})"
    if s.format is ControlFormat.PLAIN:
        split = [t for t in s.texts if CONTROL.search(t)]
        assert not split, f"plain-text events with control characters: {split!r}"


# --- text a driver cannot echo ---------------------------------------------------------

#: Raw TEXT frames, each answered with an ERROR that says why, and nothing else.
UNECHOABLE_PLAIN = [
    (b"MARK_MEDIA line1\nline2", "control character"),
    (b"MARK_MEDIA tab\there", "control character"),
    (b"STOP_MEDIA_BUFFERING esc\x1bape", "control character"),
    (b"MARK_MEDIA del\x7f", "control character"),
    (b"MARK nul\x00cut", "NUL"),
    (b"MARK_MEDIA nul\x00", "NUL"),
    (b"MARK_MEDIA caf\xc3", "not valid UTF-8"),
    (b"\xff\xfe GET_STATUS", "not valid UTF-8"),
    (b"MARK_MEDIA \xed\xa0\x80", "not valid UTF-8"),  # a UTF-16 surrogate
    (b"MARK_MEDIA \xc0\xae", "not valid UTF-8"),  # an overlong '.'
]

UNECHOABLE_JSON = [
    (b'{"command":"MARK_MEDIA","correlation_id":"x"}\x00junk', "NUL"),
    (b'{"command":"MARK_MEDIA","correlation_id":"caf\xc3"}', "not valid UTF-8"),
]


@pytest.mark.parametrize(
    ("data", "contains"), UNECHOABLE_PLAIN, ids=[repr(d)[2:26] for d, _ in UNECHOABLE_PLAIN]
)
async def test_plain_text_that_cannot_be_echoed_is_refused(
    rig: Rig, data: bytes, contains: str
) -> None:
    """An app that never opted in (upstream's MARK_MEDIA only) gets an ERROR, not a
    broken echo; the command is not carried out and the session goes on."""
    async with rig.call() as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 3))
        await s.send_raw_text(data)
        await s.command("MARK_MEDIA", "ok")
        ok = await s.wait_mark("ok")
        await asyncio.sleep(0.1)
    errors = s.named("ERROR")
    assert len(errors) == 1, s.texts
    assert contains.lower() in errors[0].get_str("error_text").lower()
    assert errors[0].index < ok.index, "answered in order"
    assert [e.mark_id for e in s.named("MEDIA_MARK_PROCESSED", "MEDIA_BUFFERING_COMPLETED")] == [
        "ok"
    ]
    assert_valid_texts(s)


@pytest.mark.parametrize(
    ("data", "contains"), UNECHOABLE_JSON, ids=[repr(d)[2:26] for d, _ in UNECHOABLE_JSON]
)
async def test_json_that_cannot_be_echoed_is_refused(rig: Rig, data: bytes, contains: str) -> None:
    async with rig.call(control_format=ControlFormat.JSON) as call:
        s = call.session
        await s.send_raw_text(data)
        await s.command("MARK_MEDIA", "ok")
        await s.wait_mark("ok")
    errors = s.named("ERROR")
    assert len(errors) == 1, s.texts
    assert contains.lower() in errors[0].get_str("error_text").lower()
    assert [e.mark_id for e in s.named("MEDIA_MARK_PROCESSED")] == ["ok"]
    assert_valid_texts(s)


async def test_json_escapes_what_plain_text_refuses(rig: Rig) -> None:
    """In JSON a control character in an id is escaped, so the id comes back whole."""
    async with rig.call(control_format=ControlFormat.JSON) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 2))
        await s.send_text('{"command":"MARK_MEDIA","correlation_id":"line1\\nline2\\u0001"}')
        mark = await s.wait_for("MEDIA_MARK_PROCESSED")
    assert mark.get_str("correlation_id") == "line1\nline2\x01"
    assert_valid_texts(s)


#: Unknown commands that are hard to name safely: multi-byte characters across
#: the point where the name is cut, a line separator, the longest message.
AWKWARD_NAMES = [
    "\u00c9" * 40,
    "\u65e5\u672c\u8a9e\u30b3\u30de\u30f3\u30c9" * 4,
    "CMD\u2028X",
    "\U0001f600" * 25,
    "x" * 31 + "\u00e9",
]


@pytest.mark.parametrize("name", AWKWARD_NAMES, ids=range(len(AWKWARD_NAMES)))
async def test_a_refused_command_is_named_safely(rig: Rig, fmt: ControlFormat, name: str) -> None:
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks(), "opted in: unknown commands get an ERROR"
        after = len(s.events) - 1
        if fmt is ControlFormat.PLAIN:
            await s.send_text(f"{name} argument")
        else:
            await s.send_text(json.dumps({"command": name}, ensure_ascii=False))
        error = await s.wait_for("ERROR", after=after)
        await s.command("MARK", "after")
        await s.wait_mark("after")
    assert "unknown command" in error.get_str("error_text").lower()
    assert_valid_texts(s)


# --- limits ----------------------------------------------------------------------------


async def test_the_queue_limit_holds_within_a_message(rig: Rig, fmt: ControlFormat) -> None:
    """Three 60,000-byte messages while paused: 1000 frames queued, not 1125, and the
    ERROR says how much was dropped, so the positions stay exact."""
    message = 60000
    async with rig.call(control_format=fmt) as call:
        s = call.session
        assert await s.probe_marks()
        await s.command("PAUSE_MEDIA")
        for k in range(3):
            await s.send_audio(audio.tagged_frames(k * 375, message // FRAME))
        error = await s.wait_for("ERROR")
        status = await s.get_status()
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
    assert status.get_int("queue_length") == 1000
    assert status.get_int("queued_ms") == 1000 * 20
    assert "dropped 20000 bytes" in error.get_str("error_text")
    assert flushed.get_int("discarded_ms") == 1000 * 20
    assert flushed.get_int("played_ms") == 0
    assert_valid_texts(s)


async def test_a_frame_at_the_receive_limit_is_accepted(rig: Rig) -> None:
    """The largest single WebSocket frame Asterisk reads: every byte is queued."""
    data = audio.tagged_frames(0, MAX_FRAME_PAYLOAD // FRAME + 1)[:MAX_FRAME_PAYLOAD]
    async with rig.call() as call:
        s = call.session
        assert await s.probe_marks()
        await s.command("PAUSE_MEDIA")
        await s.send_audio(data)
        status = await s.get_status()
    assert status.get_int("queued_ms") == audio.CODECS["ulaw"].ms(MAX_FRAME_PAYLOAD)
    assert_valid_texts(s)


async def test_a_frame_over_the_receive_limit_ends_the_call(rig: Rig) -> None:
    """One byte more: res_http_websocket closes with 1009 (message too big) before
    chan_websocket sees it, and the channel hangs up. Documented in PROTOCOL.md."""
    async with rig.call() as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 2))
        await s.command("MARK", "m")
        await s.wait_mark("m")
        await s.send_audio(bytes(MAX_FRAME_PAYLOAD + 1))
        await s.wait_closed()
        await call.sip.wait_disconnected()
    assert s.close_code == 1009


@pytest.mark.parametrize("mode", [True, False], ids=["mode", "no-mode"])
@pytest.mark.parametrize("size", [500, 7000])
async def test_a_large_message_sent_in_fragments_is_queued_whole(
    rig: Rig, size: int, mode: bool
) -> None:
    """A message of any size may be sent as fragments, each frame under the limit;
    every byte of it is queued (here 120,000 bytes, in fragments smaller and larger
    than the 1024 bytes res_http_websocket collects before it hands a piece over).
    Also for an app that never opted in to mark positions mode: the partial frame
    at the end of each 1024-byte piece is completed by the next piece (upstream
    drops it: 64 bytes of every 1024, and every frame after it is shifted)."""
    data = audio.tagged_frames(0, 750)
    fragments = [data[i : i + size] for i in range(0, len(data), size)]
    async with rig.call() as call:
        s = call.session
        if mode:
            assert await s.probe_marks()
        await s.command("PAUSE_MEDIA")
        await s.connection.send(fragments)
        status = await s.get_status()
        await s.command("CONTINUE_MEDIA")
        await s.command("MARK_MEDIA", "end")
        await asyncio.sleep(0.5)
        await s.command("FLUSH_MEDIA")
        if mode:
            await s.wait_for("MEDIA_FLUSHED")
        else:
            await s.get_status()
    if mode:
        assert status.get_int("queued_ms") == 750 * 20
    else:
        assert status.get_int("queue_length") == 750
    indexes = [audio.frame_index(p.payload) for p in call.packets]
    assert indexes == list(range(len(indexes))), "the fragments were played in order"
    assert_valid_texts(s)


@pytest.mark.parametrize("opcode", [0x82, 0x89], ids=["binary", "ping"])
async def test_a_frame_length_that_would_wrap_ends_the_call(local_rig: Rig, opcode: int) -> None:
    """A frame header whose 64-bit length wraps the frame's size: refused (1009)
    like any frame over the limit, with nothing read into memory past it."""
    rig = local_rig
    assert rig.asterisk is not None
    header = bytes([opcode, 127]) + struct.pack("!Q", 0xFFFFFFFFFFFFFFF2)
    async with rig.call() as call:
        s = call.session
        await s.command("MARK", "before")
        await s.wait_mark("before")
        s.connection.transport.write(header + b"x" * 32)
        await call.sip.wait_disconnected()
    assert rig.asterisk.running, "Asterisk is still up"
    async with rig.call() as call:
        await call.session.command("MARK", "next")
        await call.session.wait_mark("next")


async def test_a_long_text_message_in_fragments_is_refused_whole(rig: Rig) -> None:
    """A text message too long to collect comes to the driver in pieces: it is
    refused once, and its last piece, short enough to pass for a command
    (FLUSH_MEDIA here), is not carried out."""
    async with rig.call() as call:
        s = call.session
        assert await s.probe_marks()
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, 5))
        await s.command("MARK", "pending")
        await s.connection.send(["x" * 1100, "FLUSH_MEDIA"])
        status = await s.get_status()
        await s.command("CONTINUE_MEDIA")
        await s.wait_mark("pending")
    errors = s.named("ERROR")
    assert len(errors) == 1, s.texts
    assert "exceeds maximum length" in errors[0].get_str("error_text")
    assert not s.named("MEDIA_FLUSHED", "MARK_CLEARED"), "the last piece was not a command"
    assert status.get_int("pending_marks") == 1
    assert_valid_texts(s)


# --- positions for every codec ---------------------------------------------------------


@pytest.mark.parametrize("codec", list(audio.CODECS))
async def test_positions_are_exact_for_every_codec(rig: Rig, codec: str) -> None:
    """Fragments smaller than a sample (or a frame) left to run dry, then whole frames:
    every position is exact to the sample and never more than was sent."""
    c = audio.CODECS[codec]
    sent = c.encode(audio.tone(440.0, 200))
    pieces = [sent[:1], sent[1:2], sent[2:3], sent[3 : c.frame_bytes // 2 + 3]]
    rest = sent[sum(map(len, pieces)) :]
    async with rig.call(codec=codec) as call:
        s = call.session
        start = s.media_start
        assert start is not None and start.get_int("optimal_frame_size") == c.frame_bytes
        assert await s.probe_marks()
        for piece in pieces:
            await s.send_audio(piece)
            await asyncio.sleep(0.06)  # the queue runs dry: whole units play
        await s.send_audio(rest)
        await s.command("MARK", "end")
        mark = await s.wait_mark("end")
        status = await s.get_status()
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED")
        await asyncio.sleep(0.1)
    total_ms = c.ms(len(sent))
    assert mark.get_int("played_ms") == total_ms
    assert mark.get_int("queued_ms") == 0
    assert status.get_int("played_ms") == total_ms
    assert status.get_int("queued_ms") == 0
    assert flushed.get_int("played_ms") == total_ms
    assert flushed.get_int("discarded_ms") == 0
    heard_ms = sum(len(p.payload) for p in call.packets) / audio.BYTES_PER_MS
    assert abs(heard_ms - total_ms) <= 20, f"the caller heard {heard_ms} ms of {total_ms}"
    last = max(call.packets, key=lambda p: p.t)
    error_ms = (mark.t - last.t) * 1000
    report(f"{codec}: MARK_PLAYED - the last RTP packet", f"{error_ms:+.2f} ms")
    assert abs(error_ms) < 25
    assert_valid_texts(s)


# --- a bot that stops reading ----------------------------------------------------------


def largest_gap_ms(packets: list[RtpPacket]) -> float:
    """The longest time between two consecutive RTP packets to the caller."""
    times = sorted(p.t for p in packets)
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1000


def unread_by_asterisk(bot_port: int) -> int:
    """Bytes from the bot that Asterisk has yet to read: its socket's receive queue."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( dport = :{bot_port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if line.split())


#: What chan_websocket.conf's write_timeout defaults to (upstream #2141 and
#: patch 8): how long a write may wait for a bot that does not read.
WRITE_TIMEOUT_MS = 100


class Flood:
    """A bot stuck in a loop: it asks for STATUS over and over and reads nothing.

    Each batch waits until Asterisk has read all of it (its socket's receive
    queue is empty), so that Asterisk has written, or tried to write, every
    answer.
    """

    def __init__(self, rig: Rig, session: BotSession) -> None:
        self.rig = rig
        self.session = session
        self.sent = 0

    @classmethod
    def start(cls, rig: Rig, session: BotSession) -> Flood:
        session.pause_reading()
        return cls(rig, session)

    async def batch(self, count: int = 1000) -> None:
        """Send *count* GET_STATUS and wait until Asterisk has read them all."""
        for _ in range(count):
            await self.session.command("GET_STATUS")
        self.sent += count
        transport = self.session.connection.transport
        deadline = asyncio.get_running_loop().time() + units(20)
        while transport.get_write_buffer_size() or unread_by_asterisk(self.rig.bot.port):
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"Asterisk did not read the {self.sent} commands")
            await asyncio.sleep(0.02)

    async def until_hung_up(
        self,
        call_ended: asyncio.Future[None],
        between: Callable[[], Awaitable[None]],
        limit: int = 400_000,
    ) -> None:
        """Flood until Asterisk gives up on the bot and the call ends, awaiting
        *between* after each batch."""
        with contextlib.suppress(ConnectionClosed, SessionClosed, AssertionError, OSError):
            while not call_ended.done():
                assert self.sent < limit, f"{self.sent} STATUS unread and the call goes on"
                await self.batch()
                await between()


@pytest.mark.beyond_the_feature  # patch 8 (upstream's #2141): the write timeout
async def test_a_bot_that_stops_reading_is_dropped_within_the_write_timeout(
    local_rig: Rig, fmt: ControlFormat
) -> None:
    """The bot stops reading and floods commands while its audio plays. Once the
    kernel's TCP buffers are full, a write waits at most write_timeout (100 ms):
    Asterisk closes the connection, says why in its log and hangs up. Until then
    the caller hears the bot's audio on its 20 ms grid, every frame once and in
    order; the marks whose answers the bot read were answered once, in order,
    after their audio (what was still in the bot's receive buffer may be lost:
    closing a socket with commands unread resets the connection). (Upstream
    22.10.1, the same flood: no RTP for as long as the bot does not read.)"""
    rig = local_rig
    assert rig.asterisk is not None
    per_mark, ahead_s = 50, 4.0
    loop = asyncio.get_running_loop()
    async with rig.call(control_format=fmt) as call:
        s = call.session
        started = loop.time()
        sent = 0

        async def keep_audio_queued() -> None:
            """Keep about *ahead_s* of audio queued, a mark after every *per_mark* frames."""
            nonlocal sent
            while sent * audio.FRAME_MS / 1000 < loop.time() - started + ahead_s:
                await s.send_audio(audio.tagged_frames(sent, per_mark))
                sent += per_mark
                await s.command("MARK", f"m{sent // per_mark - 1}")

        await keep_audio_queued()
        await asyncio.sleep(0.3)
        flood = Flood.start(rig, s)
        hung_up: list[float] = []
        call.sip.disconnected.add_done_callback(lambda _: hung_up.append(time.time()))
        await flood.until_hung_up(call.sip.disconnected, keep_audio_queued)
        await call.sip.wait_disconnected(timeout=units(20))
        took = asyncio.get_running_loop().time() - started
        s.resume_reading()
        resumed, before = loop.time(), len(s.events)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(s.closed.wait(), units(60))
        drained = loop.time() - resumed
    log = rig.asterisk.messages_log.read_text(errors="replace")
    assert f"Write to the app failed (not taken within {WRITE_TIMEOUT_MS} ms" in log
    assert s.close_code in (1006, 1011), f"closed with {s.close_code}"
    indexes = [audio.frame_index(p.payload) for p in call.packets]
    assert indexes == list(range(len(indexes))), "every frame played once, in order"
    assert len(indexes) < sent, "the call ended before the bot's audio ran out"
    played = [e.mark_id for e in s.named("MARK_PLAYED")]
    assert played == [f"m{k}" for k in range(len(played))]
    assert len(played) * per_mark <= len(indexes), "a mark answered before its audio"
    gap = largest_gap_ms(call.packets)
    # The stall may also be the last thing the caller hears before the hangup.
    silent = (hung_up[0] - max(p.t for p in call.packets)) * 1000
    report(
        f"bot stopped reading ({fmt.value}): {flood.sent} STATUS unread, dropped after "
        f"{took:.1f} s, {len(indexes)} frames heard, {len(played)} marks answered; "
        f"the bot read {len(s.events) - before} events in {drained:.1f} s after; "
        "largest RTP gap, silence before the hangup",
        f"{gap:.1f} ms, {silent:.1f} ms",
    )
    gap = max(gap, silent)
    # The failed write waits the write timeout, and on 22.10.1 the CLOSE frame
    # res_http_websocket tries after it once more; a frame is 20 ms. Slow
    # builds (AddressSanitizer) scale the bound.
    assert gap < units(0.3) * 1000, f"the caller's audio stalled for {gap:.0f} ms"
    # The next call is served as usual.
    async with rig.call() as call:
        await call.session.command("MARK", "next")
        await call.session.wait_mark("next")


async def test_a_bot_that_reads_late_loses_nothing(local_rig: Rig, fmt: ControlFormat) -> None:
    """A bot that stops reading for a while, asking for STATUS all along, while its
    audio plays: what Asterisk writes meanwhile waits in the kernel's buffers (as
    long as they take it, no write waits). The caller's RTP keeps its 20 ms grid,
    every mark is answered once, every STATUS arrives."""
    rig = local_rig
    frames = 300
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.command("REPORT_PROGRESS", 20)
        for k in range(frames // 10):
            await s.send_audio(audio.tagged_frames(k * 10, 10))
            await s.command("MARK", f"m{k}")
        flood = Flood.start(rig, s)
        for _ in range(2):
            await flood.batch(500)
        pong = await s.connection.ping(b"still there?")
        await asyncio.sleep(1.0)
        s.resume_reading()
        await asyncio.wait_for(pong, units(10))
        await s.wait_mark(f"m{frames // 10 - 1}", timeout=units(20))
        await s.wait_for("STATUS", lambda e: len(s.named("STATUS")) >= flood.sent, timeout=20)
        await asyncio.sleep(0.2)
    played = s.named("MARK_PLAYED")
    assert [e.mark_id for e in played] == [f"m{k}" for k in range(frames // 10)]
    assert not s.named("MARK_CLEARED")
    assert len(s.named("STATUS")) == flood.sent
    indexes = [audio.frame_index(p.payload) for p in call.packets]
    assert indexes == list(range(frames)), "every frame played once, in order"
    gap = largest_gap_ms(call.packets)
    report(f"bot read late ({fmt.value}): {flood.sent} STATUS; largest RTP gap", f"{gap:.1f} ms")
    # One frame late is a 40 ms gap; slow builds (AddressSanitizer) scale the bound.
    assert gap < units(0.05) * 1000, f"the caller's audio stalled for {gap:.0f} ms"
    assert_valid_texts(s)


async def test_a_slow_bot_hears_the_fate_of_its_marks_at_hangup(local_rig: Rig) -> None:
    """The caller hangs up while a bot is not reading, with marks pending and
    answers to its commands unread; when it reads again it gets every MARK_CLEARED
    (reason hangup) and every STATUS, then MEDIA_FLUSHED."""
    rig = local_rig
    marks = 20
    async with rig.call() as call:
        s = call.session
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, marks))
        for k in range(marks):
            await s.command("MARK", f"m{k}")
        flood = Flood.start(rig, s)
        await flood.batch(1000)
        await call.sip.hangup()
        await asyncio.sleep(0.5)
        s.resume_reading()
        await s.wait_for("MEDIA_FLUSHED", timeout=units(10))
    cleared = s.named("MARK_CLEARED")
    assert [e.mark_id for e in cleared] == [f"m{k}" for k in range(marks)]
    assert {e.get_str("reason") for e in cleared} == {"hangup"}
    assert len(s.named("STATUS")) == flood.sent
