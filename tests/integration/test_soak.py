"""A short soak (harness.soak): concurrent calls with a mark every 20 ms, flushes
and hangups; every mark answered exactly once, and no file descriptor left
behind. ``make soak`` runs the long one (30 calls, 10 minutes) and reports the
slopes of Asterisk's memory and file descriptors."""

from __future__ import annotations

from pathlib import Path

from harness import soak
from tests.conftest import report


async def test_a_short_soak_loses_no_mark_and_leaks_no_descriptor(
    install: Path, tmp_path: Path
) -> None:
    cfg = soak.SoakConfig(calls=6, seconds=40, call_seconds=(5.0, 15.0), sample_every=2.0)
    result = await soak.run(install, tmp_path, cfg, lambda text: None)
    report("soak (short)", result.summary())
    assert result.calls >= cfg.calls, "each slot placed a call at least"
    assert not result.failed_calls, result.failed_calls
    assert result.marks and result.played, result.summary()
    assert result.lost == 0, result.summary()
    assert result.duplicated == 0, result.summary()
    assert result.fds_after <= result.fds_before + 2, "no descriptor left behind"
