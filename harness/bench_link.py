"""Where marks matter: a bot across a real link, long responses, a loaded Asterisk.

The bot runs in a network namespace of its own, joined to Asterisk's by a
veth pair whose traffic is shaped in both directions (:mod:`harness.netns`:
one-way delay with jitter, or loss that TCP retransmits). Each scenario is a
*paced pair*: two calls at once, each streaming the same simulated TTS
response with :class:`astmarks.pacer.Pacer`, one paced by marks and one by a
clock estimate, and barged in at the same point. From the captures (RTP on
loopback, the WebSocket on Asterisk's side of the link) it takes:

- pacing: 20 ms slots without audio while the bot had audio (underruns) and
  the time from send to RTP (what was buffered);
- barge-in: how much of the response the caller got (RTP) against what
  MEDIA_FLUSHED said and what the clock estimate said at that moment;
- mark timing: MARK_PLAYED against the RTP departure of the byte before the
  mark, on Asterisk's side of the link (the wire) and at the bot;
- drift: both estimates of the played position, sampled through the
  response, against RTP;
- the media tick: RTP inter-departure times (late and lost ticks).

A loaded Asterisk is the same pair with CPU hogs pinned to the cores
Asterisk runs on.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import logging
import os
import random
import statistics
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astmarks.pacer import Pacer, PacingResult, Strategy
from astmarks.protocol import MARK_CLEARED_EVENTS, MARK_REACHED_EVENTS, ProtocolError, parse_event
from harness import analysis, audio, tts
from harness.analysis import StreamMap, Summary, summary_dict
from harness.bot import BotServer
from harness.capture import RtpPacket
from harness.netns import NetNs, Shape
from harness.pcap import TcpdumpCapture, read_and_remove, rtp_by_destination, websocket_messages
from harness.phonepool import PhonePool
from harness.rig import LiveCall, Rig

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: A tick later than this after the previous packet is late (ms).
LATE_TICK_MS = 25.0
#: Seconds between samples of the position estimates.
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True)
class Condition:
    """The link between the bot and Asterisk, the same in both directions."""

    name: str
    one_way_ms: int = 0
    jitter_ms: int = 0
    loss_percent: float = 0.0

    def shape(self) -> Shape:
        return Shape.delay(self.one_way_ms, self.jitter_ms, self.loss_percent)


#: The links of ``make bench``: a data centre away, further with jitter, and loss.
CONDITIONS = (
    Condition("0 ms"),
    Condition("25 ± 5 ms", 25, 5),
    Condition("75 ± 20 ms", 75, 20),
    Condition("1% loss", 0, 0, 1.0),
)


@dataclass
class Paced:
    """One call of a pair: how it was paced and what happened."""

    strategy: Strategy
    live: LiveCall | None = None
    result: PacingResult | None = None
    sent: bytes = b""
    #: (time.time(), clock estimate, marks estimate) of the played ms
    samples: list[tuple[float, float, float]] = field(default_factory=list)
    #: at the barge-in: (time.time(), clock estimate, marks estimate)
    at_barge_in: tuple[float, float, float] | None = None


async def _sample(pacer: Pacer, paced: Paced, stop: asyncio.Event) -> None:
    while not stop.is_set():
        paced.samples.append((time.time(), pacer.clock_heard_ms(), pacer.marks_heard_ms()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_EVERY_S)


async def paced_call(
    rig: Rig, paced: Paced, response_ms: int, barge_in_ms: int | None, seed: int
) -> None:
    """Stream a response into one call, barging in after *barge_in_ms* of it.

    The estimates are sampled until the barge-in (after it they describe a
    flushed queue, not drift)."""
    profile = tts.TtsProfile(seed=seed)
    paced.sent = b"".join(d for d, _ in tts.plan(response_ms, profile))
    async with rig.call(capture=False) as live:
        paced.live = live
        pacer = Pacer(live.session, strategy=paced.strategy)
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(pacer, paced, stop))
        task = asyncio.create_task(pacer.play(tts.stream(response_ms, profile)))
        try:
            if barge_in_ms is not None:
                done, _ = await asyncio.wait({task}, timeout=barge_in_ms / 1000)
                if not done:
                    stop.set()
                    await sampler
                    paced.at_barge_in = (
                        time.time(),
                        pacer.clock_heard_ms(),
                        pacer.marks_heard_ms(),
                    )
                    pacer.barge_in()
            paced.result = await task
            stop.set()
            await asyncio.sleep(0.5)
        finally:
            stop.set()
            await sampler
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


# --- analysis -------------------------------------------------------------------------


def tick_stats(packets: Sequence[RtpPacket]) -> dict[str, Any]:
    """The media tick from RTP inter-departure times, while audio flowed."""
    times = sorted(p.t for p in packets)
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    # Longer silences are underruns or the end, not the tick.
    ticks = [g for g in gaps if g < 100]
    return {
        "intervals": len(ticks),
        "late": sum(1 for g in ticks if g > LATE_TICK_MS),
        "late_per_1000": round(1000 * sum(1 for g in ticks if g > LATE_TICK_MS) / len(ticks), 2)
        if ticks
        else 0.0,
        "interval_ms": summary_dict(Summary.of(ticks)),
    }


def drift_series(paced: Paced, stream: StreamMap) -> list[tuple[float, float, float]]:
    """Per sample: (s since the first audio left, clock - RTP, marks - RTP) in ms.

    RTP is the response's bytes that had left Asterisk at the sample's time.
    """
    if not stream.times:
        return []
    first = stream.times[0]
    series = []
    for t, clock_ms, marks_ms in paced.samples:
        if t < first:
            continue  # not playing yet: nothing to compare with
        truth = stream.played_by(t) / audio.BYTES_PER_MS
        series.append((round(t - first, 3), round(clock_ms - truth, 2), round(marks_ms - truth, 2)))
    return series


def slope_ms_per_minute(points: Sequence[tuple[float, float]]) -> float | None:
    """The least-squares slope of (s, ms) points, in ms per minute."""
    if len(points) < 3 or len({x for x, _ in points}) < 2:
        return None
    slope, _ = statistics.linear_regression([x for x, _ in points], [y for _, y in points])
    return round(slope * 60, 3)


def missed_slots(
    stream: StreamMap, result: PacingResult, one_way_s: float = 0.0
) -> tuple[int, int, int]:
    """20 ms slots without audio inside a paced response, by whose fault:
    (underruns: the bot had the audio that came next but it reached Asterisk
    after the slot; starved: the engine had not produced it yet; ticks: it had
    reached Asterisk, which missed the slot). *one_way_s*: the link's nominal
    delay, when the audio sent reaches Asterisk (jitter can move a slot
    between the first and the last)."""
    chunks = sorted(result.chunks, key=lambda c: c.offset)
    offsets = [c.offset - result.start_offset for c in chunks]
    underruns = starved = ticks = 0
    for t_gap, missed, resumed in stream.gaps():
        i = bisect.bisect_right(offsets, resumed) - 1
        chunk = chunks[i] if i >= 0 else None
        if chunk is None or chunk.generated > t_gap + 0.02:
            starved += missed
        elif chunk.sent is not None and chunk.sent + one_way_s <= t_gap:
            ticks += missed
        else:
            underruns += missed
    return underruns, starved, ticks


def underrun_slots(stream: StreamMap, result: PacingResult) -> tuple[int, int]:
    """(underruns, starved) of :func:`missed_slots` on loopback, Asterisk's
    missed ticks counted as underruns (as the benchmark always has)."""
    underruns, starved, ticks = missed_slots(stream, result)
    return underruns + ticks, starved


def chunk_latencies(stream: StreamMap, result: PacingResult) -> list[tuple[float, float]]:
    """Per chunk sent: (generated to RTP, sent to RTP) of its first byte, in ms."""
    latencies = []
    for c in result.chunks:
        t = stream.departure(c.offset - result.start_offset)
        if t is not None and c.sent is not None:
            latencies.append(((t - c.generated) * 1000, (t - c.sent) * 1000))
    return latencies


def pacing_figures(paced: Paced, stream: StreamMap, one_way_s: float = 0.0) -> dict[str, Any]:
    """Missed slots (see :func:`missed_slots`) and send-to-RTP latency of one call."""
    result = paced.result
    assert result is not None
    underruns, starved, ticks = missed_slots(stream, result, one_way_s)
    return {
        "underrun_slots": underruns,
        "tts_starved_slots": starved,
        "ticks_missed_slots": ticks,
        "sent_to_rtp_ms": summary_dict(Summary.of([q for _, q in chunk_latencies(stream, result)])),
        "lost_bytes": stream.lost,
    }


def bargein_figures(paced: Paced, stream: StreamMap) -> dict[str, Any] | None:
    """What the caller got (RTP, ms) against MEDIA_FLUSHED and the clock estimate."""
    result = paced.result
    if result is None or not result.interrupted or paced.at_barge_in is None:
        return None
    truth = audio.ms_of(stream.total)
    figures: dict[str, Any] = {
        "truth_ms": truth,
        "clock_error_ms": round(paced.at_barge_in[1] - truth, 2),
    }
    if (
        paced.strategy is Strategy.MARKS
        and result.flushed is not None
        and result.heard_ms is not None
    ):
        figures["flushed_error_ms"] = round(result.heard_ms - truth, 2)
    return figures


def acks(
    live: LiveCall, ws: dict[int, list[Any]], names: tuple[str, ...]
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The acknowledgments *names* of a call's marks, with their times: on the
    wire (*ws*: the capture's messages per bot-side port) and at the bot."""
    remote = live.session.connection.remote_address
    wire = []
    for msg in ws.get(int(remote[1]) if remote else -1, []):
        try:
            event = parse_event(msg.text)
        except ProtocolError:
            continue
        if event.name in names and event.mark_id is not None:
            wire.append((event.mark_id, msg.t))
    bot = [(e.mark_id, e.t) for e in live.session.named(*names) if e.mark_id is not None]
    return wire, bot


