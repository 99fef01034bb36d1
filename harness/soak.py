"""A soak: many concurrent calls for a long time, marks, flushes and hangups.

Each of ``calls`` slots places a call after call until the time is up. In a
call the bot streams μ-law in real time, a frame and a ``MARK`` every 20 ms;
every few seconds it flushes; after a random while the call ends, hung up by
the caller or by the bot. Every mark must be answered exactly once
(``MARK_PLAYED``, or ``MARK_CLEARED`` by the flush or the hangup), and
Asterisk's memory (RSS) and open file descriptors, sampled all along, must
stay flat: their slope is reported per minute.

``make soak`` runs 30 calls for 10 minutes; ``tests/integration/test_soak.py``
a short one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from harness import audio
from harness.bot import BotError, BotSession
from harness.caller import CallerError
from harness.phonepool import PhonePool
from harness.rig import Rig
from harness.timing import units

log = logging.getLogger(__name__)

#: Frames queued ahead of playout while streaming in real time.
AHEAD = 3


@dataclass(frozen=True)
class SoakConfig:
    calls: int = 30
    seconds: float = 600.0
    #: A flush every this many seconds (drawn at random in the range).
    flush_every: tuple[float, float] = (2.0, 6.0)
    #: How long a call lasts before it is hung up (drawn at random).
    call_seconds: tuple[float, float] = (15.0, 60.0)
    #: How often Asterisk's RSS and file descriptors are sampled.
    sample_every: float = 5.0
    seed: int = 1
    #: A MARK after every frame; without, the same calls with no marks (a baseline).
    marks: bool = True


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int


@dataclass
class SoakReport:
    config: SoakConfig
    calls: int = 0
    marks: int = 0
    played: int = 0
    cleared: int = 0
    lost: int = 0
    duplicated: int = 0
    failed_calls: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    #: File descriptors before the first call and after the last one ended.
    fds_before: int = 0
    fds_after: int = 0
    seconds: float = 0.0

    def slope_per_minute(self, value: Callable[[Sample], float]) -> float:
        """Least-squares slope of *value* over the samples after the first fifth."""
        points = self.samples[len(self.samples) // 5 :]
        if len(points) < 2:
            return 0.0
        xs = [p.t for p in points]
        ys = [value(p) for p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        var = sum((x - mx) ** 2 for x in xs)
        if not var:
            return 0.0
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 60

    @property
    def rss_slope_kib_per_min(self) -> float:
        return self.slope_per_minute(lambda s: s.rss_kib)

    @property
    def fd_slope_per_min(self) -> float:
        return self.slope_per_minute(lambda s: s.fds)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.failed_calls) and (
            self.fds_after <= self.fds_before + 2
        )

    def summary(self) -> str:
        first, last = (self.samples[0], self.samples[-1]) if self.samples else (None, None)
        rss = f"{first.rss_kib} -> {last.rss_kib} KiB" if first and last else "no samples"
        return (
            f"{self.calls} calls ({self.config.calls} at a time) in {self.seconds:.0f} s; "
            f"{self.marks} marks: {self.played} played, {self.cleared} cleared, "
            f"{self.lost} lost, {self.duplicated} answered twice; "
            f"RSS {rss}, slope {self.rss_slope_kib_per_min:+.1f} KiB/min; "
            f"fds {self.fds_before} before, {self.fds_after} after, "
            f"slope {self.fd_slope_per_min:+.2f}/min; "
            f"{len(self.failed_calls)} calls failed"
        )


def resources(pid: int) -> tuple[int, int]:
    """Resident memory (KiB) and open file descriptors of process *pid*."""
    rss = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def one_call(
    rig: Rig, cfg: SoakConfig, rng: random.Random, report: SoakReport, deadline: float
) -> None:
    """One call: stream with marks and flushes, then hang up; check every mark."""
    lifetime = min(rng.uniform(*cfg.call_seconds), max(1.0, deadline - time.monotonic()))
    by_bot = rng.random() < 0.5
    async with rig.call(capture=False) as call:
        s = call.session
        sent = await stream(s, lifetime, cfg, rng)
        # Asterisk answers in order: once STATUS is back, it has read every mark.
        await s.get_status()
        if by_bot:
            await s.command("HANGUP")
        else:
            await call.sip.hangup()
        await s.wait_closed()
    check(s, sent, report)


async def stream(s: BotSession, seconds: float, cfg: SoakConfig, rng: random.Random) -> list[str]:
    """A frame and a mark every 20 ms for *seconds*, a flush now and then."""
    sent: list[str] = []
    start = time.monotonic()
    next_flush = start + rng.uniform(*cfg.flush_every)
    frames = int(seconds * 1000 / audio.FRAME_MS)
    for k in range(frames):
        delay = start + max(0, k - AHEAD) * audio.FRAME_MS / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await s.send_audio(audio.tagged_frame(k))
        if cfg.marks:
            mark = f"{s.tag}-{k}"
            await s.command("MARK", mark)
            sent.append(mark)
        if time.monotonic() >= next_flush:
            await s.command("FLUSH_MEDIA")
            next_flush = time.monotonic() + rng.uniform(*cfg.flush_every)
    return sent


def check(s: BotSession, sent: list[str], report: SoakReport) -> None:
    """Every mark sent answered exactly once."""
    answers: dict[str, int] = {}
    for event in s.named("MARK_PLAYED", "MARK_CLEARED"):
        mark = event.mark_id or ""
        answers[mark] = answers.get(mark, 0) + 1
        if event.name == "MARK_PLAYED":
            report.played += 1
        else:
            report.cleared += 1
    report.calls += 1
    report.marks += len(sent)
    report.lost += sum(1 for m in sent if m not in answers)
    report.duplicated += sum(c - 1 for c in answers.values() if c > 1)


async def slot(rig: Rig, cfg: SoakConfig, index: int, report: SoakReport, deadline: float) -> None:
    """Call after call until the deadline."""
    rng = random.Random(cfg.seed * 1000 + index)
    await asyncio.sleep(rng.uniform(0, 2))  # not all at once
    while time.monotonic() < deadline - 1:
        try:
            await one_call(rig, cfg, rng, report, deadline)
        except (BotError, CallerError, TimeoutError) as exc:
            log.warning("soak: a call failed: %s", exc)
            report.failed_calls.append(str(exc)[:200])


async def sampler(pid: int, cfg: SoakConfig, report: SoakReport, t0: float) -> None:
    while True:
        with contextlib.suppress(OSError):
            rss, fds = resources(pid)
            report.samples.append(Sample(time.monotonic() - t0, rss, fds))
        await asyncio.sleep(cfg.sample_every)


async def run(
    install: Path, workdir: Path, cfg: SoakConfig, say: Callable[[str], None]
) -> SoakReport:
    """The soak against a fresh Asterisk of *install*; returns what was measured."""
    report = SoakReport(cfg)
    t0 = time.monotonic()
    async with (
        PhonePool(workdir / "callers", cfg.calls) as phone,
        Rig(install, workdir / "rig", phone=phone) as rig,
    ):
        assert rig.asterisk is not None and rig.asterisk.process is not None
        pid = rig.asterisk.process.pid
        report.fds_before = resources(pid)[1]
        say(f"soak: {cfg.calls} calls at a time for {cfg.seconds:.0f} s (Asterisk pid {pid})")
        sampling = asyncio.ensure_future(sampler(pid, cfg, report, t0))
        deadline = time.monotonic() + cfg.seconds

        async def progress() -> None:
            while True:
                await asyncio.sleep(60)
                last = report.samples[-1] if report.samples else None
                say(
                    f"soak: {time.monotonic() - t0:.0f} s, {report.calls} calls done, "
                    f"{report.marks} marks, {report.lost} lost"
                    + (f", RSS {last.rss_kib} KiB, {last.fds} fds" if last else "")
                )

        ticker = asyncio.ensure_future(progress())
        try:
            await asyncio.gather(*(slot(rig, cfg, i, report, deadline) for i in range(cfg.calls)))
        finally:
            for task in (sampling, ticker):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        # The channels are gone a moment after their calls.
        await asyncio.sleep(units(1))
        report.fds_after = resources(pid)[1]
    report.seconds = time.monotonic() - t0
    return report
