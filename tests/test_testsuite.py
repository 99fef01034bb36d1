"""harness.testsuite without Asterisk: snapshots, the test root, results."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import pytest

from harness import testsuite
from harness.testsuite import BuildResult, TestResult, TestsuiteError

REPORT = """<?xml version="1.0" ?>
<testsuites>
  <testsuite errors="0" failures="1" name="AsteriskTestSuite" tests="3" time="20.00">
    <testcase classname="channels.websocket.inbound" name="basic_call" time="6.50"/>
    <testcase classname="channels.websocket.marks" name="opt_in" time="4.00">
      <failure>Scenario 'opt-in' failed: this chan_websocket has no MARK</failure>
    </testcase>
    <testcase classname="channels.websocket.outbound" name="flow_control" time="5.00">
      <skipped>Failed dependency</skipped>
    </testcase>
  </testsuite>
</testsuites>
"""


def make_snapshot(directory: Path, name: str, digest: str | None = None) -> Path:
    top = directory / "src" / "top"
    top.mkdir(parents=True)
    (top / "README").write_text("hello\n")
    tarball = directory / name
    with tarfile.open(tarball, "w:xz") as tar:
        tar.add(top, arcname="top")
    real = hashlib.sha256(tarball.read_bytes()).hexdigest()
    (directory / f"{name}.sha256").write_text(f"{digest or real}  {name}\n")
    return tarball


def test_a_snapshot_is_used_only_with_its_pinned_sha256(tmp_path: Path) -> None:
    make_snapshot(tmp_path, "asterisk-testsuite-abc.tar.xz")
    tarball = testsuite.snapshot("asterisk-testsuite-", tmp_path)
    top = testsuite.unpack(tarball, tmp_path / "out")
    assert (top / "README").read_text() == "hello\n"


def test_a_snapshot_that_does_not_match_is_refused(tmp_path: Path) -> None:
    make_snapshot(tmp_path, "starpy-1.tar.xz", digest="0" * 64)
    with pytest.raises(TestsuiteError, match="is not the pinned"):
        testsuite.snapshot("starpy-", tmp_path)


def test_no_snapshot_says_where_it_should_be(tmp_path: Path) -> None:
    with pytest.raises(TestsuiteError, match=r"\.\./shared/upstream"):
        testsuite.snapshot("asterisk-testsuite-", tmp_path)


def test_the_test_root_links_the_install_with_the_testsuite_layout(tmp_path: Path) -> None:
    install = tmp_path / "install"
    (install / "sbin").mkdir(parents=True)
    (install / "sbin" / "asterisk").write_text("")
    (install / "lib" / "asterisk" / "modules").mkdir(parents=True)
    (install / "var" / "lib" / "asterisk").mkdir(parents=True)
    root = testsuite.make_root(install, tmp_path / "root")
    assert (root / "usr" / "sbin" / "asterisk").resolve() == (
        install / "sbin" / "asterisk"
    ).resolve()
    assert (root / "usr/lib/asterisk/modules").is_symlink()
    conf = (root / "etc" / "asterisk" / "asterisk.conf").read_text()
    assert "astmoddir => /usr/lib/asterisk/modules" in conf
    assert "astrundir => /var/run/asterisk" in conf


def test_the_test_root_needs_a_build(tmp_path: Path) -> None:
    with pytest.raises(TestsuiteError, match="no Asterisk build"):
        testsuite.make_root(tmp_path / "nothing", tmp_path / "root")


def test_the_report_gives_each_test_its_outcome(tmp_path: Path) -> None:
    report = tmp_path / "asterisk-test-suite-report.xml"
    report.write_text(REPORT)
    tests = [
        "tests/channels/websocket/inbound/basic-call",
        "tests/channels/websocket/marks/opt-in",
        "tests/channels/websocket/outbound/flow-control",
        "tests/channels/websocket/outbound/basic-call",
    ]
    upstream = {tests[0], tests[2], tests[3]}
    results = testsuite.parse_report(report, tests, upstream, tmp_path / "console.log")
    assert [(r.name, r.outcome, r.upstream) for r in results] == [
        (tests[0], "passed", True),
        (tests[1], "failed", False),
        (tests[2], "skipped", True),
        (tests[3], "failed", True),  # no result at all: failed
    ]
    assert "has no MARK" in results[1].message
    assert "no result" in results[3].message


def result(label: str, patched: bool, outcomes: dict[str, tuple[bool, str]]) -> BuildResult:
    r = BuildResult(label, "/x", patched, 1.0)
    r.tests = [TestResult(name, up, outcome, 1.0) for name, (up, outcome) in outcomes.items()]
    return r


def test_problems_are_what_breaks_the_rules() -> None:
    good = [
        result("p", True, {"up": (True, "passed"), "ours": (False, "passed")}),
        result("u", False, {"up": (True, "passed"), "ours": (False, "failed")}),
    ]
    assert testsuite.problems(good) == []
    bad = [
        result("p", True, {"up": (True, "failed"), "ours": (False, "passed")}),
        result("u", False, {"up": (True, "passed"), "ours": (False, "passed")}),
    ]
    found = testsuite.problems(bad)
    assert len(found) == 2
    assert "up failed on p" in found[0]
    assert "must fail without the series" in found[1]
    table = testsuite.summary(bad)
    assert "ours (ours)" in table
    assert "upstream tests passed" in table


def test_a_later_pass_is_kept_and_called_flaky() -> None:
    first = result("m", False, {"up": (True, "failed"), "other": (True, "passed")})
    first.tests[0].message, first.tests[0].logs = "Reactor timeout", "/logs/m"
    retry = result("m", False, {"up": (True, "passed")})
    retry.tests[0].logs = "/logs/m-try2"
    first.again(retry)
    up = first.tests[0]
    assert up.passed and up.flaky and up.logs == "/logs/m-try2"
    assert up.earlier[0].startswith("attempt 1: failed (logs in /logs/m)")
    assert "Reactor timeout" in up.earlier[0]
    assert not first.tests[1].flaky
    assert first.seconds == 2.0
    assert testsuite.problems([first]) == []
    table = testsuite.summary([first])
    assert "passed (try 2)" in table
    assert "flaky (passed again)" in table


def test_a_failure_on_every_attempt_is_a_failure() -> None:
    first = result("m", False, {"up": (True, "failed")})
    first.tests[0].logs = "/logs/m"
    again = result("m", False, {"up": (True, "failed")})
    again.tests[0].logs = "/logs/m-try2"
    first.again(again)
    up = first.tests[0]
    assert not up.passed and not up.flaky and len(up.earlier) == 1
    assert up.shown == "failed"
    assert testsuite.problems([first])
