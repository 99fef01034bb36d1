"""The benchmark's report: a Markdown table and PNG plots (matplotlib)."""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The section of docs/BENCHMARK.md that ``make bench`` rewrites.
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"

TARGETS = {
    "median": "median mark error within 1 ms at 30 calls",
    "p99": "p99 within 5 ms at 30 calls",
    "lost": "0 marks lost",
    "cpu": "CPU overhead of marks at most 5%",
    "instructions": "a mark per 20 ms at most 2% of Asterisk's instructions per call",
    "pacing": "pacing by marks: 0 underruns, at most 60 ms of buffered latency",
    "bargein": "barge-in position error within one frame (20 ms)",
}


def _ms(v: float) -> str:
    return f"{v:+.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables, with the targets next to the figures."""
    machine = results["machine"]
    lines = [
        f"Measured {results['started']} on {machine['cpus']} cores "
        f"({machine.get('cpu', 'CPU unknown')}, {machine.get('platform', 'platform unknown')}; "
        f"{results['elapsed_s'] / 60:.0f} min).",
    ]
    if "timing" in results:
        lines += timing_markdown(results["timing"])
    if "cpu" in results:
        lines += cpu_markdown(results["cpu"])
    if "pacing" in results:
        lines += pacing_markdown(results["pacing"])
    if "bargein" in results:
        lines += bargein_markdown(results["bargein"])
    if results.get("topologies"):
        lines += topologies_markdown(results["topologies"])
    if "link" in results:
        lines += link_markdown(results["link"])
    if "instructions" in results:
        lines += instructions_markdown(results["instructions"])
    lines += ["", "Targets on the patched build: " + "; ".join(TARGETS.values()) + "."]
    return "\n".join(lines) + "\n"


