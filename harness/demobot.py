"""The demo bot: what a person hears when they call the Docker setup.

``python -m harness bot`` serves chan_websocket connections. In each call the
bot speaks a greeting the way a bot streams text-to-speech: in chunks of
uneven size, a ``MARK`` after each, paced by ``MARK_PLAYED``
(:class:`harness.pacer.Pacer`). If the caller talks over it, the bot stops at
once (``FLUSH_MEDIA``) and says how much of the greeting was heard, from
``MEDIA_FLUSHED``; otherwise it says goodbye. Then it hangs up. Every
playback event is logged with its position, so the log shows the marks.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

from harness import audio, tts
from harness.bot import BotError, BotServer, BotSession
from harness.events import Event
from harness.pacer import Pacer, PacingResult
from harness.service import Service

log = logging.getLogger(__name__)

GREETING = (
    "Hello, you are talking to a bot over Asterisk's WebSocket channel. "
    "It streams this sentence in small chunks and places a mark after each one, "
    "and Asterisk tells it the moment each chunk has been played. "
    "Say something while I am talking, and I will stop and tell you how much you heard."
)
#: The events the bot logs as they arrive.
PLAYBACK_EVENTS = ("MARK_PLAYED", "MARK_CLEARED", "MEDIA_FLUSHED", "MEDIA_MARK_PROCESSED")
#: RMS level (16-bit scale) above which the caller's audio counts as speech.
SPEECH_LEVEL = 1000
#: How long the caller must talk before the bot stops (ms).
SPEECH_MS = 200


class DemoBot(Service):
    """A bot server answering every call with the greeting; an async context manager."""

    def __init__(self, host: str, port: int, *, greeting: str = GREETING) -> None:
        self.server = BotServer(host, port, on_session=self.handle)
        self.greeting = greeting
        self._prompt: audio.Prompt | None = None
        self._calls = itertools.count(1)

    async def start(self) -> None:
        self._prompt = await asyncio.to_thread(audio.render_prompt, self.greeting)
        log.info(
            "demo bot: greeting of %.1f s from %s", self._prompt.ms / 1000, self._prompt.source
        )
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def handle(self, session: BotSession) -> None:
        """One call, from MEDIA_START to hang-up."""
        call = next(self._calls)
        follow = asyncio.create_task(_log_events(call, session))
        try:
            await self._converse(call, session)
        except BotError as exc:
            log.info("call %d: ended early: %s", call, exc)
        except Exception:
            log.exception("call %d: the bot failed", call)
            with contextlib.suppress(Exception):
                await session.command("HANGUP")
        finally:
            follow.cancel()

    async def _converse(self, call: int, session: BotSession) -> None:
        assert self._prompt is not None, "bot not started"
        start = await session.wait_for("MEDIA_START")
        log.info("call %d: connected (%s): %s", call, session.path, start.raw)
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
            await _wait_played(session, result)
            reply = "You heard all of it. Goodbye."
        speech = await asyncio.to_thread(audio.render_prompt, reply)
        await _wait_played(session, await Pacer(session).play(tts.speak(speech.ulaw)))
        log.info("call %d: hanging up", call)
        await session.command("HANGUP")
        await session.wait_closed()


async def _wait_played(session: BotSession, result: PacingResult) -> Event | None:
    """The acknowledgment of a response's last mark, if it placed any."""
    if not result.marks:
        return None
    return await session.wait_mark(result.marks[-1][0], timeout=30.0)


async def _caller_talks(session: BotSession) -> None:
    """Return once the caller's audio has been loud for :data:`SPEECH_MS`."""
    loud_ms = 0.0
    # The bot keeps no history of the caller's audio (a long call's memory
    # stays flat): each poll takes what arrived since the last one.
    session.audio_in.clear()
    while not session.closed.is_set():
        await asyncio.sleep(0.05)
        fresh = list(session.audio_in)
        session.audio_in.clear()
        for piece in fresh:
            if audio.level(piece.data) >= SPEECH_LEVEL:
                loud_ms += audio.ms_of(len(piece.data))
            else:
                loud_ms = 0.0
        if loud_ms >= SPEECH_MS:
            return


async def _log_events(call: int, session: BotSession) -> None:
    """Log each playback event as it arrives."""
    after = -1
    while True:
        try:
            event = await session.wait_for(PLAYBACK_EVENTS, after=after, timeout=3600.0)
        except BotError:
            return
        after = event.index
        log.info("call %d: %s", call, event.raw)