def mark_reports(
    paced: Paced, stream: StreamMap, ws: dict[int, list[Any]]
) -> dict[str, Any] | None:
    """What became of the marks (played, cleared by the barge-in, neither),
    and MARK_PLAYED - RTP of the byte before each played mark: on the wire at
    Asterisk's side of the link, and when the bot read it."""
    result, live = paced.result, paced.live
    if result is None or live is None or not result.marks:
        return None
    answered = {
        e.mark_id: e.name for e in live.session.named(*MARK_REACHED_EVENTS, *MARK_CLEARED_EVENTS)
    }
    played = [
        (m.mark_id, m.offset - result.start_offset)
        for m in result.marks
        if answered.get(m.mark_id) in MARK_REACHED_EVENTS
    ]
    wire_acks, bot_acks = acks(live, ws, MARK_REACHED_EVENTS)
    wire = analysis.mark_report(played, wire_acks, stream)
    bot = analysis.mark_report(played, bot_acks, stream)
    return {
        "placed": len(result.marks),
        "played": len(played),
        "cleared": sum(1 for m in result.marks if answered.get(m.mark_id) in MARK_CLEARED_EVENTS),
        "unanswered": sum(1 for m in result.marks if m.mark_id not in answered),
        "duplicated": bot.duplicated,
        "out_of_order": bot.out_of_order,
        "wire": summary_dict(wire.summary),
        "bot": summary_dict(bot.summary),
    }


