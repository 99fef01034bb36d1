"""Instructions Asterisk executes per call-second, counted by callgrind.

Seconds of CPU on a shared machine are noise (rounds of one load differ by
tens of percent); instructions are not. Where ``perf stat -e instructions``
works it would do, but virtual machines often have no counters (this one
answers ``<not supported>``), so Asterisk runs under ``valgrind
--tool=callgrind`` and the counters are zeroed (``callgrind_control -z``)
before each load and dumped (``-d``) after it: each dump holds the
instructions of every Asterisk thread during that load alone.

A load is one real call, audio sent in 20 ms messages in real time for a
fixed time, with or without a mark after each message, followed by the same
fixed tail; the loads take turns, several rounds, so what the machine does
meanwhile falls on all of them alike (callgrind counts the same either way,
but a slow Asterisk could still be mid-stream when the window closes: a
load whose last mark came after its window is flagged).
"""

from __future__ import annotations

import asyncio
import logging
import re
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import audio
from harness.phonepool import PhonePool
from harness.rig import Rig

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Seconds after the last message before the window closes: the queue's
#: last frames play out and the marks are answered.
TAIL_S = 1.0
#: Booting takes a minute or more under valgrind.
BOOT_TIMEOUT_S = 240.0


class InstructionsError(RuntimeError):
    """callgrind could not count."""


@dataclass(frozen=True)
class Load:
    """One load: which build, and which command follows every *every_ms* of
    the 20 ms messages."""

    label: str
    build: str
    mark_cmd: str | None
    every_ms: int = audio.FRAME_MS
    #: Opt in to mark positions mode (REPORT_MARK_POSITIONS) before the window
    positions: bool = False


LOADS = (
    Load("patched_without_marks", "patched", None),
    Load("patched_mark_every_20ms", "patched", "MARK"),
    Load("patched_mark_every_200ms", "patched", "MARK", 200),
    Load("patched_mark_media_positions_every_20ms", "patched", "MARK_MEDIA", positions=True),
    Load("upstream_without_marks", "upstream", None),
    Load("upstream_mark_media_every_20ms", "upstream", "MARK_MEDIA"),
)


def check_possible() -> None:
    """Raise InstructionsError saying what is missing."""
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            raise InstructionsError(
                f"'{tool}' is not installed (Debian: apt-get install valgrind, or make setup)"
            )


def callgrind_wrapper(out: Path) -> list[str]:
    """The command Asterisk runs under: counting off until the first load."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={out}/callgrind.out.%p",
        f"--log-file={out}/valgrind.log",
    ]


async def _control(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate()
    text = output.decode(errors="replace")
    if proc.returncode != 0:
        raise InstructionsError(f"callgrind_control {' '.join(args)}: {text.strip()}")
    return text


def _dumps(out: Path, pid: int) -> set[Path]:
    return set(out.glob(f"callgrind.out.{pid}*"))


def dumped_instructions(out: Path, pid: int, before: set[Path]) -> int:
    """The instruction count of the dump written since *before* was listed."""
    new = sorted(_dumps(out, pid) - before)
    if not new:
        raise InstructionsError(f"callgrind wrote no dump for pid {pid} in {out}")
    total = 0
    for dump in new:
        match = re.search(r"^(?:summary|totals):\s+(\d+)", dump.read_text(), re.MULTILINE)
        if match is None:
            raise InstructionsError(f"{dump}: no summary line")
        total = max(total, int(match.group(1)))
        dump.unlink()
    return total


async def one_load(rig: Rig, out: Path, load: Load, seconds: float) -> dict[str, Any]:
    """Run *load* for *seconds* on one call; its instructions and whether it kept up."""
    assert rig.asterisk is not None and rig.asterisk.process is not None
    pid = rig.asterisk.process.pid
    frames = int(seconds * 1000 / audio.FRAME_MS)
    data = audio.tagged_frames(0, frames)
    async with rig.call(capture=False) as live:
        s = live.session
        if load.positions:
            await s.command("REPORT_MARK_POSITIONS")
        await asyncio.sleep(0.5)  # the call settles before the window opens
        before = _dumps(out, pid)
        await _control("-z", str(pid))
        last: str | None = None
        start = time.monotonic()
        marks = 0
        for k in range(frames):
            delay = start + max(0, k - 3) * audio.FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await s.send_audio(data[k * audio.FRAME_BYTES : (k + 1) * audio.FRAME_BYTES])
            if load.mark_cmd is not None and (k + 1) % (load.every_ms // audio.FRAME_MS) == 0:
                await s.command(load.mark_cmd, f"m{k}")
                last = f"m{k}"
                marks += 1
        window = start + seconds + TAIL_S
        kept_up = True
        if last is not None:
            ack = "MARK_PLAYED" if load.mark_cmd == "MARK" else "MEDIA_MARK_PROCESSED"
            try:
                await s.wait_mark(last, (ack,), timeout=seconds + 30)
            except Exception as exc:
                log.warning("instructions: %s: the last mark: %s", load.label, exc)
                kept_up = False
            kept_up = kept_up and time.monotonic() <= window
        await asyncio.sleep(max(0.0, window - time.monotonic()))
        elapsed = time.monotonic() - start
        await _control("-d", str(pid))
        count = await asyncio.to_thread(_wait_dump, out, pid, before)
    return {"instructions": count, "window_s": elapsed, "marks": marks, "kept_up": kept_up}


def _wait_dump(out: Path, pid: int, before: set[Path]) -> int:
    """callgrind_control -d returns once the dump is written; read it."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return dumped_instructions(out, pid, before)
        except InstructionsError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def count(
    installs: dict[str, Path],
    out: Path,
    *,
    seconds: float,
    rounds: int,
    loads: tuple[Load, ...] = LOADS,
    say: Progress,
) -> dict[str, Any]:
    """Every load of *loads* whose build is in *installs*, *rounds* times in turn."""
    check_possible()
    loads = tuple(load for load in loads if load.build in installs)
    runs: dict[str, list[dict[str, Any]]] = {load.label: [] for load in loads}
    async with PhonePool(out / "callers", 1) as phone:
        for build, install in installs.items():
            mine = [load for load in loads if load.build == build]
            if not mine:
                continue
            workdir = out / f"callgrind-{build}"
            workdir.mkdir(parents=True, exist_ok=True)
            say(f"instructions: {build}: Asterisk under callgrind")
            rig = Rig(
                install,
                workdir,
                phone=phone,
                name=f"asterisk-{build}-callgrind",
                asterisk_wrapper=callgrind_wrapper(workdir),
                boot_timeout=BOOT_TIMEOUT_S,
            )
            async with rig:
                assert rig.asterisk is not None and rig.asterisk.process is not None
                await _control("-i", "on", str(rig.asterisk.process.pid))
                for round_ in range(rounds):
                    for load in mine:
                        say(
                            f"instructions: {build}, round {round_ + 1} of {rounds}: "
                            f"{load.label.replace('_', ' ')}, {seconds:.0f} s"
                        )
                        runs[load.label].append(await one_load(rig, workdir, load, seconds))
    return summarize(runs, seconds)


