"""A minimal bot: stream a WAV file into each call, a mark after each chunk,
and report when each chunk has been played.

It needs only the astmarks library (``pip install astmarks``). Asterisk dials
it: in ``websocket_client.conf`` a connection whose ``uri`` is this bot's
(``ws://HOST:PORT/media``), and in the dialplan
``Dial(WebSocket/<connection>/c(ulaw))``. Then::

    python examples/stream_wav.py hello.wav --listen 0.0.0.0:8765

The file is 16-bit mono PCM; it is sent in the call's format (``ulaw``,
``alaw``, or ``slin`` at the file's rate). The bot keeps at most ``--ahead``
chunks queued in Asterisk: it sends the next chunk when the mark of the one
``--ahead`` back has been played, so a file of any length streams with a
bounded queue. Each chunk's line says where in the call it finished playing
and how long after it was sent; on an Asterisk without mark positions mode,
MARK_MEDIA is answered one ptime late without positions, and the bot says so.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import sys
import time
import warnings
import wave
from pathlib import Path

import astmarks
from astmarks import Mark, MarkPlayed, MediaSession, MediaSessionError

#: The μ-law and A-law codecs (audioop: the standard library up to Python 3.12;
#: on 3.13 and later, ``pip install audioop-lts``).
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
except ImportError:  # pragma: no cover - Python 3.13+ without audioop-lts
    audioop = None  # type: ignore[assignment]


def load_wav(path: Path) -> tuple[bytes, int]:
    """16-bit mono PCM and its rate; ValueError if the file is something else."""
    with wave.open(str(path), "rb") as wav:
        if wav.getnchannels() != 1 or wav.getsampwidth() != 2:
            raise ValueError(f"{path}: not 16-bit mono PCM (sox in.wav -b 16 -c 1 out.wav)")
        return wav.readframes(wav.getnframes()), wav.getframerate()


def encode(pcm: bytes, rate: int, codec: str) -> bytes:
    """*pcm* in the call's media format."""
    slin_rates = {"slin": 8000, "slin16": 16000, "slin24": 24000, "slin48": 48000}
    if codec in slin_rates:
        if rate != slin_rates[codec]:
            raise ValueError(f"the call wants {codec} ({slin_rates[codec]} Hz); the file is {rate}")
        return pcm
    if codec not in ("ulaw", "alaw"):
        raise ValueError(f"this example does not encode {codec}")
    if audioop is None:
        raise ValueError("μ-law and A-law need audioop: pip install audioop-lts")
    if rate != 8000:
        pcm, _ = audioop.ratecv(pcm, 2, 1, rate, 8000, None)
    return audioop.lin2ulaw(pcm, 2) if codec == "ulaw" else audioop.lin2alaw(pcm, 2)


async def stream(session: MediaSession, pcm: bytes, rate: int, args: argparse.Namespace) -> None:
    """Send the file in chunks, at most ``args.ahead`` queued; report each."""
    caps = await session.started()
    print(
        f"call {caps.channel}: {caps.codec}, {caps.ptime} ms frames, "
        + (
            "exact marks with positions"
            if caps.marks
            else "no mark positions mode here: MARK_MEDIA one ptime late, no positions"
        ),
        flush=True,
    )
    media = encode(pcm, rate, caps.codec)
    # Whole frames only: Asterisk holds a partial last frame until more comes.
    frame = caps.optimal_frame_size
    media += bytes([{"ulaw": 0xFF, "alaw": 0xD5}.get(caps.codec, 0)]) * (-len(media) % frame)
    size = max(frame, int(args.chunk_ms * caps.bytes_per_ms) // frame * frame)
    starts = range(0, len(media), size)
    queued: collections.deque[tuple[int, float, Mark]] = collections.deque()
    for index, start in enumerate(starts):
        while len(queued) >= args.ahead:
            await report(*queued.popleft())
        await session.send_audio(media[start : start + size])
        queued.append((index, time.monotonic(), await session.mark(f"chunk-{index}")))
    while queued:
        await report(*queued.popleft())
    print(f"call {caps.channel}: all {len(starts)} chunks played; hanging up", flush=True)
    await session.hangup()


async def report(index: int, sent: float, mark: Mark) -> None:
    result = await mark.result(timeout=30)
    after_ms = (time.monotonic() - sent) * 1000
    if isinstance(result, MarkPlayed) and result.played_ms is not None:
        print(
            f"chunk {index}: played at {result.played_ms} ms of the call "
            f"({result.queued_ms} ms still queued), {after_ms:.0f} ms after it was sent",
            flush=True,
        )
    elif isinstance(result, MarkPlayed):
        print(f"chunk {index}: played, {after_ms:.0f} ms after it was sent", flush=True)
    else:
        print(f"chunk {index}: cleared ({result.reason}), never played", flush=True)


async def main(args: argparse.Namespace) -> int:
    try:
        pcm, rate = load_wav(args.wav)
    except (OSError, EOFError, wave.Error, ValueError) as exc:
        print(f"stream_wav: error: {args.wav}: {exc}", file=sys.stderr)
        return 2
    done = asyncio.Event()

    async def call(session: MediaSession) -> None:
        try:
            await stream(session, pcm, rate, args)
        except (MediaSessionError, ValueError) as exc:
            print(f"the call ended: {exc}", flush=True)
        if args.once:
            done.set()

    host, _, port = args.listen.rpartition(":")
    async with astmarks.serve(call, host, int(port)):
        print(f"listening on ws://{args.listen}/media", flush=True)
        await done.wait()
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", type=Path, help="16-bit mono PCM WAV")
    parser.add_argument("--listen", default="127.0.0.1:8765", help="HOST:PORT to serve on")
    parser.add_argument("--chunk-ms", type=int, default=200, help="ms of audio per chunk")
    parser.add_argument(
        "--ahead", type=_positive, default=3, help="chunks queued at most (1 or more)"
    )
    parser.add_argument("--once", action="store_true", help="exit after one call")
    return parser.parse_args(argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        sys.exit(asyncio.run(main(parse_args())))
    except KeyboardInterrupt:
        sys.exit(130)
