"""The benchmark's short version, with loose bounds (the figures print at the end).

`make bench` runs the full version; here it proves the measurement works and
tells patched from upstream, without timing bounds a noisy machine could miss.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from astmarks.pacer import Pacer, Strategy
from harness import analysis, bench, tts
from harness.caller import SipPhone
from harness.rig import Rig
from tests.conftest import report


@pytest.fixture(scope="module")
async def quick(
    install: Path,
    upstream_install: Path,
    capture_ok: None,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    installs = {"patched": install, "upstream": upstream_install}
    # The link and the instruction counts have tests of their own (tests/network).
    cfg = dataclasses.replace(bench.BenchConfig.quick(), link=None, instr_rounds=0)
    return await bench.run(installs, cfg, out, lambda _: None)


def test_mark_timing_and_accounting(quick: dict[str, Any]) -> None:
    for row in quick["timing"]:
        name = f"bench quick: {row['build']}, {row['calls']} calls, every {row['mark_every_ms']} ms"
        report(name, f"wire median {row['wire']['median']:+.2f} p99 {row['wire']['p99']:+.2f} ms")
        assert row["marks"] > 0
        assert (row["lost"], row["duplicated"], row["out_of_order"]) == (0, 0, 0), row
        if row["build"] == "patched":
            assert abs(row["wire"]["median"]) < 5
        else:
            assert row["wire"]["median"] > 10, "upstream is one ptime late"


def test_cpu_is_measured(quick: dict[str, Any]) -> None:
    cpu = quick["cpu"]
    report("bench quick: CPU overhead of a mark every 20 ms", f"{cpu['overhead_percent']:+.1f}%")
    assert cpu["without_marks"]["cpu_ms_per_call_second"] > 0
    assert cpu["overhead_percent"] < 50


def test_pacing(quick: dict[str, Any]) -> None:
    pacing = quick["pacing"]
    marks = pacing["marks"]
    report(
        "bench quick: pacing by marks",
        f"{marks['underrun_slots']} underruns (QUEUE_DRAINED pacing: "
        f"{pacing['drained']['underrun_slots']}), sent->RTP p95 "
        f"{marks['latency_sent_to_rtp']['p95']:.0f} ms",
    )
    # Loose: a 40 ms target on a shared 2-core machine may miss a slot now
    # and then (seen: 1 and 4 slots in 2 of 7 runs); QUEUE_DRAINED pacing,
    # side by side, always leaves many more.
    drained = pacing["drained"]["underrun_slots"]
    assert drained > 0, "QUEUE_DRAINED pacing leaves gaps"
    assert marks["underrun_slots"] <= 5, "pacing by marks keeps the queue fed"
    assert marks["underrun_slots"] < drained, (marks["underrun_slots"], drained)
    assert marks["lost_bytes"] == 0
    assert marks["latency_sent_to_rtp"]["p95"] < 150
    assert pacing["marks-on-upstream"]["fallback"] is True


def test_bargein_position(quick: dict[str, Any]) -> None:
    b = quick["bargein"]
    report(
        "bench quick: barge-in |MEDIA_FLUSHED - RTP|",
        f"max {b['flush_event_error_ms']['max']:.2f} ms",
    )
    assert b["trials"]
    assert b["flush_event_error_ms"]["max"] <= 20


async def test_pacer_falls_back_on_upstream_and_says_so(
    upstream_install: Path,
    phone: SipPhone,
    capture_ok: None,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rig = Rig(upstream_install, tmp_path, phone=phone, name="upstream")
    with caplog.at_level(logging.WARNING, logger="astmarks"):
        async with rig, rig.call() as call:
            pacer = Pacer(call.session, strategy=Strategy.MARKS)
            result = await pacer.play(tts.stream(1000, tts.TtsProfile(ttfb=0.05)))
            played = await result.played(timeout=5)
            # A second response on the same call: the driver is not asked again.
            again = await Pacer(call.session).play(tts.stream(400, tts.TtsProfile(ttfb=0.05)))
            await again.played(timeout=5)
    assert result.fallback and again.fallback
    assert caplog.text.count("has no mark positions mode") == 1, "said once per call"
    assert call.session.named("MEDIA_MARK_PROCESSED"), "MARK_MEDIA per chunk"
    assert played is not None and played.played and played.played_ms is None


async def test_pacer_barge_in_reports_what_the_caller_got(rig: Rig) -> None:
    profile = tts.TtsProfile(ttfb=0.05, seed=11)
    async with rig.call() as call:
        pacer = Pacer(call.session)
        task = asyncio.create_task(pacer.play(tts.stream(5000, profile)))
        await asyncio.sleep(1.5)
        pacer.barge_in()
        result = await task
        await asyncio.sleep(0.2)
    assert result.interrupted and result.flushed is not None
    sent = b"".join(d for d, _ in tts.plan(5000, profile))
    heard_on_rtp = analysis.StreamMap(call.packets, sent).total / 8
    assert result.heard_ms is not None
    assert abs(result.heard_ms - heard_on_rtp) <= 20
    assert 1000 < heard_on_rtp <= 1500, "barge-in acts at once"
