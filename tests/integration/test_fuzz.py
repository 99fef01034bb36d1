"""The protocol fuzzer on real calls (harness.fuzz): every answer as documented.

A short run here; ``make test-asan`` and ``make fuzz`` run 100,000 messages
per format against the AddressSanitizer build (``HARNESS_FUZZ_MESSAGES``).
"""

from __future__ import annotations

import os
from pathlib import Path

from astmarks.protocol import ControlFormat
from harness import fuzz
from harness.caller import SipPhone
from harness.rig import Rig
from tests.conftest import report

MESSAGES = int(os.environ.get("HARNESS_FUZZ_MESSAGES", "3000"))
SEED = int(os.environ.get("HARNESS_FUZZ_SEED", "20261201"))


async def test_every_fuzzed_message_gets_the_documented_answer(
    rig: Rig, fmt: ControlFormat
) -> None:
    async with rig.call(control_format=fmt) as call:
        result = await fuzz.run(call.session, fmt, MESSAGES, SEED)
    result.timing(call.packets)
    report(f"fuzz ({fmt.value})", result.summary())
    assert result.ok, "\n".join(result.failures)
    assert result.final_mark_error_ms is not None
    assert abs(result.final_mark_error_ms) < 15, "the final mark is exact to its frame"
    assert rig.asterisk is None or rig.asterisk.running


async def test_the_oracle_fails_on_upstream(
    upstream_install: Path, phone: SipPhone, capture_ok: None, tmp_path: Path
) -> None:
    """The oracle is not vacuous: upstream, without MARK or the refusals, fails it."""
    async with (
        Rig(upstream_install, tmp_path, phone=phone, name="upstream") as rig,
        rig.call() as call,
    ):
        result = await fuzz.run(call.session, ControlFormat.PLAIN, 300, SEED)
    assert not result.ok
    assert any("immediate answers" in f or "answer" in f for f in result.failures)
