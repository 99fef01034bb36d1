"""The library installs alone: websockets is all a bot author's install pulls."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: What a fresh virtualenv holds before anything is installed.
BOOTSTRAP = {"pip", "setuptools", "wheel"}


def run(python: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(python), *args], capture_output=True, text=True, check=False, timeout=120
    )


def test_the_wheel_pulls_websockets_and_nothing_else(client_venv: Path) -> None:
    listed = run(client_venv, "-m", "pip", "list", "--format=json")
    assert listed.returncode == 0, listed.stderr
    names = {p["name"].lower() for p in json.loads(listed.stdout)} - BOOTSTRAP
    assert names == {"astmarks", "websockets"}


def test_the_library_imports_and_the_rig_says_what_it_needs(client_venv: Path) -> None:
    code = (
        "import astmarks, astmarks.pacer, astmarks.protocol, astmarks.session\n"
        "print(astmarks.__version__, astmarks.MediaSession.__name__, astmarks.pacer.Pacer.__name__)"
    )
    imported = run(client_venv, "-c", code)
    assert imported.returncode == 0, imported.stderr
    assert "MediaSession Pacer" in imported.stdout
    # The rig needs its extra; the command line says which, with no traceback.
    cli = client_venv.parent / "astmarks"
    done = subprocess.run([str(cli), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 2
    assert "pip install 'astmarks[rig]'" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_api_reference_builds_without_a_warning(tmp_path: Path) -> None:
    """What ``make docs`` runs: pdoc with every warning an error."""
    done = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-m",
            "pdoc",
            "--docformat",
            "restructuredtext",
            "-o",
            str(tmp_path),
            "astmarks",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Warn" not in done.stderr, done.stderr
    pages = {p.name for p in (tmp_path / "astmarks").glob("*.html")}
    assert {"session.html", "pacer.html", "protocol.html"} <= pages
    session = (tmp_path / "astmarks" / "session.html").read_text()
    for name in ("MediaSession", "MarkPlayed", "MarkCleared", "Flushed", "MediaTimeout"):
        assert name in session
