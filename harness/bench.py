"""``make bench``: mark timing, accounting, CPU, pacing and barge-in, patched
against upstream, on real calls.

Every scenario runs real SIP calls into a real Asterisk with tcpdump writing
the loopback traffic to a pcap file; the analysis happens after the calls, so
the capture does not compete with them. An acknowledgment's time is taken
twice: when its TCP segment left Asterisk (kernel timestamp in the capture,
comparable with the RTP departures) and when the bot's event loop read it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from astmarks.pacer import Pacer, Strategy
from harness import analysis, audio, bench_link, instructions, tts
from harness.analysis import MarkReport, StreamMap, Summary, summary_dict
from harness.pcap import TcpdumpCapture, read_and_remove, rtp_by_destination, websocket_messages
from harness.phonepool import PhonePool
from harness.rig import LiveCall, Rig
from harness.topology import DIAL, TOPOLOGIES, Topology

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
ACKS = ("MARK_PLAYED", "MEDIA_MARK_PROCESSED")
#: The parts of the benchmark, in the order they run.
SECTIONS = ("timing", "cpu", "pacing", "bargein", "topologies", "link", "instructions")


@dataclass(frozen=True)
class BenchConfig:
    """What to run. :meth:`quick` is the short version the tests run."""

    concurrency: tuple[int, ...] = (1, 10, 30)
    granularities_ms: tuple[int, ...] = (200, 20)
    seconds: float = 4.0
    cpu_calls: int = 30
    cpu_seconds: float = 5.0
    cpu_rounds: int = 3
    pacing_ms: int = 60_000
    bargein_trials: int = 10
    seed: int = 7
    #: the bot across a shaped link, a long response, a loaded Asterisk
    link: bench_link.LinkConfig | None = field(default_factory=bench_link.LinkConfig)
    #: instructions (callgrind): seconds per load and rounds of each (0: none)
    instr_seconds: float = 10.0
    instr_rounds: int = 3
    #: seconds of marked audio per topology (0: no topology table)
    topology_seconds: float = 4.0
    #: which parts run (:data:`SECTIONS`)
    sections: tuple[str, ...] = SECTIONS

    @classmethod
    def quick(cls) -> BenchConfig:
        return cls(
            concurrency=(1, 4),
            granularities_ms=(200, 20),
            seconds=2.0,
            cpu_calls=4,
            cpu_seconds=3.0,
            pacing_ms=6000,
            bargein_trials=3,
            link=bench_link.LinkConfig.quick(),
            instr_seconds=2.0,
            instr_rounds=1,
            topology_seconds=0.0,
        )


@dataclass
class CallOutcome:
    """One call of a load run: what was sent and the marks placed."""

    live: LiveCall
    sent: bytes = b""
    marks: list[tuple[str, int]] = field(default_factory=list)


# --- helpers ------------------------------------------------------------------------


def capture_filter(rig: Rig) -> str:
    assert rig.asterisk is not None
    s = rig.asterisk.settings
    return f"(udp and src portrange {s.rtp_start}-{s.rtp_end}) or (tcp and dst port {rig.bot.port})"


def asterisk_cpu_seconds(rig: Rig) -> float:
    """CPU time of the Asterisk process so far, all threads (schedstat, in ns)."""
    assert rig.asterisk is not None and rig.asterisk.process is not None
    total = 0
    for task in Path(f"/proc/{rig.asterisk.process.pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # a thread that just ended
    return total / 1e9


async def stream_marked(
    call: CallOutcome,
    seconds: float,
    granularity_ms: int,
    mark_cmd: str | None,
    mark_every: int = 1,
) -> None:
    """Send *seconds* of tagged audio in real time in *granularity_ms* messages,
    a mark after every *mark_every* of them."""
    s = call.live.session
    size = granularity_ms * audio.BYTES_PER_MS
    count = int(seconds * 1000 / granularity_ms)
    data = audio.tagged_frames(0, count * size // audio.FRAME_BYTES)
    ahead = max(2, 60 // granularity_ms)
    start = time.monotonic()
    for k in range(count):
        delay = start + max(0, k - ahead) * granularity_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        await s.send_audio(data[k * size : (k + 1) * size])
        call.sent += data[k * size : (k + 1) * size]
        if mark_cmd is not None and (k + 1) % mark_every == 0:
            mark_id = f"{call.live.tag}-{k}"
            call.marks.append((mark_id, len(call.sent)))
            await s.command(mark_cmd, mark_id)
    if call.marks:
        await s.wait_mark(call.marks[-1][0], ACKS, timeout=seconds + 10)
    else:
        await asyncio.sleep(ahead * granularity_ms / 1000 + 0.2)


async def load_run(
    rig: Rig,
    calls: int,
    body: Callable[[CallOutcome], Any],
    pcap: Path,
    topology: Topology = DIAL,
) -> tuple[list[CallOutcome], Any]:
    """Place *calls* calls at once, run *body* on each, capture it all."""
    outcomes: list[CallOutcome] = []
    ready = asyncio.Event()
    started = 0

    async def one() -> None:
        nonlocal started
        async with rig.call(capture=False, topology=topology) as live:
            outcome = CallOutcome(live)
            outcomes.append(outcome)
            started += 1
            if started == calls:
                ready.set()
            await ready.wait()
            await body(outcome)

    async with TcpdumpCapture(capture_filter(rig), pcap):
        await asyncio.gather(*(one() for _ in range(calls)))
    # Off the event loop: parsing a large capture takes seconds.
    return outcomes, await asyncio.to_thread(read_and_remove, pcap)


def reports(
    outcomes: Sequence[CallOutcome], packets: Any, bot_port: int, *, mixed: bool = False
) -> tuple[MarkReport, MarkReport]:
    """Mark reports over all calls: by the wire (capture) and by the bot.

    The wire is read only where Asterisk connected to the bot (the bot
    connecting in reads Asterisk's messages as a client): elsewhere, no
    wire figures."""
    rtp = rtp_by_destination(packets)
    ws = websocket_messages(packets, bot_port)
    wire_all = MarkReport([], 0, 0, 0, 0, 0)
    bot_all = MarkReport([], 0, 0, 0, 0, 0)
    for call in outcomes:
        local = call.live.sip.record.local_rtp
        stream = StreamMap(rtp.get(local[1] if local else -1, []), call.sent, mixed=mixed)
        wire_acks, bot_acks = bench_link.acks(call.live, ws, ACKS)
        wire_all = merge(wire_all, analysis.mark_report(call.marks, wire_acks, stream))
        bot_all = merge(bot_all, analysis.mark_report(call.marks, bot_acks, stream))
    return wire_all, bot_all


def merge(a: MarkReport, b: MarkReport) -> MarkReport:
    return MarkReport(
        a.errors_ms + b.errors_ms,
        a.marks + b.marks,
        a.acked + b.acked,
        a.lost + b.lost,
        a.duplicated + b.duplicated,
        a.out_of_order + b.out_of_order,
    )


# --- scenarios ----------------------------------------------------------------------


async def bench_timing(
    rigs: dict[str, Rig], cfg: BenchConfig, out: Path, say: Progress
) -> list[dict[str, Any]]:
    rows = []
    for build, rig in rigs.items():
        mark_cmd = "MARK" if build == "patched" else "MARK_MEDIA"
        for gran in cfg.granularities_ms:
            for n in cfg.concurrency:
                say(f"timing: {build}, {n} call(s), a mark every {gran} ms")
                pcap = out / f"timing-{build}-{n}-{gran}.pcap"
                body = functools.partial(
                    stream_marked, seconds=cfg.seconds, granularity_ms=gran, mark_cmd=mark_cmd
                )
                outcomes, packets = await load_run(rig, n, body, pcap)
                wire, bot = reports(outcomes, packets, rig.bot.port)
                rows.append(
                    {
                        "build": build,
                        "calls": n,
                        "mark_every_ms": gran,
                        "marks": wire.marks,
                        "lost": wire.lost,
                        "duplicated": wire.duplicated,
                        "out_of_order": wire.out_of_order,
                        "wire": summary_dict(wire.summary),
                        "bot": summary_dict(bot.summary),
                        "wire_errors_ms": [round(e, 3) for e in wire.errors_ms],
                    }
                )
                say(
                    f"  {wire.marks} marks, lost {wire.lost}; ack-RTP on the wire "
                    f"{wire.summary}; at the bot {bot.summary}"
                )
    return rows


async def cpu_per_call_second(
    rig: Rig, cfg: BenchConfig, out: Path, *, every_ms: int, mark_cmd: str | None, label: str
) -> float:
    """Asterisk CPU ms per call-second for one run of a load."""
    cpu0 = asterisk_cpu_seconds(rig)
    body = functools.partial(
        stream_marked,
        seconds=cfg.cpu_seconds,
        granularity_ms=20,
        mark_cmd=mark_cmd,
        mark_every=every_ms // 20,
    )
    pcap = out / f"cpu-{label}.pcap"
    await load_run(rig, cfg.cpu_calls, body, pcap)
    cpu = asterisk_cpu_seconds(rig) - cpu0
    return cpu / (cfg.cpu_calls * cfg.cpu_seconds) * 1000


async def bench_cpu(
    rigs: dict[str, Rig], cfg: BenchConfig, out: Path, say: Progress
) -> dict[str, Any]:
    """Asterisk CPU per call-second: audio in 20 ms messages, with and without marks.

    The loads take turns, three rounds, and each reports its median: the
    machine's noise then falls on all of them alike.
    """
    result: dict[str, Any] = {"calls": cfg.cpu_calls, "seconds": cfg.cpu_seconds}
    loads = [
        ("without_marks", "patched", None, 20),
        ("marks_every_20ms", "patched", "MARK", 20),
        ("marks_every_200ms", "patched", "MARK", 200),
        ("upstream_without_marks", "upstream", None, 20),
        ("upstream_mark_media_every_20ms", "upstream", "MARK_MEDIA", 20),
    ]
    loads = [load for load in loads if load[1] in rigs]
    runs: dict[str, list[float]] = {label: [] for label, *_ in loads}
    for round_ in range(cfg.cpu_rounds):
        say(
            f"cpu: round {round_ + 1} of {cfg.cpu_rounds}: {len(loads)} loads of "
            f"{cfg.cpu_calls} calls for {cfg.cpu_seconds:.0f} s"
        )
        for label, build, mark_cmd, every in loads:
            runs[label].append(
                await cpu_per_call_second(
                    rigs[build], cfg, out, every_ms=every, mark_cmd=mark_cmd, label=label
                )
            )
    for label, values in runs.items():
        result[label] = {
            "cpu_ms_per_call_second": round(statistics.median(values), 4),
            "runs": [round(v, 4) for v in values],
        }
        say(
            f"  {label.replace('_', ' ')}: {statistics.median(values):.3f} ms of Asterisk CPU "
            f"per call-second (runs {', '.join(f'{v:.3f}' for v in values)})"
        )

    def overhead(label: str, base: str) -> float | None:
        if label not in result or base not in result:
            return None
        b = result[base]["cpu_ms_per_call_second"]
        return round((result[label]["cpu_ms_per_call_second"] - b) / b * 100, 2) if b else None

    result["overhead_percent"] = overhead("marks_every_20ms", "without_marks")
    result["overhead_200ms_percent"] = overhead("marks_every_200ms", "without_marks")
    result["upstream_overhead_percent"] = overhead(
        "upstream_mark_media_every_20ms", "upstream_without_marks"
    )
    return result


def pacing_metrics(outcome: CallOutcome, result: Any) -> dict[str, Any]:
    """Underruns and latency of a paced response, from the capture."""
    stream = StreamMap(outcome.live.packets, outcome.sent)
    chunks = result.chunks
    underruns, starved = bench_link.underrun_slots(stream, result)
    pairs = bench_link.chunk_latencies(stream, result)
    latency = [g for g, _ in pairs]
    queue = [q for _, q in pairs]
    return {
        "chunks": len(chunks),
        "underrun_slots": underruns,
        "tts_starved_slots": starved,
        "latency_generated_to_rtp": summary_dict(Summary.of(latency)),
        "latency_sent_to_rtp": summary_dict(Summary.of(queue)),
        "padding_bytes": stream.padding,
        "lost_bytes": stream.lost + max(0, len(outcome.sent) - stream.total - stream.lost),
        "fallback": result.fallback,
        "latency_values": [round(v, 2) for v in latency],
    }


async def captured(rigs: list[Rig], pcap: Path, calls: list[Any]) -> dict[int, Any]:
    """Run the *calls* coroutines under one tcpdump capture; the RTP to each
    caller port. (The in-process sniffer would slow the bot down under load.)"""
    bpf = " or ".join(f"({capture_filter(r)})" for r in rigs)
    async with TcpdumpCapture(bpf, pcap):
        await asyncio.gather(*calls)
    return rtp_by_destination(await asyncio.to_thread(read_and_remove, pcap))


def give_rtp(outcome: CallOutcome, rtp: dict[int, Any]) -> None:
    local = outcome.live.sip.record.local_rtp
    outcome.live.packets = rtp.get(local[1] if local else -1, [])


async def bench_pacing(
    rigs: dict[str, Rig], cfg: BenchConfig, out: Path, say: Progress
) -> dict[str, Any]:
    """One response paced four ways at once: marks, clock, drained; marks on upstream."""
    say(
        f"pacing: a {cfg.pacing_ms / 1000:.0f} s response generated in real time, "
        "paced by marks, by a clock estimate, by QUEUE_DRAINED, and by marks on upstream"
    )
    runs = [
        ("marks", "patched", Strategy.MARKS),
        ("clock", "patched", Strategy.CLOCK),
        ("drained", "patched", Strategy.DRAINED),
        ("marks-on-upstream", "upstream", Strategy.MARKS),
    ]
    profile = tts.TtsProfile(seed=cfg.seed)
    sent = b"".join(d for d, _ in tts.plan(cfg.pacing_ms, profile))
    paced: list[tuple[str, CallOutcome, Any]] = []

    async def one(name: str, build: str, strategy: Strategy) -> None:
        async with rigs[build].call(capture=False) as live:
            pacer = Pacer(live.session, strategy=strategy)
            result = await pacer.play(tts.stream(cfg.pacing_ms, profile))
            await asyncio.sleep(0.5)
        paced.append((name, CallOutcome(live, sent), result))

    rtp = await captured(
        list(rigs.values()), out / "pacing.pcap", [one(*r) for r in runs if r[1] in rigs]
    )
    results: dict[str, Any] = {}
    for name, outcome, result in sorted(paced, key=lambda p: [r[0] for r in runs].index(p[0])):
        give_rtp(outcome, rtp)
        results[name] = pacing_metrics(outcome, result)
    for name, m in results.items():
        say(
            f"  {name}: {m['underrun_slots']} underrun slots, "
            f"{m['tts_starved_slots']} starved by the engine; generated->RTP median "
            f"{m['latency_generated_to_rtp']['median']:.0f} ms, sent->RTP median "
            f"{m['latency_sent_to_rtp']['median']:.0f} ms p95 "
            f"{m['latency_sent_to_rtp']['p95']:.0f} ms"
        )
    return results


async def bench_bargein(rig: Rig, cfg: BenchConfig, out: Path, say: Progress) -> dict[str, Any]:
    say(f"barge-in: {cfg.bargein_trials} responses flushed at random points")
    rng = random.Random(cfg.seed)
    done: list[tuple[float, CallOutcome, Any, float]] = []

    async def one(delay: float, seed: int) -> None:
        profile = tts.TtsProfile(seed=seed)
        async with rig.call(capture=False) as live:
            pacer = Pacer(live.session)
            task = asyncio.create_task(pacer.play(tts.stream(8000, profile)))
            await asyncio.sleep(delay)
            clock_est = pacer.clock_heard_ms()
            pacer.barge_in()
            result = await task
            await asyncio.sleep(0.3)
        sent = b"".join(d for d, _ in tts.plan(8000, profile))
        done.append((delay, CallOutcome(live, sent), result, clock_est))

    delays = [rng.uniform(0.8, 5.0) for _ in range(cfg.bargein_trials)]
    rtp = await captured(
        [rig], out / "bargein.pcap", [one(d, 100 + i) for i, d in enumerate(delays)]
    )
    trials: list[dict[str, float]] = []
    for delay, outcome, result, clock_est in done:
        give_rtp(outcome, rtp)
        truth = audio.ms_of(StreamMap(outcome.live.packets, outcome.sent).total)
        trials.append(
            {
                "at_s": round(delay, 3),
                "truth_ms": truth,
                "flush_event_ms": result.heard_ms or 0.0,
                "clock_estimate_ms": clock_est,
            }
        )
    flush_err = [t["flush_event_ms"] - t["truth_ms"] for t in trials]
    clock_err = [t["clock_estimate_ms"] - t["truth_ms"] for t in trials]
    res = {
        "trials": trials,
        "flush_event_error_ms": summary_dict(Summary.of([abs(e) for e in flush_err])),
        "clock_estimate_error_ms": summary_dict(Summary.of([abs(e) for e in clock_err])),
    }
    say(f"  |error| of MEDIA_FLUSHED's position: {Summary.of([abs(e) for e in flush_err])}")
    say(f"  |error| of the clock estimate:      {Summary.of([abs(e) for e in clock_err])}")
    return res


async def bench_topologies(
    installs: dict[str, Path], cfg: BenchConfig, out: Path, phone: PhonePool, say: Progress
) -> list[dict[str, Any]]:
    """Mark timing in every topology (harness.topology), one call each, a mark
    every 20 ms; an ARI-enabled Asterisk per build."""
    rows = []
    for build, install in installs.items():
        mark_cmd = "MARK" if build == "patched" else "MARK_MEDIA"
        async with Rig(
            install,
            out / f"topologies-{build}",
            phone=phone,
            name=f"asterisk-{build}-ari",
            ari=True,
        ) as rig:
            for topology in TOPOLOGIES.values():
                say(f"topologies: {build}, {topology.name}, a mark every 20 ms")
                body = functools.partial(
                    stream_marked,
                    seconds=cfg.topology_seconds,
                    granularity_ms=20,
                    mark_cmd=mark_cmd,
                )
                pcap = out / f"topology-{build}-{topology.name}.pcap"
                outcomes, packets = await load_run(rig, 1, body, pcap, topology=topology)
                wire, bot = reports(outcomes, packets, rig.bot.port, mixed=topology.mixes)
                rows.append(
                    {
                        "build": build,
                        "topology": topology.name,
                        "bridge": "softmix" if topology.mixes else "simple_bridge",
                        "marks": bot.marks,
                        "lost": bot.lost,
                        "timed": len(bot.errors_ms),
                        "wire": summary_dict(wire.summary) if wire.errors_ms else None,
                        "bot": summary_dict(bot.summary),
                        "max_lag_ms": topology.max_lag_ms,
                    }
                )
                say(f"  {bot.marks} marks, lost {bot.lost}; ack-RTP at the bot {bot.summary}")
    return rows


# --- the run ------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """The facts a reader needs to weigh the figures."""
    facts: dict[str, Any] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        facts["memory_gib"] = round(kib / 2**20, 1)
    facts["load_average"] = [round(v, 2) for v in os.getloadavg()]
    return facts


async def run(
    installs: dict[str, Path],
    cfg: BenchConfig,
    out: Path,
    say: Progress,
    results: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every scenario of ``cfg.sections``; returns the results, filling
    *results* as each part ends (what a failed or interrupted run had
    measured is there). *out* must exist."""
    t0 = time.monotonic()
    if results is None:
        results = {}
    results.update(
        {
            "config": asdict(cfg),
            "machine": machine(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    wants = set(cfg.sections)
    most = max((*cfg.concurrency, cfg.cpu_calls, cfg.bargein_trials, 4))
    if wants & {"timing", "cpu", "pacing", "bargein", "topologies"}:
        async with PhonePool(out / "callers", most) as phone:
            await _run(installs, cfg, out, phone, say, results=results)
    if "link" in wants and cfg.link is not None:
        results["link"] = await bench_link.run(installs["patched"], cfg.link, out, say)
    if "instructions" in wants and cfg.instr_rounds:
        results["instructions"] = await instructions.count(
            installs, out, seconds=cfg.instr_seconds, rounds=cfg.instr_rounds, say=say
        )
    results["elapsed_s"] = round(time.monotonic() - t0, 1)
    return results


async def _run(
    installs: dict[str, Path],
    cfg: BenchConfig,
    out: Path,
    phone: PhonePool,
    say: Progress,
    *,
    results: dict[str, Any],
) -> None:
    wants = set(cfg.sections)
    rigs: dict[str, Rig] = {}
    try:
        if wants & {"timing", "cpu", "pacing", "bargein"}:
            for build, install in installs.items():
                rigs[build] = Rig(install, out / build, phone=phone, name=f"asterisk-{build}")
                await rigs[build].start()
        if "timing" in wants:
            results["timing"] = await bench_timing(rigs, cfg, out, say)
        if "cpu" in wants:
            results["cpu"] = await bench_cpu(rigs, cfg, out, say)
        if "pacing" in wants:
            results["pacing"] = await bench_pacing(rigs, cfg, out, say)
        if "bargein" in wants:
            results["bargein"] = await bench_bargein(rigs["patched"], cfg, out, say)
    finally:
        for rig in rigs.values():
            await rig.stop()
    if "topologies" in wants and cfg.topology_seconds:
        results["topologies"] = await bench_topologies(installs, cfg, out, phone, say)
