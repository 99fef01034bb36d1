"""Audio for the bot: a spoken prompt in μ-law, and frames tagged for matching.

μ-law at 8 kHz is 8 bytes per ms and 160 bytes per 20 ms frame. The channel
is ulaw end to end (no transcoding), so a tagged frame the bot sends comes out
byte for byte in the RTP that Asterisk sends to the caller.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
import tempfile
import warnings
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
BYTES_PER_MS = 8
FRAME_MS = 20
FRAME_BYTES = FRAME_MS * BYTES_PER_MS

TAG_MAGIC = 0xA5
#: The μ-law byte for digital silence.
ULAW_SILENCE = 0xFF


def ms_of(nbytes: int) -> float:
    """Duration in ms of *nbytes* of μ-law."""
    return nbytes / BYTES_PER_MS


def _ulaw_to_linear(code: int) -> int:
    """G.711 μ-law to 16-bit signed linear (Asterisk's table)."""
    u = ~code & 0xFF
    magnitude = ((((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)) - 0x84
    return -magnitude if u & 0x80 else magnitude


#: The signed linear value of each μ-law code.
ULAW_LINEAR: tuple[int, ...] = tuple(_ulaw_to_linear(code) for code in range(256))


def tagged_frame(index: int, size: int = FRAME_BYTES) -> bytes:
    """A frame whose bytes identify it: magic, 24-bit index, then an index-derived fill."""
    if not 0 <= index < 1 << 24:
        raise ValueError(f"frame index {index} out of range")
    if size < 4:
        raise ValueError("a tagged frame needs at least 4 bytes")
    head = bytes([TAG_MAGIC, (index >> 16) & 0xFF, (index >> 8) & 0xFF, index & 0xFF])
    fill = bytes(((index * 37 + k * 11) & 0x7F) | 0x10 for k in range(size - 4))
    return head + fill


def tagged_frames(start: int, count: int, size: int = FRAME_BYTES) -> bytes:
    """*count* consecutive tagged frames starting at index *start*."""
    return b"".join(tagged_frame(i, size) for i in range(start, start + count))


def frame_index(payload: bytes) -> int | None:
    """The index of a tagged frame if *payload* is exactly one, else None."""
    if len(payload) < 4 or payload[0] != TAG_MAGIC:
        return None
    index = (payload[1] << 16) | (payload[2] << 8) | payload[3]
    return index if payload == tagged_frame(index, len(payload)) else None


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: μ-law bytes and how it was made."""

    ulaw: bytes
    source: str  # "espeak-ng" or "tone"

    @property
    def ms(self) -> float:
        return ms_of(len(self.ulaw))


def render_prompt(text: str) -> Prompt:
    """Speak *text* with espeak-ng (via sox to 8 kHz μ-law); a tone if unavailable."""
    espeak = shutil.which("espeak-ng")
    sox = shutil.which("sox")
    if espeak and sox:
        with tempfile.TemporaryDirectory() as tmp:
            wav = Path(tmp) / "prompt.wav"
            raw = Path(tmp) / "prompt.ul"
            try:
                subprocess.run(
                    [espeak, "-s", "160", "-w", str(wav), text],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                subprocess.run(
                    [
                        sox,
                        str(wav),
                        "-r",
                        str(SAMPLE_RATE),
                        "-c",
                        "1",
                        "-e",
                        "u-law",
                        "-t",
                        "ul",
                        str(raw),
                    ],
                    check=True,
                    capture_output=True,
                    timeout=30,
                )
                return Prompt(raw.read_bytes(), "espeak-ng")
            except (subprocess.SubprocessError, OSError) as exc:
                log.warning("espeak-ng/sox failed (%s); using a tone instead", exc)
    else:
        log.warning("espeak-ng or sox not installed; the prompt is a tone")
    return Prompt(tone(440.0, 2000), "tone")


def _audioop() -> Any:
    """The standard library's audioop (deprecated, still the simplest μ-law codec)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop

    return audioop


def level(ulaw: bytes) -> int:
    """RMS level of μ-law audio, on the 16-bit linear scale (0 for nothing)."""
    if not ulaw:
        return 0
    audioop = _audioop()
    return int(audioop.rms(audioop.ulaw2lin(ulaw, 2), 2))


def ulaw_to_slin(ulaw: bytes) -> bytes:
    """μ-law as the 16-bit signed linear (host order) that encodes back to it."""
    data: bytes = _audioop().ulaw2lin(ulaw, 2)
    return data


@dataclass(frozen=True)
class Codec:
    """A codec chan_websocket accepts with ``c(<name>)``, as the harness sends it."""

    name: str
    rate: int
    #: Bytes per sample (each codec here has a fixed number).
    width: int

    @property
    def frame_bytes(self) -> int:
        """Bytes in one 20 ms frame (chan_websocket's ``optimal_frame_size``)."""
        return self.rate * FRAME_MS // 1000 * self.width

    def ms(self, nbytes: int) -> int:
        """Whole milliseconds in *nbytes*, counting whole samples as Asterisk does."""
        return nbytes // self.width * 1000 // self.rate

    def encode(self, ulaw: bytes) -> bytes:
        """μ-law audio in this codec (resampled for the wideband ones)."""
        audioop = _audioop()
        if self.name == "ulaw":
            return ulaw
        pcm: bytes = audioop.ulaw2lin(ulaw, 2)
        if self.name == "alaw":
            alaw: bytes = audioop.lin2alaw(pcm, 2)
            return alaw
        if self.rate != SAMPLE_RATE:
            pcm, _ = audioop.ratecv(pcm, 2, 1, SAMPLE_RATE, self.rate, None)
        return pcm


#: The codecs whose positions the tests check: every one chan_websocket
#: re-frames itself (passthrough codecs are one message per frame).
CODECS = {
    c.name: c
    for c in (
        Codec("ulaw", 8000, 1),
        Codec("alaw", 8000, 1),
        Codec("slin", 8000, 2),
        Codec("slin16", 16000, 2),
        Codec("slin48", 48000, 2),
    )
}


def write_wav(path: Path, ulaw: bytes) -> Path:
    """Write μ-law audio as the 8 kHz 16-bit mono WAV file a SIP phone plays."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes(ulaw_to_slin(ulaw))
    return path


def tone(freq: float, duration_ms: int, level: float = 0.3) -> bytes:
    """A sine tone as μ-law."""
    audioop = _audioop()
    n = duration_ms * SAMPLE_RATE // 1000
    amp = int(32767 * level)
    pcm = b"".join(
        int(amp * math.sin(2 * math.pi * freq * i / SAMPLE_RATE)).to_bytes(2, "little", signed=True)
        for i in range(n)
    )
    ulaw: bytes = audioop.lin2ulaw(pcm, 2)
    return ulaw
