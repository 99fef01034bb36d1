"""The benchmark's link and instruction parts, short, with loose bounds.

`make bench` runs them in full (harness.bench_link, harness.instructions);
here they prove the measurement works: the link really is shaped (the bot
reads MARK_PLAYED a one-way delay after it left Asterisk), MEDIA_FLUSHED
stays exact across it, callgrind counts, and an interrupted run leaves no
namespace, link or busy process behind.

Needs root, iproute2, iptables, fnfqueue, tcpdump and valgrind; in CI a
missing one fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from harness import bench_link, instructions, netns
from tests.conftest import TESTS, need, report

QUICK = bench_link.LinkConfig.quick()
REPO_ROOT = TESTS.parent


def namespaces() -> list[str]:
    """The harness's namespaces, host-side links and iptables chains that exist now."""
    names = subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=False
    ).stdout
    links = subprocess.run(
        ["ip", "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    found = [n.split()[0] for n in names.splitlines() if n.startswith(netns.PREFIX)]
    found += [
        part.strip().split("@")[0]
        for line in links.splitlines()
        if len(parts := line.split(":")) > 1
        and (part := parts[1]).strip().startswith(f"{netns.PREFIX}h")
    ]
    rules = subprocess.run(
        ["iptables-legacy", "-w", "-S"], capture_output=True, text=True, check=False
    ).stdout
    found += [line for line in rules.splitlines() if netns.CHAIN_PREFIX in line]
    return found


@pytest.fixture(scope="module")
def possible() -> None:
    try:
        netns.check_possible()
        import fnfqueue  # noqa: F401 - the delay needs it

        instructions.check_possible()
    except (netns.NetNsError, instructions.InstructionsError, ImportError) as exc:
        need(False, f"the link benchmark: {exc}")
    netns.remove_stale()


@pytest.fixture(scope="module")
async def link(
    possible: None, install: Path, capture_ok: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("link")
    return await bench_link.run(install, QUICK, out, lambda line: None)


def test_the_link_is_shaped_and_cleaned_up(link: dict[str, Any]) -> None:
    far = link["network"]["75 ± 20 ms"]["marks"]
    near = link["network"]["0 ms"]["marks"]
    report(
        "bench link quick: MARK_PLAYED - RTP at the bot, 0 ms and 75 ± 20 ms",
        f"{near['mark_bot_median_ms']:+.1f} ms, {far['mark_bot_median_ms']:+.1f} ms",
    )
    # The bot reads the event a one-way delay (55 to 95 ms) after it left.
    assert 50 < far["mark_bot_median_ms"] < 110
    assert abs(near["mark_bot_median_ms"]) < 10
    assert namespaces() == [], "the namespace and its link are removed"


@pytest.mark.parametrize("condition", [c.name for c in QUICK.conditions])
def test_marks_across_the_link(link: dict[str, Any], condition: str) -> None:
    c = link["network"][condition]
    marks, clock = c["marks"], c["clock"]
    report(
        f"bench link quick, {condition}: barge-in |error| MEDIA_FLUSHED / clock",
        f"{marks['flushed_bargein_abs_error_ms']} / {clock['clock_bargein_abs_error_ms']} ms",
    )
    assert marks["marks_played"] > 0
    # Every mark answered once: played, or cleared by the barge-in.
    assert marks["marks_played"] + marks["marks_cleared"] == marks["marks_placed"]
    assert (marks["marks_unanswered"], marks["marks_duplicated"]) == (0, 0)
    # On Asterisk's side of the link the event goes out with the frame.
    assert abs(marks["mark_wire_median_ms"]) < 5
    # What MEDIA_FLUSHED says the caller got is what left on RTP, whatever the link.
    assert marks["flushed_bargein_abs_error_ms"], "the response was barged in"
    assert max(marks["flushed_bargein_abs_error_ms"]) <= 20
    # Loose: a noisy machine may miss a slot now and then.
    assert marks["underrun_slots"] <= 10


async def test_instructions_are_counted(
    possible: None,
    install: Path,
    upstream_install: Path,
    tmp_path: Path,
) -> None:
    loads = tuple(
        load
        for load in instructions.LOADS
        if load.label
        in ("patched_without_marks", "patched_mark_every_20ms", "upstream_without_marks")
    )
    result = await instructions.count(
        {"patched": install, "upstream": upstream_install},
        tmp_path,
        seconds=2,
        rounds=1,
        loads=loads,
        say=lambda line: None,
    )
    per = {k: v["instructions_per_call_second"] for k, v in result["loads"].items()}
    report(
        "bench instructions quick: per call-second (no marks, a MARK every 20 ms, upstream)",
        f"{per}; a mark every 20 ms {result['overhead_percent']:+.1f}%",
    )
    assert all(v["kept_up"] for v in result["loads"].values())
    assert all(v > 100_000 for v in per.values()), "a call costs Asterisk something"
    # Loose: a mark per frame costs something, and less than the audio itself.
    assert 0 < result["overhead_percent"] < 100
    # Without marks the patched driver does what upstream does.
    assert abs(result["patched_vs_upstream_percent"]) < 10


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_bench_leaves_nothing_behind(
    possible: None, tmp_path: Path, sig: signal.Signals
) -> None:
    """^C or SIGTERM while the bot is across the shaped link: the namespace,
    its link and chain, and Asterisk go, and the command says it was
    interrupted. (The busy processes of the load: test_cpu_hogs_end_with_their_context.)"""
    log = tmp_path / "bench.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    asterisks = set(pids("sbin/asterisk"))
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "harness", "bench", "--quick", "--only", "link"),
                *("--out", str(tmp_path / "out")),
            ],
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while "network 75 ± 20 ms: trial" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert namespaces(), "the run made its namespace"
        proc.send_signal(sig)
        status = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert status == 130, log.read_text()
    assert namespaces() == [], f"left behind: {namespaces()}\n{log.read_text()}"
    assert set(pids("sbin/asterisk")) <= asterisks, "its Asterisk stopped"
    assert "interrupted" in log.read_text()


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def pids(pattern: str) -> list[int]:
    found = subprocess.run(
        ["pgrep", "-f", pattern], capture_output=True, text=True, check=False
    ).stdout
    return [int(p) for p in found.split()]


async def test_cpu_hogs_end_with_their_context() -> None:
    proc = await asyncio.create_subprocess_exec("sleep", "30")
    try:
        async with bench_link.cpu_hogs(proc.pid, 1) as hogs:
            assert all(alive(pid) for pid in hogs)
            assert os.sched_getaffinity(proc.pid) == {min(os.sched_getaffinity(0))}
        await asyncio.sleep(0.1)
        assert not any(alive(pid) for pid in hogs)
        assert os.sched_getaffinity(proc.pid) == os.sched_getaffinity(0)
    finally:
        proc.kill()
        await proc.wait()
