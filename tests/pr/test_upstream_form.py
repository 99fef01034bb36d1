"""The mark positions mode as it would be submitted upstream (patches 1 to 14b).

Master built with the pull request ``ignored-input-errors`` and what it
names (``make asterisk-pr PR=ignored-input-errors``): the fixes, 12, 13, 14
and 14b, without 15 and 16. Upstream's policy keeps new events to the JSON
control message format, so there the mode is JSON only: these real calls
hold that build to what docs/PROTOCOL.md says of it. Every other test runs
on the whole series, where 16 brings the plain-text forms.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from astmarks import MarkPlayed
from astmarks.protocol import ControlFormat
from harness import analysis, audio
from harness.caller import SipPhone
from harness.timing import units
from tests.conftest import check_mark_timing, report
from tests.integration.ownbot import asterisk_for, call
from tests.webbots import WebBot, web_bot


@pytest.fixture
async def own_bot() -> AsyncIterator[WebBot]:
    async with web_bot("websockets", timeout=units(10)) as bot:
        yield bot


async def test_in_plain_text_the_mode_is_refused_and_marks_are_upstreams(
    pr_install: Path,
    phone: SipPhone,
    capture_ok: None,
    own_bot: WebBot,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Plain text: REPORT_MARK_POSITIONS is answered with ERROR, the 'm'
    option is ignored with a warning, MEDIA_START has no mark_positions, and
    MARK_MEDIA is answered as upstream answers it; the library says to dial
    with f(json)."""
    with caplog.at_level(logging.WARNING, logger="astmarks"):
        async with asterisk_for(pr_install, own_bot.uri, "pr-plain") as asterisk:
            start = asterisk.log_offset()
            async with call(asterisk, phone, options="c(ulaw)m") as live:
                s = await own_bot.session()
                caps = await s.started()
                await s.send_audio(audio.tagged_frames(0, 10))
                played = await (await s.mark("plain"))
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.2)
            log, _ = asterisk.log_since(start)
    assert caps.control_format is ControlFormat.PLAIN
    assert "mark_positions" not in caps.fields
    assert not caps.marks
    assert [str(e) for e in s.errors] == ["REPORT_MARK_POSITIONS only supports JSON format."]
    assert "needs the JSON control message format" in log
    assert "offers mark positions mode in the JSON control message format only" in caplog.text
    assert isinstance(played, MarkPlayed) and played.played_ms is None, "upstream's answer"
    assert len(live.packets) == 10


async def test_in_json_the_mode_is_exact_and_ignored_input_is_answered(
    pr_install: Path,
    phone: SipPhone,
    capture_ok: None,
    own_bot: WebBot,
) -> None:
    """JSON with 'm': MEDIA_START says mark_positions, every mark is answered
    in the tick that hands its frame over, with positions, and (14b) an
    unknown command gets an ERROR."""
    async with (
        asterisk_for(pr_install, own_bot.uri, "pr-json") as asterisk,
        call(asterisk, phone, options="c(ulaw)f(json)m") as live,
    ):
        s = await own_bot.session()
        caps = await s.started()
        results = []
        for k in range(8):
            await s.send_audio(audio.tagged_frames(k * 5, 5))
            results.append(await s.mark(f"m{k}"))
        played = [await r for r in results]
        await s.command("NO_SUCH_COMMAND")
        status = await s.status()
        await asyncio.sleep(0.1)
    assert caps.marks and caps.fields.get("mark_positions") is True
    assert all(isinstance(p, MarkPlayed) for p in played)
    assert [p.played_ms for p in played] == [100 * (k + 1) for k in range(8)]
    assert any("Unknown command 'NO_SUCH_COMMAND'" in str(e) for e in s.errors)
    assert status.pending_marks == 0
    departures = {audio.frame_index(p.payload): p.t for p in live.packets}
    errors = [(p.t - departures[k * 5 + 4]) * 1000 for k, p in enumerate(played)]
    report(
        "upstream form (JSON): MEDIA_MARK_PROCESSED - its frame's RTP",
        analysis.Summary.of(errors),
    )
    check_mark_timing(errors)