# --- running pairs -----------------------------------------------------------------------


@dataclass
class LinkRig:
    """A rig whose bot is in a namespace of its own, and the captures it needs."""

    ns: NetNs
    rig: Rig

    def bpf_rtp(self) -> str:
        assert self.rig.asterisk is not None
        s = self.rig.asterisk.settings
        return f"udp and src portrange {s.rtp_start}-{s.rtp_end}"

    def bpf_ws(self) -> str:
        return f"tcp and dst port {self.rig.bot.port}"


@contextlib.asynccontextmanager
async def link_rig(install: Path, workdir: Path, phone: PhonePool) -> AsyncIterator[LinkRig]:
    """A namespace with the bot in it and an Asterisk here that dials it.

    The namespace and its link go when this ends, also on an error or a
    cancellation; a killed run's leftovers are removed by the next one
    (:func:`harness.netns.remove_stale`).
    """
    async with NetNs() as ns:
        bot = BotServer(ns.ns_ip, sock=ns.listening_socket())
        # Across a lossy link a lost SYN waits out a retransmission (1 s), as
        # long as Asterisk's connection timeout: it tries again, as an
        # operator would have it do across a WAN.
        async with Rig(
            install, workdir, phone=phone, bot=bot, name="asterisk-link", connect_attempts=3
        ) as rig:
            yield LinkRig(ns, rig)


