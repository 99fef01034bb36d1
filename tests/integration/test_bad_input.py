"""Bad input from the bot: an ERROR event that names the problem, and nothing lost.

After every bad command the channel must carry on: a valid mark placed
afterwards is still answered, and earlier pending marks are unaffected.
These bots have opted in (they sent MARK): input upstream only logs is answered
with ERROR for them; an app that never opted in sees upstream's behaviour
(tests/integration/test_strict_client.py).
"""

from __future__ import annotations

import asyncio

import pytest

from astmarks.protocol import ControlFormat
from harness import audio
from harness.bot import BotSession
from harness.rig import Rig


async def expect_error(s: BotSession, text: str, contains: str) -> str:
    """Send *text*; the next ERROR must mention *contains*; return its text."""
    after = len(s.events) - 1
    await s.send_text(text)
    error = await s.wait_for("ERROR", after=after)
    message = error.get_str("error_text")
    assert contains.lower() in message.lower(), message
    return message


async def still_works(s: BotSession, name: str) -> None:
    await s.command("MARK", name)
    event = await s.wait_mark(name)
    assert event.name == "MARK_PLAYED"


BAD_PLAIN = [
    ("MARK", "id is required"),
    ("MARK id=", "id is required"),
    ("MARK " + "x" * 65, "longer than 64"),
    ("MARK two words", "visible ASCII"),
    ("MARK caf\u00e9", "visible ASCII"),
    ("MARK tab\there", "control character"),
    ("NO_SUCH_COMMAND 1", "unknown command"),
    ("REPORT_PROGRESS", "interval_ms"),
    ("REPORT_PROGRESS 5", "interval_ms"),
    ("REPORT_PROGRESS soon", "interval_ms"),
    ("REPORT_PROGRESS 60001", "interval_ms"),
    ("X" * 200, "exceeds maximum length of 128"),
]

BAD_JSON = [
    ('{"command":"MARK"}', "id is required"),
    ('{"command":"MARK","id":""}', "id is required"),
    ('{"command":"MARK","id":7}', "must be a string"),
    ('{"command":"MARK","id":"' + "y" * 65 + '"}', "longer than 64"),
    ('{"command":"MARK","id":"a b"}', "visible ASCII"),
    ('{"command":"MARK","id":"\\u0001"}', "visible ASCII"),
    ('{"command":"MARK", id:1', "parse"),
    ('{"id":"no-command"}', "command"),
    ('["MARK"]', "command"),
    ('{"command":"NOPE"}', "unknown command"),
    ('{"command":"REPORT_PROGRESS","interval_ms":"100"}', "interval_ms"),
    ('{"command":"REPORT_PROGRESS","interval_ms":4294967396}', "interval_ms"),
    ('{"command":"REPORT_PROGRESS","interval_ms":-20}', "interval_ms"),
]


@pytest.mark.parametrize(("text", "contains"), BAD_PLAIN, ids=[t[:24] for t, _ in BAD_PLAIN])
async def test_bad_plain_text_commands(rig: Rig, text: str, contains: str) -> None:
    async with rig.call() as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 10))
        await s.command("MARK", "before")
        await expect_error(s, text, contains)
        assert not s.named("MARK_PLAYED", "MARK_CLEARED")[1:], "the bad mark was not queued"
        await s.wait_mark("before")
        await still_works(s, "after")


@pytest.mark.parametrize(("text", "contains"), BAD_JSON, ids=[t[:24] for t, _ in BAD_JSON])
async def test_bad_json_commands(rig: Rig, text: str, contains: str) -> None:
    async with rig.call(control_format=ControlFormat.JSON) as call:
        s = call.session
        await s.send_audio(audio.tagged_frames(0, 10))
        await s.command("MARK", "before")
        await expect_error(s, text, contains)
        await s.wait_mark("before")
        await still_works(s, "after")


