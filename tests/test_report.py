"""The benchmark report: tables from results, and the README section."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from harness import report

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