async def run_pair(
    link: LinkRig,
    out: Path,
    label: str,
    *,
    response_ms: int,
    barge_in_ms: int | None,
    seed: int,
    one_way_ms: int = 0,
) -> dict[str, Any]:
    """A paced pair (marks, clock) on *link* (*one_way_ms*: its nominal
    delay); every figure of both calls."""
    pair = [Paced(Strategy.MARKS), Paced(Strategy.CLOCK)]
    rtp_pcap, ws_pcap = out / f"{label}-rtp.pcap", out / f"{label}-ws.pcap"
    # One call failing ends the other (a task group): no call outlives its trial.
    async with (
        TcpdumpCapture(link.bpf_rtp(), rtp_pcap),
        TcpdumpCapture(link.bpf_ws(), ws_pcap, iface=link.ns.host_if),
        asyncio.TaskGroup() as group,
    ):
        for p in pair:
            group.create_task(paced_call(link.rig, p, response_ms, barge_in_ms, seed))
    rtp = rtp_by_destination(await asyncio.to_thread(read_and_remove, rtp_pcap))
    ws = websocket_messages(await asyncio.to_thread(read_and_remove, ws_pcap), link.rig.bot.port)
    figures: dict[str, Any] = {}
    for p in pair:
        assert p.live is not None
        local = p.live.sip.record.local_rtp
        packets = rtp.get(local[1] if local else -1, [])
        stream = StreamMap(packets, p.sent)
        series = drift_series(p, stream)
        entry: dict[str, Any] = {
            "pacing": pacing_figures(p, stream, one_way_ms / 1000),
            "bargein": bargein_figures(p, stream),
            "tick": tick_stats(packets),
            "drift": series,
            "clock_drift_ms_per_min": slope_ms_per_minute([(x, c) for x, c, _ in series]),
            "marks_drift_ms_per_min": slope_ms_per_minute([(x, m) for x, _, m in series]),
            # FLUSH_MEDIA to MEDIA_FLUSHED, at the bot: about a round trip.
            "flush_answered_ms": round((p.result.flushed.t - p.at_barge_in[0]) * 1000, 2)
            if p.result and p.result.flushed and p.at_barge_in
            else None,
        }
        marks = mark_reports(p, stream, ws)
        if marks is not None:
            entry["marks"] = marks
        figures[p.strategy.value] = entry
    return figures


# --- a loaded machine ------------------------------------------------------------------


def _threads(pid: int) -> list[int]:
    try:
        return [int(t.name) for t in Path(f"/proc/{pid}/task").iterdir()]
    except FileNotFoundError:
        return []  # the process is gone


@contextlib.asynccontextmanager
async def cpu_hogs(pid: int, count: int) -> AsyncIterator[list[int]]:
    """Pin Asterisk (*pid*, every thread) to one core and run *count* busy
    processes on it; undone when this ends. The hogs also end by themselves
    when this process is gone (they watch their parent)."""
    core = {min(os.sched_getaffinity(0))}
    saved: dict[int, set[int]] = {}
    procs: list[asyncio.subprocess.Process] = []
    code = (
        "import os\n"
        f"os.sched_setaffinity(0, {core!r})\n"
        "parent = os.getppid()\n"
        "while os.getppid() == parent:\n"
        "    for _ in range(200000):\n"
        "        pass\n"
    )
    try:
        for tid in _threads(pid):
            with contextlib.suppress(OSError):
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, core)
        for _ in range(count):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable, "-c", code, stdin=asyncio.subprocess.DEVNULL
                )
            )
        yield [p.pid for p in procs]
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            await p.wait()
        for tid, cpus in saved.items():
            with contextlib.suppress(OSError):  # a thread that ended, or Asterisk
                os.sched_setaffinity(tid, cpus)


