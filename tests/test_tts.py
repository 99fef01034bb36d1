"""The simulated streaming TTS engine."""

from __future__ import annotations

import time

from harness import audio, tts


def test_plan_is_deterministic_and_covers_the_response() -> None:
    profile = tts.TtsProfile(seed=3)
    a = tts.plan(5000, profile)
    assert a == tts.plan(5000, profile)
    data = b"".join(d for d, _ in a)
    assert len(data) == 5000 * audio.BYTES_PER_MS
    assert data == audio.tagged_frames(0, 250)
    sizes = [len(d) for d, _ in a[:-1]]
    assert all(60 * 8 <= n <= 400 * 8 + 7 for n in sizes)
    assert any(n % audio.FRAME_BYTES for n in sizes), "chunks are not frame-aligned"
    assert a[0][1] == profile.ttfb


async def test_stream_generates_on_demand() -> None:
    profile = tts.TtsProfile(ttfb=0.05, delay=(0.01, 0.01), stall_probability=0.0)
    t0 = time.monotonic()
    chunks = [c async for c in tts.stream(600, profile)]
    elapsed = time.monotonic() - t0
    assert b"".join(chunks) == b"".join(d for d, _ in tts.plan(600, profile))
    assert elapsed >= 0.05 + 0.01 * (len(chunks) - 1) - 0.005
