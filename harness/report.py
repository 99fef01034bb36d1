"""The benchmark's report: a Markdown table and PNG plots (matplotlib)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: The README section ``make bench`` rewrites.
README_BEGIN = "<!-- bench:begin -->"
README_END = "<!-- bench:end -->"

TARGETS = {
    "median": "median mark error within 1 ms at 30 calls",
    "p99": "p99 within 5 ms at 30 calls",
    "lost": "0 marks lost",
    "cpu": "CPU overhead of marks at most 5%",
    "pacing": "pacing by marks: 0 underruns, at most 60 ms of buffered latency",
    "bargein": "barge-in position error within one frame (20 ms)",
}


def _ms(v: float) -> str:
    return f"{v:+.2f}"


def markdown(results: dict[str, Any]) -> str:
    """The results as Markdown tables, with the targets next to the figures."""
    lines = [
        f"Measured {results['started']} on {results['machine']['cpus']} cores "
        f"({results['elapsed_s']:.0f} s). Mark error = acknowledgment - RTP departure of "
        'the last frame before the mark, in ms; "wire" is when the event\'s TCP segment '
        'left Asterisk (capture), "bot" when the bot read it.',
        "",
        "| build | calls | mark every | marks | lost | dup | out of order "
        "| wire median | wire p95 | wire p99 | wire max | bot median | bot p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["timing"]:
        w, b = r["wire"], r["bot"]
        lines.append(
            f"| {r['build']} | {r['calls']} | {r['mark_every_ms']} ms | {r['marks']} | "
            f"{r['lost']} | {r['duplicated']} | {r['out_of_order']} | {_ms(w['median'])} | "
            f"{_ms(w['p95'])} | {_ms(w['p99'])} | {_ms(w['max'])} | {_ms(b['median'])} | "
            f"{_ms(b['p99'])} |"
        )
    cpu = results["cpu"]

    def per(label: str) -> str:
        entry = cpu.get(label)
        return f"{entry['cpu_ms_per_call_second']:.3f}" if entry else "-"

    lines += [
        "",
        f"Asterisk CPU (ms per call-second, all threads, median of interleaved rounds), "
        f"{cpu['calls']} calls for "
        f"{cpu['seconds']:.0f} s, audio in 20 ms messages: patched {per('without_marks')} "
        f"without marks, {per('marks_every_20ms')} with a MARK every 20 ms "
        f"({cpu['overhead_percent']:+.1f}%), {per('marks_every_200ms')} with one every "
        f"200 ms ({cpu.get('overhead_200ms_percent') or 0:+.1f}%); upstream "
        f"{per('upstream_without_marks')} without marks, "
        f"{per('upstream_mark_media_every_20ms')} with a MARK_MEDIA every 20 ms "
        f"({cpu.get('upstream_overhead_percent') or 0:+.1f}%). Target: at most 5%. "
        f"{_noise(cpu)}",
        "",
        "| pacing a streamed response | underrun slots | slots starved by the engine "
        "| audio lost | generated->RTP median | p95 | sent->RTP median | p95 | max |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in results["pacing"].items():
        g, q = m["latency_generated_to_rtp"], m["latency_sent_to_rtp"]
        lines.append(
            f"| {name} | {m['underrun_slots']} | {m['tts_starved_slots']} | "
            f"{m['lost_bytes'] / 8:.0f} ms | {g['median']:.0f} ms | {g['p95']:.0f} ms | "
            f"{q['median']:.0f} ms | {q['p95']:.0f} ms | {q['max']:.0f} ms |"
        )
    b = results["bargein"]
    fe, ce = b["flush_event_error_ms"], b["clock_estimate_error_ms"]
    lines += [
        "",
        f"Barge-in, {len(b['trials'])} flushes at random points, |reported - RTP| in ms: "
        f"MEDIA_FLUSHED median {fe['median']:.2f}, max {fe['max']:.2f}; clock estimate "
        f"median {ce['median']:.2f}, max {ce['max']:.2f}.",
        "",
        "Targets on the patched build: " + "; ".join(TARGETS.values()) + ".",
    ]
    return "\n".join(lines) + "\n"


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


def update_readme(readme: Path, table: str) -> bool:
    """Replace the README's benchmark section with *table*; False if no markers."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{table}{README_END}{tail}")
    return True
