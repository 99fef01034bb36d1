"""The command line a person runs: the demo on a real call, and clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PY = sys.executable


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "harness", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=180,
        check=False,
    )


def test_demo_places_a_real_call_with_marks(install: Path, capture_ok: None) -> None:
    result = run("demo", "--tone")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "MEDIA_START" in out and "MEDIA_MARK_PROCESSED seq:" in out
    assert "unanswered" in out and " 0 unanswered" in out
    assert "result:           OK" in out


def test_demo_barge_in_reports_what_was_heard(install: Path, capture_ok: None) -> None:
    result = run("demo", "--tone", "--format", "json", "--barge-in", "1.2")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "MEDIA_FLUSHED says" in result.stdout
    assert '"reason":"flush"' in result.stdout


def test_demo_through_an_ari_mixing_bridge_with_a_barge_in(install: Path, capture_ok: None) -> None:
    """make demo TOPOLOGY=...: an ARI app's externalMedia channel in softmix."""
    result = run("demo", "--tone", "--topology", "ari-third-party", "--barge-in", "1.2")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "ari-third-party: ARI externalMedia" in out and "softmix bridge" in out
    assert "MEDIA_FLUSHED says" in out
    assert "result:           OK" in out


def test_missing_build_is_a_clear_error(tmp_path: Path) -> None:
    result = run("demo", env={"ASTERISK_PREFIX": str(tmp_path)})
    assert result.returncode == 2
    assert "make asterisk" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_arguments_are_explained() -> None:
    result = run("demo", "--format", "xml")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    result = run("demo", "--topology", "ari-out")
    assert result.returncode == 2
    assert "unknown topology 'ari-out': one of dial, dial-in, ari" in result.stderr
