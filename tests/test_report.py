"""The benchmark report: tables from results, and the README section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import bench_link, instructions, report

SUMMARY = {"n": 3, "median": 0.1, "p95": 0.2, "p99": 0.3, "max": 0.4, "min": 0.0}


def results() -> dict[str, Any]:
    row = {
        "build": "patched",
        "calls": 30,
        "mark_every_ms": 20,
        "marks": 600,
        "lost": 0,
        "duplicated": 0,
        "out_of_order": 0,
        "wire": SUMMARY,
        "bot": SUMMARY,
        "wire_errors_ms": [0.1, 0.2],
    }
    pacing = {
        "underrun_slots": 0,
        "tts_starved_slots": 2,
        "lost_bytes": 0,
        "latency_generated_to_rtp": SUMMARY,
        "latency_sent_to_rtp": SUMMARY,
        "latency_values": [1.0, 2.0],
        "chunks": 2,
        "padding_bytes": 0,
        "fallback": False,
    }
    return {
        "started": "2026-01-01T00:00:00Z",
        "machine": {"cpus": 2},
        "elapsed_s": 90.0,
        "timing": [row, {**row, "build": "upstream"}],
        "cpu": {
            "calls": 30,
            "seconds": 6,
            "without_marks": {"cpu_ms_per_call_second": 2.0},
            "marks_every_20ms": {"cpu_ms_per_call_second": 2.05},
            "overhead_percent": 2.5,
        },
        "pacing": {"marks": pacing, "drained": {**pacing, "underrun_slots": 9}},
        "bargein": {
            "trials": [
                {
                    "at_s": 1.0,
                    "truth_ms": 500.0,
                    "flush_event_ms": 500.0,
                    "clock_estimate_ms": 520.0,
                }
            ],
            "flush_event_error_ms": SUMMARY,
            "clock_estimate_error_ms": SUMMARY,
        },
    }


def test_markdown_has_every_section_and_the_targets() -> None:
    text = report.markdown(results())
    assert "| patched | 30 | 20 ms | 600 | 0 | 0 | 0 | +0.10 |" in text
    assert "| upstream | 30 |" in text
    assert "(+2.5%)" in text
    assert "| drained | 9 | 2 | 0 ms |" in text
    assert "MEDIA_FLUSHED median 0.10" in text
    assert "0 marks lost" in text


def test_plots_are_written(tmp_path: Path) -> None:
    paths = report.plots(results(), tmp_path)
    assert [p.name for p in paths] == ["timing-histogram.png", "pacing.png", "bargein.png"]

    assert all(p.stat().st_size > 1000 for p in paths)


def test_update_readme_replaces_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_BEGIN}\nold\n{report.README_END}\noutro\n")
    assert report.update_readme(readme, "new table\n")
    assert readme.read_text() == (
        f"intro\n{report.README_BEGIN}\nnew table\n{report.README_END}\noutro\n"
    )
    plain = tmp_path / "plain.md"
    plain.write_text("no markers")
    assert not report.update_readme(plain, "x")


def pair(flushed_error: float, clock_error: float) -> dict[str, Any]:
    """One trial of a paced pair, as bench_link.run_pair returns it."""
    entry = {
        "pacing": {
            "underrun_slots": 1,
            "tts_starved_slots": 0,
            "sent_to_rtp_ms": SUMMARY,
            "lost_bytes": 0,
        },
        "tick": {"intervals": 100, "late": 1, "late_per_1000": 10.0, "interval_ms": SUMMARY},
        "drift": [(0.0, 5.0, 0.5), (60.0, 25.0, 0.4)],
        "clock_drift_ms_per_min": 20.0,
        "marks_drift_ms_per_min": -0.1,
        "link_ms": 150.0,
    }
    marks: dict[str, Any] = {
        **entry,
        "bargein": {
            "truth_ms": 900.0,
            "clock_error_ms": clock_error,
            "flushed_error_ms": flushed_error,
        },
        "marks": {
            "placed": 10,
            "played": 7,
            "cleared": 3,
            "unanswered": 0,
            "duplicated": 0,
            "out_of_order": 0,
            "wire": SUMMARY,
            "bot": {**SUMMARY, "median": 75.5},
        },
    }
    clock = {**entry, "bargein": {"truth_ms": 900.0, "clock_error_ms": -clock_error}}
    return {"marks": marks, "clock": clock}


def with_link_and_instructions() -> dict[str, Any]:
    cfg = bench_link.LinkConfig.quick()
    trials = [pair(0.0, 61.5), pair(0.0, -12.0)]
    link = {
        "config": vars(cfg) | {"drift_ms": 60_000, "load_ms": 60_000},
        "network": {"75 ± 20 ms": {**bench_link.aggregate(trials), "runs": trials}},
        "drift": {**bench_link.aggregate(trials[:1]), "runs": trials[:1]},
        "load": {**bench_link.aggregate(trials[:1]), "runs": trials[:1]},
    }

    def load(count: int, marks: int) -> list[dict[str, Any]]:
        return [{"instructions": count, "window_s": 1.0, "marks": marks, "kept_up": True}] * 2

    runs = {
        "patched_without_marks": load(2_000_000, 0),
        "patched_mark_every_20ms": load(2_500_000, 50),
        "upstream_without_marks": load(1_980_000, 0),
        "upstream_mark_media_every_20ms": load(2_400_000, 50),
    }
    return {**results(), "link": link, "instructions": instructions.summarize(runs, 1.0)}


def test_markdown_has_the_link_and_the_instructions() -> None:
    text = report.markdown(with_link_and_instructions())
    # MEDIA_FLUSHED max 0, the clock estimate's median and max, both calls.
    assert "| 75 ± 20 ms | 2 (+0) | 0.1 ms | 2 (+0) | 0.1 ms | 0.0 | 36.8 / 61.5 |" in text
    assert "| 14 / 6 / 0 |" in text
    assert "| marks | 1 (+0) | 0 ms | 0 ms | +20.00 ms/min | -0.10 ms/min | +25.0 ms |" in text
    assert "| patched mark every 20ms | 2,500,000 | 2,500,000, 2,500,000 | 0.00% | 10,000 |" in text
    assert "A MARK every 20 ms: +25.0%" in text
    assert "upstream's MARK_MEDIA every 20 ms: +21.2%" in text


def test_link_and_instruction_plots_are_written(tmp_path: Path) -> None:
    paths = report.plots(with_link_and_instructions(), tmp_path)
    names = [p.name for p in paths]
    assert {"link-bargein.png", "drift.png", "instructions.png"} <= set(names)
    assert all(p.stat().st_size > 1000 for p in paths)
