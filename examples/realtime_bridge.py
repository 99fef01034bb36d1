"""A bridge between a call and a speech-to-speech model shaped like OpenAI's
Realtime API, with exact barge-in truncation.

The model's audio (``response.audio.delta``) is paced into the call by
:class:`astmarks.pacer.Pacer`; the caller's audio goes to the model
(``input_audio_buffer.append``). When the model hears the caller start to
talk (``input_audio_buffer.speech_started``), the bridge stops the answer at
once and tells the model how much of it the caller actually heard::

    {"type": "conversation.item.truncate", "item_id": "...",
     "content_index": 0, "audio_end_ms": 1840}

``audio_end_ms`` comes from ``MEDIA_FLUSHED``: the position where Asterisk
stopped playing, exact to the frame, not what was sent (which runs ahead by
what is queued) nor a clock's guess. The model then forgets what the caller
never heard.

The model here is :class:`StandInModel`, local and offline: the events of
the Realtime API's beta interface in their shapes (server VAD on the
caller's audio, spoken answers as g711_ulaw deltas, generated faster than
real time, as a real model does). For the real service, give :func:`bridge`
an object with the same two methods (``send(event)``, ``events()``) over a
WebSocket to ``wss://api.openai.com/v1/realtime`` with ``g711_ulaw`` in both
directions; the generally available interface renames some events
(``response.output_audio.delta`` for ``response.audio.delta``, the formats
under ``session.audio``), which is a change of names in :func:`bridge`.

Asterisk dials it as in ``stream_wav.py`` (``Dial(WebSocket/<connection>/c(ulaw))``)::

    python examples/realtime_bridge.py --listen 0.0.0.0:8765

Each event the bridge sends the model, and each answer's fate, is a line on
stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import logging
import math
import struct
import sys
import warnings
from collections.abc import AsyncIterator
from typing import Any, Protocol

import astmarks
from astmarks import MediaSession, MediaSessionError
from astmarks.pacer import Pacer, PacingResult

try:  # audioop: the standard library up to Python 3.12; pip install audioop-lts after
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
except ImportError:  # pragma: no cover - Python 3.13+ without audioop-lts
    sys.exit("realtime_bridge: the stand-in model needs audioop: pip install audioop-lts")

Event = dict[str, Any]
#: The model's audio format, and Asterisk's for the call: 8 kHz μ-law.
BYTES_PER_MS = 8


class Model(Protocol):
    """What the bridge needs of a Realtime-style model connection."""

    async def send(self, event: Event) -> None: ...

    def events(self) -> AsyncIterator[Event]: ...


# --- the bridge ----------------------------------------------------------------------


async def bridge(session: MediaSession, model: Model, *, answers: int = 2) -> None:
    """Connect one call to *model* until it has given *answers* answers
    (interrupted ones included), then hang up."""
    caps = await session.started()
    if caps.codec != "ulaw":
        raise ValueError(f"the model speaks g711_ulaw: dial with c(ulaw), not {caps.codec}")
    # The model's events and the bridge's own ("bridge.played": an answer has
    # been played in full), one at a time: the loop below never waits long.
    inbox: asyncio.Queue[Event] = asyncio.Queue()
    tasks: set[asyncio.Task[Any]] = {
        asyncio.create_task(_forward(model, inbox)),
        asyncio.create_task(_uplink(session, model)),
    }
    pacer = Pacer(session)
    playing: asyncio.Task[PacingResult] | None = None
    deltas: asyncio.Queue[bytes | None] = asyncio.Queue()
    item_id = ""
    given = 0
    try:
        await tell(
            model,
            {
                "type": "session.update",
                "session": {
                    "input_audio_format": "g711_ulaw",
                    "output_audio_format": "g711_ulaw",
                    "turn_detection": {"type": "server_vad"},
                },
            },
        )
        await tell(model, {"type": "response.create"})
        async for event in _until_closed(session, inbox):
            kind = event["type"]
            if kind == "response.output_item.added":
                item_id = event["item"]["id"]
                deltas = asyncio.Queue()
                playing = asyncio.create_task(pacer.play(_chunks(deltas)))
                tasks |= {playing, asyncio.create_task(_watch(playing, item_id, inbox))}
            elif kind == "response.audio.delta" and event["item_id"] == item_id:
                deltas.put_nowait(base64.b64decode(event["delta"]))
            elif kind == "response.audio.done" and event["item_id"] == item_id:
                deltas.put_nowait(None)
            elif kind == "response.done":
                # The end of the audio, also of a response that ends without
                # response.audio.done (cancelled, failed, no audio).
                deltas.put_nowait(None)
            elif kind == "input_audio_buffer.speech_started" and playing is not None:
                # Barge-in: stop the answer wherever it is (still being sent,
                # or sent and still playing), and truncate it where the caller
                # stopped hearing it.
                result = await pacer.interrupt()
                playing = None
                if result is not None and result.heard_ms is not None:
                    await tell(
                        model,
                        {
                            "type": "conversation.item.truncate",
                            "item_id": item_id,
                            "content_index": 0,
                            "audio_end_ms": round(result.heard_ms),
                        },
                    )
                    given += 1
            elif kind == "bridge.played" and event["item_id"] == item_id:
                print(f"answer {item_id}: played in full", flush=True)
                playing = None
                given += 1
            if given >= answers:
                break
        print("hanging up", flush=True)
        await session.hangup()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _forward(model: Model, inbox: asyncio.Queue[Event]) -> None:
    async for event in model.events():
        inbox.put_nowait(event)


async def _watch(
    playing: asyncio.Task[PacingResult], item_id: str, inbox: asyncio.Queue[Event]
) -> None:
    """Say "bridge.played" once the answer has been played in full (not if interrupted)."""
    result = await playing
    if result.interrupted:
        return
    with contextlib.suppress(MediaSessionError):
        played = await result.played(timeout=60)
        if played is not None and played.played:
            inbox.put_nowait({"type": "bridge.played", "item_id": item_id})


async def tell(model: Model, event: Event) -> None:
    """Send *event* to the model; show what the bridge says (not the audio)."""
    if event["type"] != "input_audio_buffer.append":
        print(json.dumps(event), flush=True)
    await model.send(event)


async def _uplink(session: MediaSession, model: Model) -> None:
    """The caller's audio, to the model."""
    async for piece in session.audio():
        await model.send(
            {"type": "input_audio_buffer.append", "audio": base64.b64encode(piece).decode()}
        )


