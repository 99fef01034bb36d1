"""A stand-in for a streaming TTS engine: chunks produced on demand.

A streaming TTS engine yields a response as chunks of uneven size; each takes
a moment to generate after the previous one was taken (time to first byte for
the first, then tens of ms, now and then a stall). :func:`stream` is an async
generator with that behaviour: like a real stream it does its work when the
consumer asks for the next chunk, so a consumer that paces its reads paces
the generation. Seeded, so runs compare. The audio is a stream of tagged
frames, so every byte can be found again in the RTP capture; chunk
boundaries fall anywhere, not on frame boundaries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass

from harness import audio


@dataclass(frozen=True)
class TtsProfile:
    """How the simulated engine behaves. Times in seconds."""

    ttfb: float = 0.2
    chunk_ms: tuple[int, int] = (60, 400)
    delay: tuple[float, float] = (0.02, 0.12)  # generation time of a chunk
    stall_probability: float = 0.03
    stall: float = 0.3
    seed: int = 1


def plan(total_ms: int, profile: TtsProfile) -> list[tuple[bytes, float]]:
    """The chunks of a *total_ms* response of tagged frames, each with its
    generation time (s)."""
    frames = -(-total_ms // audio.FRAME_MS)
    data = audio.tagged_frames(0, frames)[: total_ms * audio.BYTES_PER_MS]
    return plan_audio(data, profile)


def plan_audio(data: bytes, profile: TtsProfile) -> list[tuple[bytes, float]]:
    """*data* cut into chunks the way the engine would, each with its generation time."""
    rng = random.Random(profile.seed)
    chunks: list[tuple[bytes, float]] = []
    offset = 0
    while offset < len(data):
        size = rng.randint(*profile.chunk_ms) * audio.BYTES_PER_MS + rng.randint(0, 7)
        if not chunks:
            delay = profile.ttfb
        elif rng.random() < profile.stall_probability:
            delay = profile.stall
        else:
            delay = rng.uniform(*profile.delay)
        chunks.append((data[offset : offset + size], delay))
        offset += size
    return chunks


async def replay(chunks: list[tuple[bytes, float]]) -> AsyncIterator[bytes]:
    """Yield planned chunks, generating each when asked."""
    for data, delay in chunks:
        await asyncio.sleep(delay)
        yield data


def stream(total_ms: int, profile: TtsProfile | None = None) -> AsyncIterator[bytes]:
    """Yield the chunks of a *total_ms* response, generating each when asked."""
    return replay(plan(total_ms, profile or TtsProfile()))


def speak(data: bytes, profile: TtsProfile | None = None) -> AsyncIterator[bytes]:
    """Stream rendered speech (*data*, μ-law) the way the engine would."""
    return replay(plan_audio(data, profile or TtsProfile()))