async def test_too_many_pending_marks(rig: Rig, fmt: ControlFormat) -> None:
    limit = 1000
    async with rig.call(control_format=fmt) as call:
        s = call.session
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, 5))
        for i in range(limit + 1):
            await s.command("MARK", f"m{i}")
        error = await s.wait_for("ERROR")
        await s.command("GET_STATUS")
        status = await s.wait_for("STATUS", after=error.index)
        await s.command("FLUSH_MEDIA")
        flushed = await s.wait_for("MEDIA_FLUSHED", timeout=10)
        await still_works(s, "after")
    assert f"MARK 'm{limit}' ignored" in error.get_str("error_text")
    assert f"{limit} marks are already pending" in error.get_str("error_text")
    assert status.get_int("pending_marks") == limit
    cleared = s.named("MARK_CLEARED")
    assert len(cleared) == limit
    assert [e.mark_id for e in cleared] == [f"m{i}" for i in range(limit)]
    assert flushed.get_int("cleared_marks") == limit


async def test_marks_without_the_mode_are_not_limited(rig: Rig) -> None:
    """An app that never opted in places more marks than the mode allows while
    paused: every one is answered, in order, and no ERROR comes (upstream's
    option frames were not limited either)."""
    count = 1200
    async with rig.call() as call:
        s = call.session
        await s.command("PAUSE_MEDIA")
        await s.send_audio(audio.tagged_frames(0, 5))
        for i in range(count):
            await s.command("MARK_MEDIA", f"m{i}")
        await s.command("CONTINUE_MEDIA")
        last = f"m{count - 1}"
        await s.wait_mark(last, names=("MEDIA_MARK_PROCESSED",), timeout=10)
        await asyncio.sleep(0.1)
    processed = s.named("MEDIA_MARK_PROCESSED")
    assert [e.get_str("correlation_id") for e in processed] == [f"m{i}" for i in range(count)]
    assert not s.named("ERROR")


@pytest.mark.parametrize("fmt", list(ControlFormat), ids=lambda f: f.value)
async def test_without_the_mode_ignored_input_is_only_logged(
    local_rig: Rig, fmt: ControlFormat
) -> None:
    """Patch 14b is the mode's: an app that never opted in gets no ERROR for
    input upstream only logs (an unknown command, a JSON command without
    "command", an empty or oversized TEXT message), and Asterisk logs a
    warning for each, as upstream does."""
    texts = ["", "X" * 200]
    if fmt is ControlFormat.JSON:
        texts += ['{"command":"NOPE"}', '{"id":"no-command"}']
    else:
        texts.append("NOPE")
    asterisk = local_rig.asterisk
    assert asterisk is not None
    start = asterisk.log_offset()
    async with local_rig.call(control_format=fmt) as call:
        s = call.session
        for text in texts:
            await s.send_text(text)
        await s.command("MARK_MEDIA", "after")
        await s.wait_mark("after")
    assert not s.named("ERROR")
    await asyncio.sleep(0.2)
    log, _ = asterisk.log_since(start)
    assert log.count("WARNING") >= len(texts), log[-2000:]
    assert "TEXT message has 0 length" in log
    assert "exceeds maximum length" in log
    assert "Unknown command 'NOPE'" in log
    if fmt is ControlFormat.JSON:
        assert "JSON command has no 'command' string" in log


async def test_empty_text_message(rig: Rig) -> None:
    async with rig.call() as call:
        await still_works(call.session, "before")
        await expect_error(call.session, "", "0 length")
        await still_works(call.session, "after")


async def test_bad_input_does_not_disturb_media(rig: Rig) -> None:
    """A burst of bad commands between audio messages loses no audio byte (a
    channel in mark positions mode from the dial option: every one answered)."""
    sent = audio.tagged_frames(0, 30)
    async with rig.call(options="m") as call:
        s = call.session
        for i in range(3):
            await s.send_audio(sent[i * 1600 : (i + 1) * 1600])
            for text, _ in BAD_PLAIN:
                await s.send_text(text)
        await s.command("MARK", "end")
        await s.wait_mark("end")
        await asyncio.sleep(0.1)
    assert [audio.frame_index(p.payload) for p in call.packets] == list(range(30))
    assert len(s.named("ERROR")) == 3 * len(BAD_PLAIN)