def summarize(runs: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    """Instructions per call-second per load (median, runs, spread) and the overheads.

    A call-second is a second of the window the counters covered (the audio,
    then the tail), measured per run.
    """
    result: dict[str, Any] = {"seconds": seconds, "window_s": seconds + TAIL_S, "loads": {}}
    for label, values in runs.items():
        per = [v["instructions"] / v.get("window_s", seconds + TAIL_S) for v in values]
        if not per:
            continue
        result["loads"][label] = {
            "instructions_per_call_second": round(statistics.median(per)),
            "runs": [round(v) for v in per],
            "spread_percent": round((max(per) - min(per)) / min(per) * 100, 2) if min(per) else 0,
            "kept_up": all(v["kept_up"] for v in values),
        }

    def overhead(label: str, base: str, key: str = "instructions_per_call_second") -> float | None:
        loads = result["loads"]
        if key not in loads.get(label, {}) or not loads.get(base, {}).get(key):
            return None
        b = float(loads[base][key])
        value = float(loads[label][key])
        return round((value - b) / b * 100, 3)

    result["overhead_percent"] = overhead("patched_mark_every_20ms", "patched_without_marks")
    result["overhead_200ms_percent"] = overhead("patched_mark_every_200ms", "patched_without_marks")
    result["upstream_overhead_percent"] = overhead(
        "upstream_mark_media_every_20ms", "upstream_without_marks"
    )
    for label, base in (
        ("patched_mark_every_20ms", "patched_without_marks"),
        ("patched_mark_every_200ms", "patched_without_marks"),
        ("patched_mark_media_positions_every_20ms", "patched_without_marks"),
        ("upstream_mark_media_every_20ms", "upstream_without_marks"),
    ):
        loads = result["loads"]
        if label not in loads or base not in loads:
            continue
        base_per = loads[base]["instructions_per_call_second"]
        # What each mark added: the run's count beyond the base's rate for
        # its window, over the marks it sent.
        per_mark = [
            (v["instructions"] - base_per * v.get("window_s", seconds + TAIL_S)) / v["marks"]
            for v in runs[label]
            if v.get("marks")
        ]
        if per_mark:
            loads[label]["instructions_per_mark"] = round(statistics.median(per_mark))
    result["marks_vs_mark_media_percent"] = overhead(
        "patched_mark_every_20ms", "upstream_mark_media_every_20ms"
    )
    result["patched_vs_upstream_percent"] = overhead(
        "patched_without_marks", "upstream_without_marks"
    )
    # What a mark costs in mark positions mode against upstream's MARK_MEDIA,
    # each beyond its own build's calls without marks.
    result["positions_mark_vs_mark_media_percent"] = overhead(
        "patched_mark_media_positions_every_20ms",
        "upstream_mark_media_every_20ms",
        "instructions_per_mark",
    )
    return result
