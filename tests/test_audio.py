"""Tagged frames, prompt rendering and framing helpers."""

from __future__ import annotations

import shutil

import pytest

from harness import audio
from tests.conftest import need


def test_tagged_frames_identify_themselves() -> None:
    for i in (0, 1, 255, 256, 70000, (1 << 24) - 1):
        frame = audio.tagged_frame(i)
        assert len(frame) == audio.FRAME_BYTES
        assert audio.frame_index(frame) == i


def test_tagged_frames_differ_and_are_not_silence() -> None:
    frames = {audio.tagged_frame(i) for i in range(500)}
    assert len(frames) == 500
    assert all(audio.ULAW_SILENCE not in f[4:] for f in frames)


def test_frame_index_rejects_foreign_payloads() -> None:
    assert audio.frame_index(b"\xff" * 160) is None
    damaged = bytearray(audio.tagged_frame(3))
    damaged[100] ^= 1
    assert audio.frame_index(bytes(damaged)) is None
    assert audio.frame_index(b"\xa5\x00") is None


def test_short_tagged_frames() -> None:
    frame = audio.tagged_frame(9, 50)
    assert len(frame) == 50
    assert audio.frame_index(frame) == 9
    with pytest.raises(ValueError):
        audio.tagged_frame(1, 3)
    with pytest.raises(ValueError):
        audio.tagged_frame(1 << 24)


def test_ms_of() -> None:
    assert audio.ms_of(1600) == 200


def test_tone_is_ulaw_of_the_right_length() -> None:
    t = audio.tone(440.0, 100)
    assert len(t) == 800
    assert len(set(t)) > 10


def test_prompt_is_spoken_when_espeak_is_installed() -> None:
    need(
        shutil.which("espeak-ng") is not None and shutil.which("sox") is not None,
        "espeak-ng and sox are needed: make setup",
    )
    p = audio.render_prompt("testing one two three")
    assert p.source == "espeak-ng"
    assert 500 < p.ms < 5000
