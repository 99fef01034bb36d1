"""Shared fixtures: one SIP phone per session, one Asterisk per test.

In CI (``CI=true``) a test that would skip because a build, tool or privilege
is missing fails instead: a skip must never pass for a green run.

With ``HARNESS_ASTERISK_HOST`` set (docker compose's test runner does), the
``rig`` fixture uses that running Asterisk instead of starting one per test;
see :class:`harness.rig.Services`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path

import pytest

from harness import analysis, audio
from harness.asterisk import AsteriskError, find_install
from harness.bot import BotSession
from harness.caller import SipPhone
from harness.capture import CaptureError, check_capture_possible
from harness.ports import LOOPBACK
from harness.rig import LiveCall, Rig, Services

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
#: An Asterisk running elsewhere (docker compose), or None: one per test here.
SERVICES = Services.from_env()
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

#: Figures measured by tests, printed at the end of the run.
MEASURED: list[tuple[str, str]] = []


def report(name: str, figure: object) -> None:
    """Record a measured figure for the end-of-run summary."""
    MEASURED.append((name, str(figure)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not MEASURED:
        return
    terminalreporter.section("measured on real calls")
    for name, figure in MEASURED:
        terminalreporter.write_line(f"{name}: {figure}")


#: A shared, noisy machine: timing bounds are loose and the figures are reported.
SLACK_MS = 5.0
MAX_SLACK_MS = 15.0
STALL_MS = 150.0


def check_mark_timing(errors_ms: list[float], lag_ms: float = 0.0) -> None:
    """Acks timed against the RTP of the byte before each mark.

    The median within :data:`SLACK_MS` (upstream's MEDIA_MARK_PROCESSED is a
    whole 20 ms tick late, so this tells the two apart), at least three in
    four within :data:`MAX_SLACK_MS`, and none beyond :data:`STALL_MS`: a
    stall of the shared machine now and then holds one ack up by about a tick.
    In a mixing bridge the ack may come up to *lag_ms* before the audio.
    """
    assert errors_ms, "no timing measured"
    summary = analysis.Summary.of(errors_ms)
    assert -(lag_ms + SLACK_MS) < summary.median < SLACK_MS, summary
    earliest = -(lag_ms + MAX_SLACK_MS)
    near = [e for e in errors_ms if earliest < e < MAX_SLACK_MS]
    assert len(near) >= 0.75 * len(errors_ms), summary
    assert all(abs(e) < STALL_MS for e in errors_ms), summary


async def send_marked_chunks(
    session: BotSession, chunks: int, frames: int = 10, command: str = "MARK"
) -> tuple[bytes, list[tuple[str, int]]]:
    """Send *chunks* chunks of *frames* tagged frames, a ``MARK c<k>`` (or
    *command*, ``MARK_MEDIA``) after each.

    Returns what was sent and each mark with the bytes sent before it.
    """
    sent = b""
    marks: list[tuple[str, int]] = []
    for k in range(chunks):
        chunk = audio.tagged_frames(k * frames, frames)
        await session.send_audio(chunk)
        sent += chunk
        marks.append((f"c{k}", len(sent)))
        await session.command(command, f"c{k}")
    return sent, marks


async def hang_up_with_marks_pending(call: LiveCall) -> None:
    """2 s of audio, marks h0 to h2 behind it, and the caller hangs up 100 ms in."""
    s = call.session
    await s.send_audio(audio.tagged_frames(0, 100))
    for k in range(3):
        await s.command("MARK", f"h{k}")
    await asyncio.sleep(0.1)
    await call.sip.hangup()
    await s.wait_closed()


def check_cleared_by_hangup(session: BotSession) -> None:
    """After :func:`hang_up_with_marks_pending`: every mark cleared, then the position."""
    cleared = session.named("MARK_CLEARED")
    assert [e.mark_id for e in cleared] == ["h0", "h1", "h2"]
    assert {e.get_str("reason") for e in cleared} == {"hangup"}
    assert not session.named("MARK_PLAYED")
    (flushed,) = session.named("MEDIA_FLUSHED")
    assert flushed.get_str("reason") == "hangup"
    assert flushed.get_int("cleared_marks") == 3
    assert 0 < flushed.get_int("played_ms") < 2000
    assert flushed.get_int("played_ms") + flushed.get_int("discarded_ms") == 2000


def need(condition: bool, reason: str) -> None:
    """Skip the test when *condition* is false; in CI, fail it instead."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"required in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parents = Path(str(item.fspath)).parents
        if TESTS / "integration" in parents or TESTS / "network" in parents:
            item.add_marker(pytest.mark.integration)
        if TESTS / "upstream" in parents:
            item.add_marker(pytest.mark.testsuite)
        if TESTS / "pr" in parents:
            item.add_marker(pytest.mark.pr_build)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, which counts as a failure: {report.longrepr}"
    item.stash.setdefault(_reports_key, {})[report.when] = report
    return report