async def _chunks(deltas: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    """The answer's audio as the model produces it; ends at response.audio.done."""
    while (chunk := await deltas.get()) is not None:
        yield chunk


async def _until_closed(session: MediaSession, inbox: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    """The events in *inbox* until the call ends."""
    closed = asyncio.ensure_future(session.closed.wait())
    try:
        while True:
            following = asyncio.ensure_future(inbox.get())
            await asyncio.wait({following, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not following.done():
                following.cancel()
                return
            yield following.result()
    finally:
        closed.cancel()


# --- the stand-in model --------------------------------------------------------------


class StandInModel:
    """A local stand-in for a Realtime model.

    Server VAD: the caller's audio is speech while its level stays above
    ``SPEECH_RMS`` for 100 ms; 300 ms below ends it. An answer is a tone
    that moves between pitches, ``answer_s`` long, sent in deltas of uneven
    size faster than real time. Speech cancels the answer being generated
    (as ``interrupt_response`` does) and, once the caller stops, the model
    answers again.
    """

    SPEECH_RMS = 1000

    def __init__(self, answer_s: float = 6.0) -> None:
        self.answer_s = answer_s
        self._out: asyncio.Queue[Event] = asyncio.Queue()
        self._ids = itertools.count(1)
        self._speaking: asyncio.Task[None] | None = None
        self._loud_ms = 0.0
        self._quiet_ms = 0.0
        self._talking = False
        self._heard_ms = 0.0
        #: What the model was told to forget: each truncate event.
        self.truncated: list[Event] = []

    async def send(self, event: Event) -> None:
        kind = event["type"]
        if kind == "session.update":
            self._emit({"type": "session.updated", "session": event["session"]})
        elif kind == "input_audio_buffer.append":
            self._hear(base64.b64decode(event["audio"]))
        elif kind == "response.create":
            self._respond()
        elif kind == "conversation.item.truncate":
            self.truncated.append(event)
            self._emit({**event, "type": "conversation.item.truncated"})

    async def events(self) -> AsyncIterator[Event]:
        while True:
            yield await self._out.get()

    def _emit(self, event: Event) -> None:
        self._out.put_nowait({"event_id": f"event_{next(self._ids)}", **event})

    def _hear(self, ulaw: bytes) -> None:
        ms = len(ulaw) / BYTES_PER_MS
        self._heard_ms += ms
        if audioop.rms(audioop.ulaw2lin(ulaw, 2), 2) >= self.SPEECH_RMS:
            self._loud_ms += ms
            self._quiet_ms = 0.0
            if not self._talking and self._loud_ms >= 100:
                self._talking = True
                self._emit(
                    {
                        "type": "input_audio_buffer.speech_started",
                        "audio_start_ms": round(self._heard_ms - self._loud_ms),
                    }
                )
                if self._speaking is not None and not self._speaking.done():
                    self._speaking.cancel()
        else:
            self._loud_ms = 0.0
            self._quiet_ms += ms
            if self._talking and self._quiet_ms >= 300:
                self._talking = False
                self._emit(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "audio_end_ms": round(self._heard_ms),
                    }
                )
                self._respond()

    def _respond(self) -> None:
        n = next(self._ids)
        self._speaking = asyncio.create_task(self._speak(f"resp_{n}", f"item_{n}"))

    async def _speak(self, response_id: str, item_id: str) -> None:
        self._emit({"type": "response.created", "response": {"id": response_id}})
        self._emit(
            {
                "type": "response.output_item.added",
                "response_id": response_id,
                "item": {"id": item_id, "type": "message", "role": "assistant"},
            }
        )
        status = "completed"
        try:
            for delta in _voice(self.answer_s):
                self._emit(
                    {
                        "type": "response.audio.delta",
                        "response_id": response_id,
                        "item_id": item_id,
                        "output_index": 0,
                        "content_index": 0,
                        "delta": base64.b64encode(delta).decode(),
                    }
                )
                await asyncio.sleep(0.01)  # a model runs ahead of real time
        except asyncio.CancelledError:
            status = "cancelled"
        self._emit({"type": "response.audio.done", "response_id": response_id, "item_id": item_id})
        self._emit({"type": "response.done", "response": {"id": response_id, "status": status}})


def _voice(seconds: float) -> list[bytes]:
    """A loud tone that moves between pitches, in μ-law deltas of 40 to 220 ms."""
    samples = []
    phase = 0.0
    for i in range(int(seconds * 8000)):
        pitch = (220.0, 330.0, 262.0, 392.0)[i // 2400 % 4]
        phase += 2 * math.pi * pitch / 8000
        samples.append(int(9000 * math.sin(phase)))
    ulaw = audioop.lin2ulaw(struct.pack(f"<{len(samples)}h", *samples), 2)
    sizes = itertools.cycle((320, 960, 1760, 480, 1280))
    deltas, at = [], 0
    while at < len(ulaw):
        size = next(sizes)
        deltas.append(ulaw[at : at + size])
        at += size
    return deltas


# --- serving -------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> int:
    done = asyncio.Event()

    async def call(session: MediaSession) -> None:
        try:
            await bridge(session, StandInModel(args.answer_s), answers=args.answers)
        except (MediaSessionError, ValueError) as exc:
            print(f"the call ended: {exc}", flush=True)
        if args.once:
            done.set()

    host, _, port = args.listen.rpartition(":")
    async with astmarks.serve(call, host, int(port)):
        print(f"listening on ws://{args.listen}/media", flush=True)
        await done.wait()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT to serve on")
    parser.add_argument("--answer-s", type=float, default=6.0, help="seconds of each answer")
    parser.add_argument("--answers", type=int, default=2, help="answers before hanging up")
    parser.add_argument("--once", action="store_true", help="exit after one call")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except KeyboardInterrupt:
        sys.exit(130)
