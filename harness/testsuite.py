"""Upstream's testsuite (asterisk/testsuite) against our builds.

Upstream runs its testsuite on pull requests; ``tests/channels/websocket``
holds its chan_websocket tests, the gate a pull request of ours must pass.
This module runs that directory, unchanged, against each build (patched and
unpatched, 22.10.1 and master), with our own testsuite tests added by the
series in ``asterisk-patch/testsuite/``:

1. the testsuite and starpy snapshots beside the checkout
   (``../shared/upstream``) are verified by their sha256 and unpacked into
   ``build/upstream-testsuite/``; the series is applied with ``git apply``;
2. the testsuite's own virtualenv is made from its ``requirements.txt``
   (PyPI), starpy from its snapshot (the requirements name it by a git URL);
3. each build gets a short ``AST_TEST_ROOT`` (the testsuite's way to use an
   install under a prefix) and ``runtests.py`` runs in PID, mount and network
   namespaces of its own: its ``killall -9 asterisk`` before every test sees
   only its own processes, its clean-up of ``/var/run/asterisk`` and of
   core files in ``/tmp`` touches private copies, and its Asterisk's fixed
   ports (HTTP 8088, AMI 5038, SIP 5060) cannot meet another Asterisk's;
4. one of upstream's tests that fails is run again once (some race on a busy
   machine); a pass then is reported as flaky, with the first failure;
5. ``asterisk-test-suite-report.xml`` gives each test's result; the logs of
   every test are kept under ``build/upstream-testsuite/logs/<build>/``.

``make upstream-testsuite`` prints a table of passes per build;
``tests/upstream/test_upstream_testsuite.py`` asserts them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from harness.asterisk import REPO_ROOT

log = logging.getLogger(__name__)

SHARED_UPSTREAM = REPO_ROOT.parent / "shared" / "upstream"
WORK = REPO_ROOT / "build" / "upstream-testsuite"
SERIES = REPO_ROOT / "asterisk-patch" / "testsuite"
#: The directory of upstream's chan_websocket tests (and ours, added by the series).
TESTS_DIR = "tests/channels/websocket"


@dataclass(frozen=True)
class Build:
    label: str
    install: Path
    #: Built with our series: every test must pass on it. Without it,
    #: upstream's tests must pass and ours must fail.
    patched: bool


#: The builds ``make upstream-testsuite`` runs against.
DEFAULT_BUILDS = (
    Build("22.10.1 patched", REPO_ROOT / "build" / "asterisk", True),
    Build("22.10.1 unpatched", REPO_ROOT / "build" / "asterisk-upstream", False),
    Build("master patched", REPO_ROOT / "build" / "master" / "asterisk", True),
    Build("master unpatched", REPO_ROOT / "build" / "master" / "asterisk-upstream", False),
)
#: A build run gives up after this long (runtests.py itself stops a test that
#: prints nothing for RUNTESTS_SILENCE seconds).
BUILD_TIMEOUT = 900.0
RUNTESTS_SILENCE = 120
#: One of upstream's tests that fails is run again this many times on the same
#: build before it counts as failed. Some of them race on a busy machine (the
#: inbound basic-call sends its file from a thread other than the reactor's);
#: a pass on a later attempt is reported as flaky, with the earlier failure.
#: Our own tests get no second chance: they must not be flaky.
UPSTREAM_RETRIES = 1


class TestsuiteError(RuntimeError):
    """The testsuite could not be set up or run."""

    __test__ = False  # not a pytest test class


@dataclass
class TestResult:
    __test__ = False  # not a pytest test class

    name: str
    #: One of upstream's tests (in the snapshot), not one our series adds.
    upstream: bool
    outcome: str  # "passed", "failed" or "skipped"
    seconds: float
    message: str = ""
    #: Where the attempt's logs are.
    logs: str = ""
    #: The failures of the attempts before this one (one of upstream's tests
    #: is run again when it fails), each with where its logs are.
    earlier: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"

    @property
    def flaky(self) -> bool:
        """Passed, but only on a later attempt."""
        return self.passed and bool(self.earlier)

    @property
    def shown(self) -> str:
        """The outcome for a table: a pass on a later attempt says so."""
        return f"passed (try {len(self.earlier) + 1})" if self.flaky else self.outcome


@dataclass
class BuildResult:
    label: str
    install: str
    patched: bool
    seconds: float
    tests: list[TestResult] = field(default_factory=list)
    logs: str = ""

    def outcome(self, name: str) -> str:
        for test in self.tests:
            if test.name == name:
                return test.shown
        return "missing"

    def again(self, retry: BuildResult) -> None:
        """Take the results of *retry*, a later attempt at some of the tests."""
        for new in retry.tests:
            for i, old in enumerate(self.tests):
                if old.name == new.name:
                    attempt = len(old.earlier) + 1
                    new.earlier = [
                        *old.earlier,
                        f"attempt {attempt}: {old.outcome} (logs in {old.logs}):\n"
                        + old.message[-2000:],
                    ]
                    self.tests[i] = new
        self.seconds += retry.seconds


# --- the snapshots -----------------------------------------------------------


def snapshot(prefix: str, directory: Path = SHARED_UPSTREAM) -> Path:
    """The one ``<prefix>*.tar.xz`` in *directory*, verified by its ``.sha256``."""
    found = sorted(directory.glob(f"{prefix}*.tar.xz"))
    if len(found) != 1:
        raise TestsuiteError(
            f"expected one {prefix}*.tar.xz in {directory}, found {len(found)}: "
            "the pinned snapshots of upstream's testsuite and starpy live in "
            "../shared/upstream beside the checkout"
        )
    tarball = found[0]
    sums = tarball.with_name(tarball.name + ".sha256")
    try:
        expected = sums.read_text().split()[0]
    except (OSError, IndexError) as exc:
        raise TestsuiteError(f"{tarball.name}: no sha256 in {sums}: {exc}") from None
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != expected:
        raise TestsuiteError(
            f"{tarball}: sha256 {digest} is not the pinned {expected}: refusing to use it"
        )
    return tarball


def unpack(tarball: Path, into: Path) -> Path:
    """Unpack a ``git archive`` tarball with one top directory; return that directory."""
    with tarfile.open(tarball) as tar:
        tops = {m.name.split("/", 1)[0] for m in tar.getmembers()}
        if len(tops) != 1:
            raise TestsuiteError(f"{tarball.name}: expected one top directory, got {sorted(tops)}")
        top = into / tops.pop()
        if top.exists():
            shutil.rmtree(top)
        tar.extractall(into, filter="tar")
    return top


def series_patches(series: Path = SERIES) -> list[Path]:
    """The patches of the testsuite series, in the order its ``series`` file gives."""
    names = []
    for line in (series / "series").read_text().splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(series / name)
    return names


def prepare_tree(work: Path = WORK, series: Path | None = SERIES) -> tuple[Path, set[str]]:
    """A fresh testsuite tree with the series applied, and upstream's websocket tests."""
    work.mkdir(parents=True, exist_ok=True)
    tree = unpack(snapshot("asterisk-testsuite-"), work)
    upstream_tests = set(list_tests(tree))
    if series is not None:
        for patch in series_patches(series):
            # Not inside the checkout's own repository: git apply would
            # take paths from its top and skip them all.
            env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(tree.parent))
            run = subprocess.run(
                ["git", "apply", "--verbose", str(patch)],
                check=False,
                cwd=tree,
                env=env,
                capture_output=True,
                text=True,
            )
            if run.returncode:
                raise TestsuiteError(
                    f"{patch.name} does not apply to the testsuite snapshot:\n{run.stderr}"
                )
            if "Applied patch" not in run.stderr and "Checking patch" not in run.stderr:
                raise TestsuiteError(f"{patch.name}: git apply applied nothing:\n{run.stderr}")
            log.info("testsuite: applied %s", patch.name)
    return tree, upstream_tests