_reports_key = pytest.StashKey[dict[str, pytest.TestReport]]()


def failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_reports_key, {})
    return any(r.failed for r in reports.values())


def _install(flavour: str) -> Path:
    try:
        return find_install(flavour)
    except AsteriskError as exc:
        need(False, str(exc))
        raise


@pytest.fixture(scope="session")
def install() -> Path:
    return _install("patched")


@pytest.fixture(scope="session")
def upstream_install() -> Path:
    return _install("upstream")


@pytest.fixture(scope="session")
def pr_install() -> Path:
    """Master with the pull requests up to 14b (the mode as submitted upstream)."""
    return _install("pr")


@pytest.fixture(scope="session")
def capture_ok() -> None:
    try:
        check_capture_possible()
    except CaptureError as exc:
        need(False, str(exc))


@pytest.fixture(scope="session")
async def phone(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[SipPhone]:
    address = SERVICES.local_address() if SERVICES else LOOPBACK
    sip = SipPhone(tmp_path_factory.mktemp("pjsua2"), address=address)
    await sip.start()
    try:
        yield sip
    finally:
        await sip.stop()


@contextlib.asynccontextmanager
async def _fresh_rig(
    request: pytest.FixtureRequest,
    install: Path | None,
    phone: SipPhone,
    tmp_path: Path,
    services: Services | None = None,
) -> AsyncIterator[Rig]:
    """A rig for one test: its logs printed if the test failed, its sandbox
    removed if it passed."""
    async with Rig(install, tmp_path, phone=phone, services=services) as r:
        try:
            yield r
        finally:
            if failed(request):
                print(r.describe_logs())  # noqa: T201 - shown in the failure report
    if not failed(request) and r.asterisk is not None:
        r.asterisk.cleanup()


@pytest.fixture
async def rig(
    request: pytest.FixtureRequest,
    phone: SipPhone,
    capture_ok: None,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    """A fresh Asterisk (patched build) with the bot server, sharing the phone;
    or the bot server in front of the running services."""
    install = None if SERVICES else request.getfixturevalue("install")
    async with _fresh_rig(request, install, phone, tmp_path, SERVICES) as r:
        yield r


@pytest.fixture
async def local_rig(
    request: pytest.FixtureRequest,
    phone: SipPhone,
    capture_ok: None,
    install: Path,
    tmp_path: Path,
) -> AsyncIterator[Rig]:
    """A fresh Asterisk (patched build) of this host, also where ``rig`` uses
    running services: for tests that need its CLI or its log."""
    async with _fresh_rig(request, install, phone, tmp_path) as r:
        yield r


@pytest.fixture(autouse=True)
def _quiet_collector() -> Iterator[None]:
    """Keep Python's cyclic garbage collector from pausing a call's bot.

    A test times the bot's events as its event loop reads them. A full
    collection walks every object the process holds (scapy, pjsua2 and the
    rest: 160,000 and growing, 60-120 ms on this machine), and one that falls
    on a mark holds its timestamp up by as much: single marks were seen 95 and
    217 ms late in CI. What is alive before each test is frozen (the
    collection first frees the last test's cycles), so a collection during a
    test walks only what the test made. A collection during the test that
    takes over 5 ms is logged (a failing test prints it).
    """
    gc.collect()
    gc.freeze()
    callback = _log_long_collections()
    gc.callbacks.append(callback)
    yield
    gc.callbacks.remove(callback)


def _log_long_collections() -> Callable[[str, dict[str, int]], None]:
    """A :data:`gc.callbacks` entry that logs a collection long enough to move
    a timestamp (a failing test prints it)."""
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        elif (took := (time.perf_counter() - started) * 1000) > 5:
            logging.getLogger(__name__).warning(
                "garbage collection of generation %d took %.0f ms", info["generation"], took
            )

    return callback


@pytest.fixture(autouse=True)
def _debug_logging() -> Iterator[None]:
    if os.environ.get("HARNESS_DEBUG"):
        for name in ("harness", "astmarks"):
            logging.getLogger(name).setLevel(logging.DEBUG)
    yield


@pytest.fixture(scope="session")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the astmarks wheel installed alone, as a bot
    author installs it: its ``bin/python``. The wheel is built from this
    checkout (pip fetches websockets from PyPI)."""
    import subprocess
    import sys

    tmp = tmp_path_factory.mktemp("client")

    def run(*args: str | Path) -> str:
        done = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, check=False, timeout=600
        )
        if done.returncode != 0:
            pytest.fail(f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}")
        return done.stdout

    run(sys.executable, "-m", "build", "--wheel", "--outdir", tmp / "dist", ROOT)
    wheels = list((tmp / "dist").glob("astmarks-*.whl"))
    assert len(wheels) == 1, wheels
    run(sys.executable, "-m", "venv", tmp / "venv")
    python = tmp / "venv" / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheels[0])
    return python