def timing_markdown(timing: list[dict[str, Any]]) -> list[str]:
    lines = [
        "",
        "Mark error = acknowledgment - RTP departure of the last frame before the mark, in "
        'ms; "wire" is when the event\'s TCP segment left Asterisk (capture), "bot" when '
        "the bot read it.",
        "",
        "| build | calls | mark every | marks | lost | dup | out of order "
        "| wire median | wire p95 | wire p99 | wire max | bot median | bot p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timing:
        w, b = r["wire"], r["bot"]
        lines.append(
            f"| {r['build']} | {r['calls']} | {r['mark_every_ms']} ms | {r['marks']} | "
            f"{r['lost']} | {r['duplicated']} | {r['out_of_order']} | {_ms(w['median'])} | "
            f"{_ms(w['p95'])} | {_ms(w['p99'])} | {_ms(w['max'])} | {_ms(b['median'])} | "
            f"{_ms(b['p99'])} |"
        )
    return lines


def cpu_markdown(cpu: dict[str, Any]) -> list[str]:
    def per(label: str) -> str:
        entry = cpu.get(label)
        return f"{entry['cpu_ms_per_call_second']:.3f}" if entry else "-"

    return [
        "",
        f"Asterisk CPU (ms per call-second, all threads, median of interleaved rounds), "
        f"{cpu['calls']} calls for "
        f"{cpu['seconds']:.0f} s, audio in 20 ms messages: patched {per('without_marks')} "
        f"without marks, {per('marks_every_20ms')} with a MARK every 20 ms "
        f"({cpu['overhead_percent']:+.1f}%), {per('marks_every_200ms')} with one every "
        f"200 ms ({cpu.get('overhead_200ms_percent') or 0:+.1f}%); upstream "
        f"{per('upstream_without_marks')} without marks, "
        f"{per('upstream_mark_media_every_20ms')} with a MARK_MEDIA every 20 ms "
        f"({cpu.get('upstream_overhead_percent') or 0:+.1f}%). Seconds of CPU on a shared "
        f"machine: see the instruction counts for the cost. {_noise(cpu)}",
    ]


def pacing_markdown(pacing: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "| pacing a streamed response | underrun slots | slots starved by the engine "
        "| audio lost | generated->RTP median | p95 | sent->RTP median | p95 | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in pacing.items():
        g, q = m["latency_generated_to_rtp"], m["latency_sent_to_rtp"]
        lines.append(
            f"| {name} | {m['underrun_slots']} | {m['tts_starved_slots']} | "
            f"{m['lost_bytes'] / 8:.0f} ms | {g['median']:.0f} ms | {g['p95']:.0f} ms | "
            f"{q['median']:.0f} ms | {q['p95']:.0f} ms | {q['max']:.0f} ms |"
        )
    return lines


def bargein_markdown(b: dict[str, Any]) -> list[str]:
    fe, ce = b["flush_event_error_ms"], b["clock_estimate_error_ms"]
    return [
        "",
        f"Barge-in on loopback, {len(b['trials'])} flushes at random points, |reported - RTP| "
        f"in ms: MEDIA_FLUSHED median {fe['median']:.2f}, max {fe['max']:.2f}; clock estimate "
        f"median {ce['median']:.2f}, max {ce['max']:.2f}.",
    ]


def _num(value: float | None, spec: str = "+.2f", unit: str = "") -> str:
    """*value* formatted, or "-" when there is none (no trial had it)."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:{spec}}{unit}"


def _worst(values: list[float]) -> str:
    return f"{max(values):.1f}" if values else "-"


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "-"


def link_markdown(link: dict[str, Any]) -> list[str]:
    """The bot across a shaped link; the long response; the loaded Asterisk."""
    cfg = link["config"]
    lines = [
        "",
        f"The bot across a link (a network namespace and a veth pair, shaped both ways), "
        f"{cfg['trials']} trial(s) per link, each a {cfg['response_ms'] / 1000:.0f} s response "
        "streamed into two calls at once, one paced by marks and one by a clock estimate, "
        "barged in at a random point. Underrun slots: 20 ms without audio although the "
        "bot had the audio that came next, and sent it too late; in brackets, slots "
        "Asterisk missed although that audio had reached it (a late media tick). "
        "Barge-in error = what the bot was told (MEDIA_FLUSHED; "
        "the clock estimate at the moment of the barge-in) - what left on RTP, in ms; "
        "MARK_PLAYED - RTP on the wire (Asterisk's side of the link) and at the bot.",
        "",
        "| link | marks: underrun slots (+ missed by Asterisk) | marks: sent->RTP "
        "| clock: underrun slots (+ missed by Asterisk) "
        "| clock: sent->RTP | MEDIA_FLUSHED |error| max | clock estimate |error| median / max "
        "| clock-paced call: |error| median / max | MARK_PLAYED-RTP wire | at the bot "
        "| marks played / cleared / unanswered |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in link.get("network", {}).items():
        m, k = c["marks"], c["clock"]
        lines.append(
            f"| {name} | {m['underrun_slots']} (+{m.get('ticks_missed_slots', 0)}) | "
            f"{_num(m['sent_to_rtp_median_ms'], '.1f', ' ms')} | "
            f"{k['underrun_slots']} (+{k.get('ticks_missed_slots', 0)}) | "
            f"{_num(k['sent_to_rtp_median_ms'], '.1f', ' ms')} | "
            f"{_worst(m['flushed_bargein_abs_error_ms'])} | "
            f"{_median(m['clock_bargein_abs_error_ms'])} / "
            f"{_worst(m['clock_bargein_abs_error_ms'])} | "
            f"{_median(k['clock_bargein_abs_error_ms'])} / "
            f"{_worst(k['clock_bargein_abs_error_ms'])} | "
            f"{_num(m['mark_wire_median_ms'])} | {_num(m['mark_bot_median_ms'])} | "
            f"{m['marks_played']} / {m['marks_cleared']} / {m['marks_unanswered']} |"
        )
    for key, title in (("drift", "A long response"), ("load", "A loaded Asterisk")):
        if key not in link:
            continue
        ms = cfg["drift_ms"] if key == "drift" else cfg["load_ms"]
        how = (
            "on an idle machine"
            if key == "drift"
            else f"with Asterisk pinned to one core beside {cfg['hogs']} busy processes"
        )
        lines += ["", f"{title}: {ms / 60000:.0f} min {how}, the same pair.", ""]
        lines += [
            "| paced by | underrun slots (+ missed by Asterisk) | sent->RTP median | p95 "
            "| clock estimate drift "
            "| marks estimate drift | clock - RTP at the end | ticks late (>25 ms) per 1000 "
            "| longest tick |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        run = link[key]["runs"][0]
        for strategy, entry in run.items():
            p = entry["pacing"]
            drift = entry["drift"]
            end = f"{drift[-1][1]:+.1f} ms" if drift else "-"
            t = entry["tick"]
            lines.append(
                f"| {strategy} | {p['underrun_slots']} (+{p.get('ticks_missed_slots', 0)}) | "
                f"{p['sent_to_rtp_ms']['median']:.0f} ms | "
                f"{p['sent_to_rtp_ms']['p95']:.0f} ms | "
                f"{_num(entry['clock_drift_ms_per_min'], '+.2f', ' ms/min')} | "
                f"{_num(entry['marks_drift_ms_per_min'], '+.2f', ' ms/min')} | {end} | "
                f"{t['late_per_1000']} | "
                f"{t['interval_ms']['max']:.1f} ms |"
            )
    return lines


def instructions_markdown(instr: dict[str, Any]) -> list[str]:
    """Instructions per call-second under callgrind."""
    lines = [
        "",
        f"Asterisk's instructions per call-second (callgrind, every thread, one call, "
        f"{instr['seconds']:.0f} s of audio in 20 ms messages and a "
        f"{instr['window_s'] - instr['seconds']:.0f} s tail per window; median of the rounds, "
        "which took turns):",
        "",
        "| load | instructions per call-second | runs | spread | per mark |",
        "|---|---|---|---|---|",
    ]
    for label, entry in instr["loads"].items():
        per_mark = entry.get("instructions_per_mark")
        lines.append(
            f"| {label.replace('_', ' ')} | {entry['instructions_per_call_second']:,} | "
            f"{', '.join(f'{v:,}' for v in entry['runs'])} | {entry['spread_percent']:.2f}% | "
            f"{f'{per_mark:,}' if per_mark is not None else '-'} |"
        )

    def pct(key: str) -> str:
        value = instr.get(key)
        return f"{value:+.1f}%" if value is not None else "-"

    lines += [
        "",
        f"A MARK every 20 ms: {pct('overhead_percent')} (every 200 ms: "
        f"{pct('overhead_200ms_percent')}); upstream's MARK_MEDIA every 20 ms: "
        f"{pct('upstream_overhead_percent')}; MARK against MARK_MEDIA: "
        f"{pct('marks_vs_mark_media_percent')}; a mark in mark positions mode (MARK_MEDIA "
        f"after REPORT_MARK_POSITIONS) against upstream's MARK_MEDIA, per mark: "
        f"{pct('positions_mark_vs_mark_media_percent')}; the patched build without marks "
        f"against upstream: {pct('patched_vs_upstream_percent')}.",
    ]
    return lines


def topologies_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """Mark timing per topology."""
    lines = [
        "",
        "Mark timing per topology (one call, a mark every 20 ms; MARK_PLAYED, upstream "
        "MEDIA_MARK_PROCESSED, - RTP of the byte before the mark, ms; in a mixing bridge "
        "only marks after audible audio are timed, and the audio leaves up to the mixer's "
        "queue later):",
        "",
        "| build | topology | bridge | marks | lost | timed | at the bot median | p95 "
        "| wire median |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        wire = f"{r['wire']['median']:+.2f}" if r.get("wire") else "-"
        lines.append(
            f"| {r['build']} | {r['topology']} | {r['bridge']} | {r['marks']} | {r['lost']} | "
            f"{r['timed']} | {r['bot']['median']:+.2f} | {r['bot']['p95']:+.2f} | {wire} |"
        )
    return lines


def _noise(cpu: dict[str, Any]) -> str:
    """How far the rounds of one load spread: the resolution of the CPU figures."""
    spreads = []
    for entry in cpu.values():
        runs = entry.get("runs") if isinstance(entry, dict) else None
        if runs and len(runs) > 1 and min(runs) > 0:
            spreads.append((max(runs) - min(runs)) / min(runs) * 100)
    if not spreads:
        return ""
    return (
        f"The rounds of a single load differ by up to {max(spreads):.0f}% on this "
        "machine, so differences smaller than that are noise."
    )


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """Timing histograms, pacing latency and underruns, barge-in errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(fig: Any, name: str) -> Path:
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    if "link" in results:
        written += link_plots(results["link"], save, plt)
    if "instructions" in results:
        written.append(instructions_plot(results["instructions"], save, plt))
    if not all(k in results for k in ("timing", "pacing", "bargein")):
        return written
    timing = [r for r in results["timing"] if r["wire_errors_ms"]]
    most = max((r["calls"] for r in timing), default=0)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=False)
    for ax, gran in zip(axes, sorted({r["mark_every_ms"] for r in timing}), strict=False):
        for r in timing:
            if r["calls"] == most and r["mark_every_ms"] == gran:
                ax.hist(
                    r["wire_errors_ms"],
                    bins=60,
                    alpha=0.6,
                    label=f"{r['build']} (n={len(r['wire_errors_ms'])})",
                )
        ax.set_title(f"mark ack - RTP, {most} calls, a mark every {gran} ms")
        ax.set_xlabel("ms")
        ax.legend()
    written.append(save(fig, "timing-histogram.png"))

    pacing = results["pacing"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(pacing)
    ax1.boxplot([pacing[n]["latency_values"] or [0] for n in names], tick_labels=names)
    ax1.set_title("pacing: chunk generated -> RTP departure")
    ax1.set_ylabel("ms")
    ax2.bar(names, [pacing[n]["underrun_slots"] for n in names], label="underrun slots")
    ax2.bar(
        names,
        [pacing[n]["tts_starved_slots"] for n in names],
        alpha=0.4,
        bottom=[pacing[n]["underrun_slots"] for n in names],
        label="starved by engine",
    )
    ax2.set_title("pacing: 20 ms slots without audio")
    ax2.legend()
    written.append(save(fig, "pacing.png"))

    trials = results["bargein"]["trials"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        [t["truth_ms"] for t in trials],
        [t["flush_event_ms"] - t["truth_ms"] for t in trials],
        label="MEDIA_FLUSHED",
    )
    ax.scatter(
        [t["truth_ms"] for t in trials],
        [t["clock_estimate_ms"] - t["truth_ms"] for t in trials],
        label="clock estimate",
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("heard on RTP (ms)")
    ax.set_ylabel("reported - RTP (ms)")
    ax.set_title("barge-in: reported position error")
    ax.legend()
    written.append(save(fig, "bargein.png"))
    return written


def link_plots(link: dict[str, Any], save: Any, plt: Any) -> list[Path]:
    """Barge-in error per link, and the estimates' drift over a long response."""
    written = []
    network = link.get("network", {})
    if network:
        names = list(network)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        series = (
            ("marks", "flushed_bargein_abs_error_ms", "MEDIA_FLUSHED (marks)", "o"),
            ("marks", "clock_bargein_abs_error_ms", "clock estimate, same call", "s"),
            ("clock", "clock_bargein_abs_error_ms", "clock estimate, clock-paced call", "^"),
        )
        for offset, (strategy, key, label, marker) in enumerate(series):
            xs, ys = [], []
            for i, name in enumerate(names):
                for v in network[name][strategy][key]:
                    xs.append(i + (offset - 1) * 0.12)
                    ys.append(v)
            ax.scatter(xs, ys, label=label, marker=marker)
        ax.set_xticks(range(len(names)), names)
        ax.set_xlabel("link between the bot and Asterisk (one-way delay, or loss)")
        ax.set_ylabel("|position told to the bot - RTP| (ms)")
        ax.set_title("barge-in: how much the caller heard, by marks and by a clock")
        ax.legend()
        written.append(save(fig, "link-bargein.png"))
    runs = [(k, link[k]["runs"][0]["marks"]) for k in ("drift", "load") if k in link]
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4), squeeze=False)
        for ax, (key, entry) in zip(axes[0], runs, strict=True):
            drift = entry["drift"]
            ax.plot([d[0] / 60 for d in drift], [d[1] for d in drift], label="clock - RTP")
            ax.plot([d[0] / 60 for d in drift], [d[2] for d in drift], label="marks - RTP")
            ax.axhline(0, color="grey", lw=0.5)
            ax.set_xlabel("minutes into the response")
            ax.set_ylabel("estimated - actual played (ms)")
            ax.set_title("long response, idle" if key == "drift" else "loaded Asterisk")
            ax.legend()
        written.append(save(fig, "drift.png"))
    return written


def instructions_plot(instr: dict[str, Any], save: Any, plt: Any) -> Path:
    """Instructions per call-second per load, with the rounds' range."""
    labels = list(instr["loads"])
    values = [instr["loads"][k]["instructions_per_call_second"] / 1e6 for k in labels]
    low = [v - min(instr["loads"][k]["runs"]) / 1e6 for k, v in zip(labels, values, strict=True)]
    high = [max(instr["loads"][k]["runs"]) / 1e6 - v for k, v in zip(labels, values, strict=True)]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh([k.replace("_", " ") for k in labels], values, xerr=[low, high])
    ax.set_xlabel("million instructions per call-second (callgrind)")
    ax.set_title("Asterisk's instructions per call")
    path: Path = save(fig, "instructions.png")
    return path


def update_readme(readme: Path, table: str) -> bool:
    """Replace the benchmark section of *readme* (docs/BENCHMARK.md) with *table*;
    False if it has no markers."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")
    return True
