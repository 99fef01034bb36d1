"""The demo bot: what a person hears when they call the Docker setup.

``python -m harness bot`` serves chan_websocket connections, written as a bot
author writes one: a ``websockets`` server whose handler wraps each
connection in :class:`astmarks.MediaSession` and speaks through
:class:`astmarks.pacer.Pacer`, through the library's public API only. In each
call the bot speaks a greeting the way a bot streams text-to-speech: in
chunks of uneven size, a mark after each (``MARK_MEDIA`` in mark positions
mode), paced by ``MEDIA_MARK_PROCESSED``. If
the caller talks over it, the bot stops at once (``FLUSH_MEDIA``) and says
how much of the greeting was heard, from ``MEDIA_FLUSHED``; otherwise it says
goodbye. Then it hangs up. Every playback event is logged with its position,
so the log shows the marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve

from astmarks import MediaSession, MediaSessionError
from astmarks.pacer import Pacer
from astmarks.protocol import MARK_CLEARED_EVENTS, MARK_REACHED_EVENTS, Event
from astmarks.server import SUBPROTOCOL
from harness import audio, tts
from harness.service import Service

log = logging.getLogger(__name__)

GREETING = (
    "Hello, you are talking to a bot over Asterisk's WebSocket channel. "
    "It streams this sentence in small chunks and places a mark after each one, "
    "and Asterisk tells it the moment each chunk has been played. "
    "Say something while I am talking, and I will stop and tell you how much you heard."
)
#: The events the bot logs as they arrive.
PLAYBACK_EVENTS = (*MARK_REACHED_EVENTS, *MARK_CLEARED_EVENTS, "MEDIA_FLUSHED")
#: RMS level (16-bit scale) above which the caller's audio counts as speech.
SPEECH_LEVEL = 1000
#: How long the caller must talk before the bot stops (ms).
SPEECH_MS = 200


class DemoBot(Service):
    """A bot server answering every call with the greeting; an async context manager."""

    def __init__(self, host: str, port: int, *, greeting: str = GREETING) -> None:
        self.host = host
        self.port = port
        self.greeting = greeting
        self._prompt: audio.Prompt | None = None
        self._calls = itertools.count(1)
        self._server: Server | None = None

    @property
    def uri(self) -> str:
        """What Asterisk's websocket_client.conf points at."""
        port = self.port
        if self._server is not None:
            port = next(iter(self._server.sockets)).getsockname()[1]
        return f"ws://{self.host}:{port}/media"

    async def start(self) -> None:
        self._prompt = await asyncio.to_thread(audio.render_prompt, self.greeting)
        log.info(
            "demo bot: greeting of %.1f s from %s", self._prompt.ms / 1000, self._prompt.source
        )
        self._server = await serve(
            self.handle,
            self.host,
            self.port,
            subprotocols=[SUBPROTOCOL],  # type: ignore[list-item]
            max_size=None,
            ping_interval=None,
            compression=None,
        )

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None

    async def handle(self, connection: ServerConnection) -> None:
        """One call, from MEDIA_START to hang-up."""
        call = next(self._calls)

        def follow(event: Event) -> None:
            if event.name in PLAYBACK_EVENTS:
                log.info("call %d: %s", call, event.raw)

        # The call's tag (the harness's v(call=...) dial option), to name the
        # session in the log.
        path = connection.request.path if connection.request else "/"
        tag = parse_qs(urlsplit(path).query)
        name = tag.get("call", [f"call-{call}"])[-1]
        async with MediaSession(connection, on_event=follow, name=name) as session:
            try:
                await self._converse(call, session, path)
            except MediaSessionError as exc:
                log.info("call %d: ended early: %s", call, exc)
            except Exception:
                log.exception("call %d: the bot failed", call)
                with contextlib.suppress(Exception):
                    await session.command("HANGUP")

    async def _converse(self, call: int, session: MediaSession, path: str) -> None:
        assert self._prompt is not None, "bot not started"
        caps = await session.started()
        log.info("call %d: connected (%s): %s", call, path, caps.fields)
        pacer = Pacer(session)
        playing = asyncio.create_task(pacer.play(tts.speak(self._prompt.ulaw)))
        talking = asyncio.create_task(_caller_talks(session))
        await asyncio.wait({playing, talking}, return_when=asyncio.FIRST_COMPLETED)
        if talking.done() and not playing.done():
            log.info("call %d: the caller talks: barge-in", call)
            pacer.barge_in()
        talking.cancel()
        result = await playing
        if result.interrupted:
            heard = result.heard_ms or 0.0
            reply = f"You interrupted me after {heard / 1000:.1f} seconds."
            log.info("call %d: MEDIA_FLUSHED: the caller heard %.0f ms", call, heard)
        else:
            await result.played(timeout=30.0)
            reply = "You heard all of it. Goodbye."
        speech = await asyncio.to_thread(audio.render_prompt, reply)
        await (await Pacer(session).play(tts.speak(speech.ulaw))).played(timeout=30.0)
        log.info("call %d: hanging up", call)
        await session.hangup()


async def _caller_talks(session: MediaSession) -> None:
    """Return once the caller's audio has been loud for :data:`SPEECH_MS`."""
    loud_ms = 0.0
    async for piece in session.audio():
        if audio.level(piece) >= SPEECH_LEVEL:
            loud_ms += audio.ms_of(len(piece))
        else:
            loud_ms = 0.0
        if loud_ms >= SPEECH_MS:
            return