# --- the scenarios ------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkConfig:
    """What to run; :meth:`quick` is what the tests run."""

    conditions: tuple[Condition, ...] = CONDITIONS
    trials: int = 3
    response_ms: int = 12_000
    drift_ms: int = 600_000
    load_ms: int = 60_000
    hogs: int = 2
    seed: int = 7

    @classmethod
    def quick(cls) -> LinkConfig:
        return cls(
            conditions=(CONDITIONS[0], CONDITIONS[2], CONDITIONS[3]),
            trials=1,
            response_ms=5000,
            drift_ms=0,
            load_ms=0,
        )


def aggregate(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """One condition's trials in a few figures per strategy."""
    out: dict[str, Any] = {"trials": len(trials)}
    for strategy in (Strategy.MARKS.value, Strategy.CLOCK.value):
        entries = [t[strategy] for t in trials]
        barge = [e["bargein"] for e in entries if e["bargein"]]
        latency = [e["pacing"]["sent_to_rtp_ms"]["median"] for e in entries]
        fig: dict[str, Any] = {
            "underrun_slots": sum(e["pacing"]["underrun_slots"] for e in entries),
            "ticks_missed_slots": sum(e["pacing"].get("ticks_missed_slots", 0) for e in entries),
            "sent_to_rtp_median_ms": round(statistics.median(latency), 1) if latency else None,
            "sent_to_rtp_p95_ms": round(
                max(e["pacing"]["sent_to_rtp_ms"]["p95"] for e in entries), 1
            )
            if entries
            else None,
            "clock_bargein_abs_error_ms": [abs(b["clock_error_ms"]) for b in barge],
        }
        if strategy == Strategy.MARKS.value:
            fig["flushed_bargein_abs_error_ms"] = [
                abs(b["flushed_error_ms"]) for b in barge if "flushed_error_ms" in b
            ]
            marks = [e["marks"] for e in entries if e.get("marks")]
            fig["marks_placed"] = sum(m["placed"] for m in marks)
            fig["marks_played"] = sum(m["played"] for m in marks)
            fig["marks_cleared"] = sum(m["cleared"] for m in marks)
            fig["marks_unanswered"] = sum(m["unanswered"] for m in marks)
            fig["marks_duplicated"] = sum(m["duplicated"] for m in marks)
            fig["mark_wire_median_ms"] = (
                round(statistics.median(m["wire"]["median"] for m in marks), 2) if marks else None
            )
            fig["mark_bot_median_ms"] = (
                round(statistics.median(m["bot"]["median"] for m in marks), 2) if marks else None
            )
            fig["mark_wire_p99_ms"] = max((m["wire"]["p99"] for m in marks), default=None)
        out[strategy] = fig
    return out


async def run(install: Path, cfg: LinkConfig, out: Path, say: Progress) -> dict[str, Any]:
    """The network conditions, the long response and the loaded Asterisk."""
    rng = random.Random(cfg.seed)
    results: dict[str, Any] = {
        "config": vars(cfg) | {"conditions": [vars(c) for c in cfg.conditions]}
    }
    async with (
        PhonePool(out / "link-callers", 2) as phone,
        link_rig(install, out / "link", phone) as link,
    ):
        results["network"] = {}
        for condition in cfg.conditions:
            await link.ns.shape(condition.shape(), condition.shape())
            trials = []
            for k in range(cfg.trials):
                barge = int(cfg.response_ms * rng.uniform(0.4, 0.9))
                say(
                    f"network {condition.name}: trial {k + 1} of {cfg.trials}, a "
                    f"{cfg.response_ms / 1000:.0f} s response paced by marks and by a clock, "
                    f"barge-in at {barge / 1000:.1f} s"
                )
                trials.append(
                    await run_pair(
                        link,
                        out,
                        f"net-{k}",
                        response_ms=cfg.response_ms,
                        barge_in_ms=barge,
                        seed=cfg.seed + k,
                        one_way_ms=condition.one_way_ms,
                    )
                )
            summary = aggregate(trials)
            results["network"][condition.name] = {
                "condition": vars(condition),
                **summary,
                "runs": trials,
            }
            say(f"  {describe(summary)}")
        await link.ns.shape(Shape(), Shape())
        if cfg.drift_ms:
            say(
                f"drift: a {cfg.drift_ms / 60000:.0f} min response paced by marks and by a "
                "clock, side by side (progress every minute)"
            )
            results["drift"] = await _long(
                link, out, "drift", response_ms=cfg.drift_ms, seed=cfg.seed, say=say
            )
        if cfg.load_ms:
            assert link.rig.asterisk is not None and link.rig.asterisk.process is not None
            say(
                f"load: Asterisk pinned to one core with {cfg.hogs} busy processes on it, a "
                f"{cfg.load_ms / 1000:.0f} s response paced by marks and by a clock"
            )
            async with cpu_hogs(link.rig.asterisk.process.pid, cfg.hogs):
                results["load"] = await _long(
                    link, out, "load", response_ms=cfg.load_ms, seed=cfg.seed, say=say
                )
    return results


async def _long(
    link: LinkRig, out: Path, label: str, *, response_ms: int, seed: int, say: Progress
) -> dict[str, Any]:
    """One long pair, barged in near its end; progress while it runs."""
    started = time.monotonic()

    async def progress() -> None:
        while True:
            await asyncio.sleep(60)
            minutes = (time.monotonic() - started) / 60
            say(f"  {label}: {minutes:.0f} min of {response_ms / 60000:.0f}")

    ticker = asyncio.create_task(progress())
    try:
        figures = await run_pair(
            link,
            out,
            label,
            response_ms=response_ms,
            barge_in_ms=int(response_ms * 0.97),
            seed=seed,
        )
    finally:
        ticker.cancel()
    summary = aggregate([figures])
    say(f"  {describe(summary)}")
    for strategy, entry in figures.items():
        t = entry["tick"]
        say(
            f"  {strategy}-paced call: the clock estimate drifts "
            f"{entry['clock_drift_ms_per_min']} ms/min, the marks' "
            f"{entry['marks_drift_ms_per_min']} ms/min; ticks late (>{LATE_TICK_MS:.0f} ms) "
            f"{t['late_per_1000']} per 1000, longest interval {t['interval_ms']['max']:.1f} ms"
        )
    return {**summary, "runs": [figures]}


def describe(summary: dict[str, Any]) -> str:
    """A line for the progress output."""
    m, c = summary["marks"], summary["clock"]

    def worst(values: list[float]) -> str:
        return f"{max(values):.1f}" if values else "-"

    return (
        f"marks: {m['underrun_slots']} underrun slots (+{m['ticks_missed_slots']} Asterisk "
        f"missed with the audio there), sent->RTP median "
        f"{m['sent_to_rtp_median_ms']} ms, barge-in |error| max "
        f"{worst(m['flushed_bargein_abs_error_ms'])} ms (clock estimate in the same call "
        f"{worst(m['clock_bargein_abs_error_ms'])} ms), MARK_PLAYED-RTP wire "
        f"{m['mark_wire_median_ms']} ms, bot {m['mark_bot_median_ms']} ms; "
        f"clock: {c['underrun_slots']} underrun slots (+{c['ticks_missed_slots']}), "
        "sent->RTP median "
        f"{c['sent_to_rtp_median_ms']} ms, barge-in |error| max "
        f"{worst(c['clock_bargein_abs_error_ms'])} ms"
    )
