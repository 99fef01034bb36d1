"""Upstream's own testsuite against our builds (harness.testsuite).

Upstream runs asterisk/testsuite on pull requests: its chan_websocket tests
(``tests/channels/websocket``) must pass, unchanged, on both patched builds
(22.10.1 and master), as they do on the unpatched ones. Our testsuite tests
(asterisk-patch/testsuite, for the pull request that goes with the series)
must pass on the patched builds and fail on the unpatched ones, because the
driver has no MARK, not for any other reason.

The whole run (four builds, seven tests each) takes about five minutes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness import testsuite
from harness.testsuite import BuildResult, TestResult
from tests.conftest import need, report

#: What our tests print when the driver has no MARK (media_marks.py).
#: What our tests say when the driver lacks what they test: MARK, or mark
#: positions mode.
NO_MARK = ("this chan_websocket has no MARK", "this chan_websocket has no mark positions mode")


@pytest.fixture(scope="module")
def results() -> list[BuildResult]:
    for build in testsuite.DEFAULT_BUILDS:
        need(
            (build.install / "sbin" / "asterisk").exists(),
            f"no build at {build.install}: make asterisk asterisk-upstream asterisk-master",
        )
    need(
        bool(list(testsuite.SHARED_UPSTREAM.glob("asterisk-testsuite-*.tar.xz"))),
        f"no testsuite snapshot in {testsuite.SHARED_UPSTREAM}",
    )
    need(shutil.which("unshare") is not None, "unshare (util-linux): runtests.py's namespaces")
    return testsuite.run()


def explain(result: BuildResult, test: TestResult) -> str:
    """Why a test failed: its message, where its logs are, and earlier attempts."""
    logs = Path(test.logs or result.logs)
    runtests = logs / "runtests.log"
    tail = runtests.read_text(errors="replace").splitlines()[-40:] if runtests.exists() else []
    return (
        f"{test.name} {test.outcome} on {result.label} (logs in {logs}):\n"
        f"{test.message[-3000:]}\n--- runtests.py, last lines ---\n"
        + "\n".join(tail)
        + "".join(f"\n--- earlier, {e}" for e in test.earlier)
    )


def reason(result: BuildResult, test: TestResult) -> str:
    """A failed test's message and the test's own logs, for the reason it failed."""
    text = [test.message]
    slug = test.name.split("/")[-1]
    for path in Path(result.logs).rglob("*"):
        if path.is_file() and slug in str(path) and path.stat().st_size < 5_000_000:
            text.append(path.read_text(errors="replace"))
    return "\n".join(text)


def test_all_of_them_ran(results: list[BuildResult]) -> None:
    report("upstream's testsuite, passes per build", "\n" + testsuite.summary(results))
    for result in results:
        for test in result.tests:
            if test.flaky:
                report(
                    f"upstream's testsuite, FLAKY on {result.label}",
                    f"{test.name} passed on attempt {len(test.earlier) + 1}; "
                    + "; ".join(e.splitlines()[0] for e in test.earlier),
                )
    for result in results:
        upstream = [t for t in result.tests if t.upstream]
        ours = [t for t in result.tests if not t.upstream]
        assert len(upstream) >= 3, f"{result.label}: upstream's websocket tests are missing"
        assert len(ours) >= 4, f"{result.label}: our testsuite tests are missing"
        skipped = [t.name for t in result.tests if t.outcome == "skipped"]
        assert not skipped, f"{result.label}: skipped (a dependency missing?): {skipped}"


def test_upstream_tests_pass_on_every_build(results: list[BuildResult]) -> None:
    failed = [explain(r, t) for r in results for t in r.tests if t.upstream and not t.passed]
    assert not failed, "\n\n".join(failed)


def test_our_tests_pass_on_the_patched_builds(results: list[BuildResult]) -> None:
    failed = [
        explain(r, t)
        for r in results
        if r.patched
        for t in r.tests
        if not t.upstream and not t.passed
    ]
    assert not failed, "\n\n".join(failed)


def test_our_tests_fail_without_the_series_because_there_is_no_mark(
    results: list[BuildResult],
) -> None:
    wrong = []
    for result in results:
        if result.patched:
            continue
        for test in result.tests:
            if test.upstream:
                continue
            if test.outcome != "failed":
                wrong.append(f"{test.name} {test.outcome} on {result.label}")
            elif not any(why in reason(result, test) for why in NO_MARK):
                wrong.append(explain(result, test) + f"\n(expected one of the reasons {NO_MARK})")
    assert not wrong, "\n\n".join(wrong)