def list_tests(tree: Path) -> list[str]:
    """The tests under :data:`TESTS_DIR`: each directory with a test-config.yaml."""
    return sorted(
        str(p.parent.relative_to(tree)) for p in (tree / TESTS_DIR).rglob("test-config.yaml")
    )


# --- the testsuite's virtualenv ----------------------------------------------


def ensure_venv(tree: Path, work: Path = WORK, python: str | None = None) -> Path:
    """The testsuite's virtualenv: its requirements from PyPI, starpy from the snapshot."""
    starpy = snapshot("starpy-")
    requirements = [
        line
        for line in (tree / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("starpy")
    ]
    want = hashlib.sha256("\n".join([*requirements, starpy.name]).encode()).hexdigest()
    venv = work / "venv"
    stamp = venv / ".stamp"
    if stamp.exists() and stamp.read_text() == want and (venv / "bin" / "python").exists():
        return venv
    log.info("testsuite: making its virtualenv in %s (about a minute)", venv)
    if venv.exists():
        shutil.rmtree(venv)
    python = python or os.environ.get("PYTHON") or shutil.which("python3") or sys.executable
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    req = work / "requirements.txt"
    req.write_text("\n".join(requirements) + "\n")
    starpy_dir = unpack(starpy, work)
    pip_log = work / "pip.log"
    with pip_log.open("w") as out:
        run = subprocess.run(
            [
                str(venv / "bin" / "pip"),
                "install",
                "--disable-pip-version-check",
                "-r",
                str(req),
                str(starpy_dir),
            ],
            check=False,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    if run.returncode:
        raise TestsuiteError(
            f"pip could not install the testsuite's requirements (no route to PyPI?); "
            f"see {pip_log}:\n" + "\n".join(pip_log.read_text().splitlines()[-20:])
        )
    stamp.write_text(want)
    return venv


# --- a build's test root -----------------------------------------------------

#: The layout the testsuite expects under AST_TEST_ROOT (paths inside it).
_DIRECTORIES = {
    "astetcdir": "/etc/asterisk",
    "astmoddir": "/usr/lib/asterisk/modules",
    "astvarlibdir": "/var/lib/asterisk",
    "astdbdir": "/var/lib/asterisk",
    "astkeydir": "/var/lib/asterisk",
    "astdatadir": "/var/lib/asterisk",
    "astagidir": "/var/lib/asterisk/agi-bin",
    "astspooldir": "/var/spool/asterisk",
    "astrundir": "/var/run/asterisk",
    "astlogdir": "/var/log/asterisk",
    "astsbindir": "/usr/sbin",
}


def make_root(install: Path, root: Path) -> Path:
    """An AST_TEST_ROOT for *install*: links into it and a short asterisk.conf."""
    binary = install / "sbin" / "asterisk"
    if not binary.exists():
        raise TestsuiteError(f"no Asterisk build at {install} ({binary} is missing)")
    if root.exists():
        shutil.rmtree(root)
    links = {
        "usr/sbin/asterisk": binary,
        "usr/lib/asterisk/modules": install / "lib" / "asterisk" / "modules",
        "var/lib/asterisk": install / "var" / "lib" / "asterisk",
    }
    for name, target in links.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(target.resolve())
    for name in ("var/spool/asterisk", "var/run/asterisk", "var/log/asterisk", "tmp"):
        (root / name).mkdir(parents=True, exist_ok=True)
    (root / "etc" / "asterisk").mkdir(parents=True)
    conf = ["[directories]", *(f"{k} => {v}" for k, v in _DIRECTORIES.items()), ""]
    conf += ["[options]", "verbose = 5", "debug = 5", "nocolor = yes", ""]
    (root / "etc" / "asterisk" / "asterisk.conf").write_text("\n".join(conf))
    return root


def namespace_prefix() -> list[str]:
    """The command that runs the testsuite in PID, mount and network namespaces
    of its own: its Asterisk binds upstream's fixed ports (8088, 5038, 5060),
    which another Asterisk on the machine may hold."""
    if not shutil.which("unshare"):
        raise TestsuiteError("unshare (util-linux) is missing: apt-get install util-linux")
    if not shutil.which("ip"):
        raise TestsuiteError("ip (iproute2) is missing: apt-get install iproute2")
    base = ["unshare", "--pid", "--fork", "--mount-proc", "--net", "--propagation", "private"]
    if os.geteuid() != 0:
        base[1:1] = ["--user", "--map-root-user"]
    return base


#: Run inside the namespaces: private /tmp-side clean-ups, then runtests.py.
_INNER = r"""
set -e
ip link set lo up
mkdir -p /var/run/asterisk
mount -t tmpfs testsuite-run /var/run/asterisk
ln -sfn "$ROOT" "$AST_TEST_ROOT"
exec "$VENV/bin/python" runtests.py "$@"
"""


def run_build(
    tree: Path,
    venv: Path,
    build: Build,
    *,
    tests: Sequence[str],
    upstream_tests: set[str],
    work: Path = WORK,
    attempt: int = 1,
) -> BuildResult:
    """Run *tests* against one build; the results, and the logs of every test kept
    (a later *attempt* keeps its logs beside the first's)."""
    label, install = build.label, build.install
    slug = label.replace(" ", "-").replace(".", "")
    root = make_root(install, work / "roots" / slug)
    if attempt > 1:
        slug += f"-try{attempt}"
    report = tree / "asterisk-test-suite-report.xml"
    report.unlink(missing_ok=True)
    shutil.rmtree(tree / "logs", ignore_errors=True)
    # Short, and unique per run: the control socket's path must fit in 108 bytes.
    short = Path(f"/tmp/astts-{os.getpid()}-{slug[:12]}")
    env = dict(os.environ)
    env.update(
        AST_TEST_ROOT=str(short),
        ROOT=str(root),
        VENV=str(venv),
        PATH=f"{venv / 'bin'}:{install / 'sbin'}:{env.get('PATH', '')}",
        LD_LIBRARY_PATH=":".join(filter(None, [str(install / "lib"), env.get("LD_LIBRARY_PATH")])),
    )
    args = ["--timeout", str(RUNTESTS_SILENCE), "--keep-full-logs"]
    for test in tests:
        args += ["-t", test]
    console = work / f"runtests-{slug}.log"
    started = time.monotonic()
    try:
        with console.open("w") as out:
            subprocess.run(
                [*namespace_prefix(), "bash", "-c", _INNER, "inner", *args],
                check=False,
                cwd=tree,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
            )
    except subprocess.TimeoutExpired:
        log.error("testsuite: %s: runtests.py still running after %.0f s", label, BUILD_TIMEOUT)
    finally:
        short.unlink(missing_ok=True)
    result = BuildResult(label, str(install), build.patched, time.monotonic() - started)
    result.tests = parse_report(report, tests, upstream_tests, console)
    logs = work / "logs" / slug
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    shutil.copy(console, logs / "runtests.log")
    if (tree / "logs").exists():
        shutil.copytree(tree / "logs", logs / "tests", symlinks=True)
    result.logs = str(logs)
    for case in result.tests:
        case.logs = result.logs
    return result


def parse_report(
    report: Path, tests: Sequence[str], upstream_tests: set[str], console: Path
) -> list[TestResult]:
    """Each test's result from runtests.py's JUnit report (missing: failed)."""
    found: dict[str, TestResult] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            # runtests.py names a case by its path's last part, the rest as classname.
            key = f"{case.get('classname', '')}.{case.get('name', '')}"
            failure = case.find("failure")
            skipped = case.find("skipped")
            if failure is not None:
                outcome, message = "failed", (failure.text or "").strip()
            elif skipped is not None:
                outcome, message = "skipped", (skipped.text or "").strip()
            else:
                outcome, message = "passed", ""
            found[key] = TestResult(key, False, outcome, float(case.get("time", 0)), message)
    results = []
    for test in tests:
        # As runtests.py names it (Java's reserved words aside: none of ours).
        parts = re.sub(r"[^A-Za-z0-9_/]", "_", test).split("/")
        key = ".".join(parts[1:-1]) + "." + parts[-1]
        match = found.get(key)
        if match is None:
            message = f"no result in {report.name}; see {console}"
            match = TestResult(test, False, "failed", 0.0, message)
        match.name = test
        match.upstream = test in upstream_tests
        results.append(match)
    return results


# --- the whole run -----------------------------------------------------------


def run(
    builds: Sequence[Build] = DEFAULT_BUILDS,
    *,
    only: Iterable[str] = (),
    work: Path = WORK,
    series: Path | None = SERIES,
    retries: int = UPSTREAM_RETRIES,
    say: Callable[[str], None] = lambda message: None,
) -> list[BuildResult]:
    """Set up the testsuite and run the websocket tests against each build.

    One of upstream's tests that fails is run again, up to *retries* times;
    a later pass is kept, with the earlier failures (``TestResult.flaky``).

    *say* gets a line at each step (for a person watching; the log gets them too).
    """

    def step(message: str) -> None:
        log.info("testsuite: %s", message)
        say(message)

    for build in builds:
        if not (build.install / "sbin" / "asterisk").exists():
            raise TestsuiteError(
                f"no Asterisk build at {build.install} for '{build.label}': run "
                "'make asterisk asterisk-upstream asterisk-master' first"
            )
    started = time.monotonic()
    step(f"unpacking the testsuite snapshot into {work}, applying {series or 'no series'}")
    tree, upstream_tests = prepare_tree(work, series)
    step("the testsuite's virtualenv (a first time takes about a minute)")
    venv = ensure_venv(tree, work)
    tests = [t for t in list_tests(tree) if not only or any(o in t for o in only)]
    if not tests:
        raise TestsuiteError(f"no tests under {TESTS_DIR} match {list(only)}")
    results = []
    for build in builds:
        step(f"{build.label}: {len(tests)} tests against {build.install}")
        result = run_build(tree, venv, build, tests=tests, upstream_tests=upstream_tests, work=work)
        for attempt in range(2, retries + 2):
            failed = [t.name for t in result.tests if t.upstream and not t.passed]
            if not failed:
                break
            step(
                f"{build.label}: {len(failed)} of upstream's tests failed, attempt {attempt} "
                f"at them: {', '.join(failed)}"
            )
            result.again(
                run_build(
                    tree,
                    venv,
                    build,
                    tests=failed,
                    upstream_tests=upstream_tests,
                    work=work,
                    attempt=attempt,
                )
            )
        passed = sum(t.passed for t in result.tests)
        step(
            f"{build.label}: {passed} of {len(result.tests)} passed in {result.seconds:.0f} s "
            f"({time.monotonic() - started:.0f} s since the start); logs in {result.logs}"
        )
        results.append(result)
    (work / "results.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


def summary(results: Sequence[BuildResult]) -> str:
    """A table: one row per test, one column per build, and the passes per build."""
    if not results:
        return "(no builds)"
    names = [t.name for t in results[0].tests]
    width = max(len(n) for n in names) + len(" (ours)") + 2
    head = "".join(f"{r.label:>20}" for r in results)
    lines = [f"{'test':<{width}}{head}"]
    for name in names:
        upstream = next(t.upstream for t in results[0].tests if t.name == name)
        tag = "" if upstream else " (ours)"
        row = "".join(f"{r.outcome(name):>20}" for r in results)
        lines.append(f"{(name + tag):<{width}}{row}")

    def count(r: BuildResult, upstream: bool) -> str:
        mine = [t for t in r.tests if t.upstream == upstream]
        return f"{sum(t.passed for t in mine)}/{len(mine)}"

    lines.append(
        f"{'upstream tests passed':<{width}}" + "".join(f"{count(r, True):>20}" for r in results)
    )
    lines.append(
        f"{'our tests passed':<{width}}" + "".join(f"{count(r, False):>20}" for r in results)
    )
    lines.append(
        f"{'flaky (passed again)':<{width}}"
        + "".join(f"{sum(t.flaky for t in r.tests):>20}" for r in results)
    )
    lines.append(f"{'seconds':<{width}}" + "".join(f"{r.seconds:>20.0f}" for r in results))
    return "\n".join(lines)


def problems(results: Sequence[BuildResult]) -> list[str]:
    """What is wrong: a test failing on a patched build; on an unpatched one,
    one of upstream's tests failing or one of ours passing (then it tests
    nothing the series changes)."""
    found = []
    for r in results:
        for t in r.tests:
            if r.patched and not t.passed:
                found.append(f"{t.name} {t.outcome} on {r.label}: {t.message[:300]}")
            elif not r.patched and t.upstream and not t.passed:
                found.append(f"upstream's {t.name} {t.outcome} on {r.label}: {t.message[:300]}")
            elif not r.patched and not t.upstream and t.outcome != "failed":
                found.append(
                    f"our {t.name} {t.outcome} on {r.label}: it must fail without the series"
                )
    return found
