"""An app that never sends MARK sees exactly what upstream sends.

Real clients of chan_websocket reject what they do not know: aiavatarkit
raises on an unknown event, a Rust client errors on unknown events and on
correlation ids it never sent. The strict client here checks every text
message against upstream's own formats (the events and fields upstream's
chan_websocket.c can send, nothing more), runs a whole session of upstream's
commands, and the same session on the unpatched build of the same source must
produce the same messages, byte for byte once channel names and ids are
masked (their timing, one tick after the media before them, is upstream's
too: tests/upstream runs upstream's testsuite, which relies on it). One
deliberate fix in the messages: upstream's ERROR texts for SET_MEDIA_DIRECTION end in a raw
newline, which splits a plain-text event for a line reader (the series
removes it, so the comparison ignores white space at the end of an ERROR).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from astmarks.protocol import ControlFormat
from harness import audio
from harness.bot import BotSession
from harness.caller import SipPhone
from harness.rig import Rig

FORMATS = [ControlFormat.PLAIN, ControlFormat.JSON]

_ID = r"\S+"
_BOOL = r"(?:true|false)"
#: Every plain-text event upstream's chan_websocket sends, as it prints it.
PLAIN_EVENTS = {
    "MEDIA_START": re.compile(
        rf"MEDIA_START connection_id:{_ID} channel:{_ID} channel_id:{_ID} format:\w+ "
        r"optimal_frame_size:\d+ ptime:\d+"
    ),
    "MEDIA_XON": re.compile("MEDIA_XON"),
    "MEDIA_XOFF": re.compile("MEDIA_XOFF"),
    "QUEUE_DRAINED": re.compile("QUEUE_DRAINED"),
    "STATUS": re.compile(
        rf"STATUS channel_id:{_ID} queue_length:\d+ xon_level:\d+ xoff_level:\d+ "
        rf"queue_full:{_BOOL} bulk_media:{_BOOL} media_paused:{_BOOL}"
    ),
    "MEDIA_BUFFERING_COMPLETED": re.compile(r"MEDIA_BUFFERING_COMPLETED(?: (?P<id>.+))?", re.S),
    "MEDIA_MARK_PROCESSED": re.compile(r"MEDIA_MARK_PROCESSED(?: (?P<id>.+))?", re.S),
    "DTMF_END": re.compile(rf"DTMF_END digit:. channel_id:{_ID}"),
    "ERROR": re.compile(rf"ERROR channel_id:{_ID} error_text:.*", re.S),
}
_BASE = {"event", "channel_id"}
#: Every JSON event upstream sends, with exactly these keys.
JSON_EVENTS = {
    "MEDIA_START": _BASE
    | {"connection_id", "channel", "format", "optimal_frame_size", "ptime", "channel_variables"},
    "MEDIA_XON": _BASE,
    "MEDIA_XOFF": _BASE,
    "QUEUE_DRAINED": _BASE,
    "STATUS": _BASE
    | {"queue_length", "xon_level", "xoff_level", "queue_full", "bulk_media", "media_paused"},
    "MEDIA_BUFFERING_COMPLETED": _BASE | {"correlation_id"},
    "MEDIA_MARK_PROCESSED": _BASE | {"correlation_id"},
    "DTMF_END": _BASE | {"digit"},
    "ERROR": _BASE | {"error_text"},
}


class StrictClientError(AssertionError):
    """A message upstream would never have sent."""


def check_strictly(texts: list[str], fmt: ControlFormat, sent_ids: set[str]) -> None:
    """Fail on any event, field or correlation id upstream would not have sent."""
    answered: list[str] = []
    for text in texts:
        if fmt is ControlFormat.JSON:
            obj = json.loads(text)
            name = obj.get("event")
            if name not in JSON_EVENTS:
                raise StrictClientError(f"unknown event: {text}")
            if set(obj) != JSON_EVENTS[name]:
                raise StrictClientError(f"unexpected fields {set(obj) ^ JSON_EVENTS[name]}: {text}")
            mark_id = obj.get("correlation_id")
        else:
            name = text.split(" ", 1)[0]
            pattern = PLAIN_EVENTS.get(name)
            match = pattern.fullmatch(text) if pattern else None
            if match is None:
                raise StrictClientError(f"not an upstream event: {text!r}")
            mark_id = match.groupdict().get("id")
        if name in ("MEDIA_MARK_PROCESSED", "MEDIA_BUFFERING_COMPLETED") and mark_id:
            if mark_id not in sent_ids:
                raise StrictClientError(f"unknown correlation id {mark_id!r}: {text}")
            if mark_id in answered:
                raise StrictClientError(f"correlation id {mark_id!r} answered twice")
            answered.append(mark_id)


def masked(texts: list[str], fmt: ControlFormat) -> list[str]:
    """The messages with what differs from call to call (names, ids) masked."""
    out = []
    for text in texts:
        if fmt is ControlFormat.JSON:
            obj = json.loads(text)
            for key in ("channel_id", "channel", "connection_id", "channel_variables"):
                if key in obj:
                    obj[key] = "*"
            if obj.get("event") == "ERROR":
                obj["error_text"] = obj["error_text"].rstrip()
            out.append(json.dumps(obj, separators=(",", ":")))
        else:
            plain = re.sub(r"\b(channel_id|channel|connection_id):\S+", r"\1:*", text)
            out.append(plain.rstrip() if plain.startswith("ERROR ") else plain)
    return out


async def upstream_session(s: BotSession, fmt: ControlFormat) -> set[str]:
    """Every upstream command, each step waiting for its answer; returns the ids sent."""
    ids: set[str] = set()

    async def status() -> None:
        after = len(s.events) - 1
        await s.command("GET_STATUS")
        await s.wait_for("STATUS", after=after)

    async def mark(mark_id: str | None) -> None:
        if mark_id is not None:
            ids.add(mark_id)
        await s.command("MARK_MEDIA", mark_id)

    # Media and marks, with and without an id (and one with spaces in plain text).
    await s.send_audio(audio.tagged_frames(0, 10))
    await mark("m1")
    await s.wait_mark("m1")
    await s.send_audio(audio.tagged_frames(10, 3))
    await mark(None)
    await s.wait_for("MEDIA_MARK_PROCESSED", lambda e: not e.mark_id)
    if fmt is ControlFormat.PLAIN:
        await mark("two words")
        await s.wait_mark("two words")
    await s.command("REPORT_QUEUE_DRAINED")
    await s.wait_for("QUEUE_DRAINED")
    await status()
    # Buffering, with half a frame at the end.
    await s.command("START_MEDIA_BUFFERING")
    await s.send_audio(audio.tagged_frames(20, 10) + audio.tagged_frames(30, 1)[:80])
    ids.add("b1")
    await s.command("STOP_MEDIA_BUFFERING", "b1")
    await s.wait_for("MEDIA_BUFFERING_COMPLETED")
    # Pause holds media and marks; continue plays them.
    await s.command("PAUSE_MEDIA")
    await s.send_audio(audio.tagged_frames(40, 5))
    await mark("m2")
    await status()
    await s.command("CONTINUE_MEDIA")
    await s.wait_mark("m2")
    # A full queue (XOFF), a flush that drops a pending mark, XON.
    for block in range(19):  # 950 frames, in messages Asterisk accepts (64 KiB at most)
        await s.send_audio(audio.tagged_frames(100 + block * 50, 50))
    await s.wait_for("MEDIA_XOFF")
    await mark("m3")
    await asyncio.sleep(0.1)
    await s.command("FLUSH_MEDIA")
    await s.wait_for("MEDIA_XON")
    await status()
    # Input upstream only logs, and a JSON command it cannot parse.
    await s.command("NO_SUCH_COMMAND")
    await s.send_text("")
    await s.send_text("GET_STATUS " + "x" * 200)
    if fmt is ControlFormat.JSON:
        await s.send_text("{not json")
        await s.send_text('{"nocommand": 1}')
    await status()
    # Media direction: JSON only (plain text gets upstream's ERROR).
    await s.command("SET_MEDIA_DIRECTION", "in")
    if fmt is ControlFormat.JSON:
        await s.send_audio(audio.tagged_frames(0, 5))
        await mark("refused")
        await s.command("PAUSE_MEDIA")
        await s.command("SET_MEDIA_DIRECTION", "both")
        await s.command("CONTINUE_MEDIA")
    await status()
    await s.command("HANGUP")
    await s.wait_closed()
    return ids


async def run(rig: Rig, fmt: ControlFormat) -> list[str]:
    async with rig.call(control_format=fmt, capture=False) as call:
        s = call.session
        sent_ids = await upstream_session(s, fmt)
    check_strictly(s.texts, fmt, sent_ids)
    return s.texts


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.value)
async def test_an_app_without_marks_sees_exactly_what_upstream_sends(
    rig: Rig,
    upstream_install: Path,
    phone: SipPhone,
    tmp_path: Path,
    fmt: ControlFormat,
) -> None:
    patched = await run(rig, fmt)
    upstream_rig = Rig(upstream_install, tmp_path / "upstream", phone=phone, name="upstream")
    async with upstream_rig:
        upstream = await run(upstream_rig, fmt)
    assert masked(patched, fmt) == masked(upstream, fmt)


def test_the_strict_client_fails_on_what_upstream_never_sends() -> None:
    """The checker itself: it must catch each kind of difference."""
    plain, js = ControlFormat.PLAIN, ControlFormat.JSON
    check_strictly(["MEDIA_MARK_PROCESSED a b", "QUEUE_DRAINED"], plain, {"a b"})
    cases: list[tuple[list[str], ControlFormat]] = [
        (["MARK_PLAYED seq:1 played_ms:0 queued_ms:0 id:x"], plain),
        (["MEDIA_MARK_PROCESSED nope"], plain),
        (["MEDIA_MARK_PROCESSED a", "MEDIA_MARK_PROCESSED a"], plain),
        (
            [
                "STATUS channel_id:1 queue_length:0 xon_level:800 xoff_level:900 "
                "queue_full:false bulk_media:false media_paused:false pending_marks:0"
            ],
            plain,
        ),
        (['{"event":"MEDIA_FLUSHED","channel_id":"1"}'], js),
        (['{"event":"QUEUE_DRAINED","channel_id":"1","played_ms":0}'], js),
    ]
    for texts, fmt in cases:
        with pytest.raises(StrictClientError):
            check_strictly(texts, fmt, {"a"})
