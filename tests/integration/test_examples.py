"""The examples under examples/, run as a bot author runs them, on real calls.

Each runs as a program of its own with the Python of a fresh virtualenv that
holds the astmarks wheel and nothing else (``client_venv``): what the
examples import, a bot author's install has. Asterisk dials it, a real SIP
phone calls, and what the example prints is held against the RTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from harness import audio
from harness.caller import SipPhone
from harness.ports import LOOPBACK, free_port
from harness.timing import units
from tests.conftest import ROOT, report
from tests.integration.ownbot import asterisk_for, call

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "examples"


@dataclass
class Program:
    """A running example: its output lines, each with when it was read."""

    uri: str
    lines: list[tuple[float, str]] = field(default_factory=list)
    _more: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_line(self, text: str, timeout: float) -> tuple[float, str]:
        async def found() -> tuple[float, str]:
            while True:
                for t, line in self.lines:
                    if text in line:
                        return t, line
                self._more.clear()
                await self._more.wait()

        try:
            return await asyncio.wait_for(found(), timeout)
        except TimeoutError:
            raise AssertionError(f"no line with {text!r} in {timeout:.0f} s: {self.text}") from None

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@contextlib.asynccontextmanager
async def example(python: Path, script: str, *args: str) -> AsyncIterator[Program]:
    """Run examples/*script* with *python*, serving on a free loopback port."""
    listen = f"{LOOPBACK}:{free_port()}"
    proc = await asyncio.create_subprocess_exec(
        str(python),
        str(EXAMPLES / script),
        *args,
        "--listen",
        listen,
        "--once",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    program = Program(f"ws://{listen}/media")

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            program.lines.append((time.time(), raw.decode(errors="replace").rstrip()))
            program._more.set()

    reader = asyncio.create_task(read())
    try:
        await program.wait_line("listening on", units(20))
        yield program
        await asyncio.wait_for(proc.wait(), units(10))
        assert proc.returncode == 0, program.text
    except BaseException:
        print(f"--- {script} printed:\n{program.text}")  # noqa: T201 - the failure report
        raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await reader


def loud(packet_payload: bytes) -> bool:
    return audio.level(packet_payload) > 300


async def test_stream_wav_reports_each_chunk_where_it_played(
    install: Path, phone: SipPhone, capture_ok: None, client_venv: Path, tmp_path: Path
) -> None:
    wav = audio.write_wav(tmp_path / "tone.wav", audio.tone(440.0, 2000, level=0.5))
    async with (
        example(client_venv, "stream_wav.py", str(wav)) as program,
        asterisk_for(install, program.uri, "example") as asterisk,
        call(asterisk, phone) as live,
    ):
        await program.wait_line("hanging up", units(20))
        await live.sip.wait_disconnected(timeout=units(10))
    played = [line for _, line in program.lines if line.startswith("chunk ")]
    assert len(played) == 10, program.text
    positions = [int(line.split("played at ")[1].split()[0]) for line in played]
    assert positions == [200 * (i + 1) for i in range(10)], "each chunk's end, to the ms"
    heard = sum(1 for p in live.packets if loud(p.payload))
    report("example stream_wav: chunks reported / loud RTP packets", f"{len(played)} / {heard}")
    assert 98 <= heard <= 101, "the whole file reached the caller"


async def test_stream_wav_on_upstream_says_there_are_no_positions(
    upstream_install: Path, phone: SipPhone, capture_ok: None, client_venv: Path, tmp_path: Path
) -> None:
    wav = audio.write_wav(tmp_path / "tone.wav", audio.tone(440.0, 1000, level=0.5))
    async with (
        example(client_venv, "stream_wav.py", str(wav)) as program,
        asterisk_for(upstream_install, program.uri, "example-upstream") as asterisk,
        call(asterisk, phone) as live,
    ):
        await program.wait_line("hanging up", units(20))
        await live.sip.wait_disconnected(timeout=units(10))
    assert "no mark positions mode here" in program.text
    played = [line for _, line in program.lines if line.startswith("chunk ")]
    assert len(played) == 5 and all("ms after it was sent" in line for line in played)
    assert "has no mark positions mode" in program.text, "the library says so (once, in the log)"
    assert program.text.count("has no mark positions mode") == 1


async def test_realtime_bridge_truncates_where_the_caller_stopped_hearing(
    install: Path, phone: SipPhone, capture_ok: None, client_venv: Path, tmp_path: Path
) -> None:
    talk = audio.write_wav(tmp_path / "talk.wav", audio.tone(300.0, 800, level=0.5))
    async with (
        example(client_venv, "realtime_bridge.py", "--answer-s", "4") as program,
        asterisk_for(install, program.uri, "example") as asterisk,
        call(asterisk, phone) as live,
    ):
        await program.wait_line('"response.create"', units(20))
        await asyncio.sleep(1.5)
        await live.sip.play(talk)
        truncated_at, line = await program.wait_line("conversation.item.truncate", units(20))
        await program.wait_line("played in full", units(30))
        await live.sip.wait_disconnected(timeout=units(10))
    truncate = json.loads(line)
    assert truncate["content_index"] == 0 and truncate["item_id"].startswith("item_")
    # The first answer's audio the caller got: the loud packets before the
    # truncation (the second answer starts after the caller stops talking).
    on_rtp = 20 * sum(1 for p in live.packets if p.t < truncated_at and loud(p.payload))
    report(
        "example realtime_bridge: audio_end_ms vs the answer's RTP",
        f"{truncate['audio_end_ms']} ms vs {on_rtp} ms",
    )
    assert abs(truncate["audio_end_ms"] - on_rtp) <= 20, program.text
    assert 1400 <= truncate["audio_end_ms"] <= 3000, "the caller talked about 1.5 s in"
    assert "hanging up" in program.text
