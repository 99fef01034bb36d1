"""Event parsing and command formatting, both control formats."""

from __future__ import annotations

import json

import pytest

from astmarks.protocol import ControlFormat, ProtocolError, format_command, parse_event

PLAIN_MEDIA_START = (
    "MEDIA_START connection_id:bot channel:WebSocket/bot/0x7f05 channel_id:1795497986.1 "
    "format:ulaw optimal_frame_size:160 ptime:20"
)


def test_plain_media_start() -> None:
    e = parse_event(PLAIN_MEDIA_START, t=5.0)
    assert e.name == "MEDIA_START"
    assert e.format is ControlFormat.PLAIN
    assert e.get_str("channel") == "WebSocket/bot/0x7f05"
    assert e.get_int("optimal_frame_size") == 160
    assert e.get_int("ptime") == 20
    assert e.t == 5.0


def test_json_media_start_keeps_types() -> None:
    raw = json.dumps(
        {
            "event": "MEDIA_START",
            "connection_id": "bot",
            "channel_id": "1.1",
            "format": "ulaw",
            "optimal_frame_size": 160,
            "ptime": 20,
            "channel_variables": {"A": "b"},
        }
    )
    e = parse_event(raw)
    assert e.format is ControlFormat.JSON
    assert e.name == "MEDIA_START"
    assert "event" not in e.fields
    assert e.get("channel_variables") == {"A": "b"}
    assert e.get_int("optimal_frame_size") == 160


@pytest.mark.parametrize(
    ("raw", "name", "mark"),
    [
        ("MEDIA_MARK_PROCESSED m1", "MEDIA_MARK_PROCESSED", "m1"),
        ("MEDIA_MARK_PROCESSED", "MEDIA_MARK_PROCESSED", None),
        ("MEDIA_BUFFERING_COMPLETED b-7", "MEDIA_BUFFERING_COMPLETED", "b-7"),
        (
            '{"event":"MEDIA_MARK_PROCESSED","channel_id":"1.2","correlation_id":"x"}',
            "MEDIA_MARK_PROCESSED",
            "x",
        ),
        ("MARK_PLAYED seq:1 played_ms:200 queued_ms:0 id:a:b", "MARK_PLAYED", "a:b"),
        ("MARK_CLEARED seq:2 reason:flush played_ms:0 id:two words", "MARK_CLEARED", "two words"),
        ('{"event":"MARK_PLAYED","id":"c1","played_ms":20}', "MARK_PLAYED", "c1"),
    ],
)
def test_mark_ids(raw: str, name: str, mark: str | None) -> None:
    e = parse_event(raw)
    assert e.name == name
    assert e.mark_id == mark


@pytest.mark.parametrize("raw", ["MEDIA_XON", "MEDIA_XOFF", "QUEUE_DRAINED"])
def test_plain_events_without_data(raw: str) -> None:
    e = parse_event(raw)
    assert e.name == raw
    assert e.fields == {}


def test_plain_status_booleans() -> None:
    e = parse_event(
        "STATUS channel_id:1.1 queue_length:3 xon_level:800 xoff_level:900 "
        "queue_full:false bulk_media:true media_paused:false"
    )
    assert e.get_int("queue_length") == 3
    assert e.get_bool("bulk_media") is True
    assert e.get_bool("queue_full") is False


def test_plain_error_text_keeps_spaces_and_colons() -> None:
    e = parse_event("ERROR channel_id:1.1 error_text:MARK_MEDIA not supported: in mode x:y")
    assert e.get_str("error_text") == "MARK_MEDIA not supported: in mode x:y"
    assert e.get_str("channel_id") == "1.1"


def test_plain_mark_played_fields() -> None:
    e = parse_event("MARK_PLAYED seq:3 played_ms:200 queued_ms:400 id:chunk-1")
    assert (e.get_int("seq"), e.get_int("played_ms"), e.get_int("queued_ms")) == (3, 200, 400)
    assert e.mark_id == "chunk-1"


def test_plain_dtmf() -> None:
    e = parse_event("DTMF_END digit:5 channel_id:1.1")
    assert e.get_str("digit") == "5"


@pytest.mark.parametrize(
    "raw", ["", "   ", "{not json", "[1, 2]", '{"no_event": 1}', "lower case", "A:B C"]
)
def test_malformed_events_raise(raw: str) -> None:
    with pytest.raises(ProtocolError):
        parse_event(raw)


def test_unexpected_plain_token_raises() -> None:
    with pytest.raises(ProtocolError):
        parse_event("MEDIA_XON stray")


def test_int_of_non_number_raises() -> None:
    with pytest.raises(ProtocolError):
        parse_event("STATUS queue_length:lots").get_int("queue_length")


def test_format_plain_commands() -> None:
    assert format_command(ControlFormat.PLAIN, "FLUSH_MEDIA") == "FLUSH_MEDIA"
    assert format_command(ControlFormat.PLAIN, "MARK_MEDIA", "m1") == "MARK_MEDIA m1"
    with pytest.raises(ValueError):
        format_command(ControlFormat.PLAIN, "MARK", "m", extra=1)


def test_format_json_commands() -> None:
    assert json.loads(format_command(ControlFormat.JSON, "MARK_MEDIA", "m1")) == {
        "command": "MARK_MEDIA",
        "correlation_id": "m1",
    }
    assert json.loads(format_command(ControlFormat.JSON, "MARK", "m2")) == {
        "command": "MARK",
        "id": "m2",
    }
    assert json.loads(format_command(ControlFormat.JSON, "REPORT_PROGRESS", 100)) == {
        "command": "REPORT_PROGRESS",
        "interval_ms": 100,
    }
    assert json.loads(format_command(ControlFormat.JSON, "GET_STATUS")) == {"command": "GET_STATUS"}
    with pytest.raises(ValueError):
        format_command(ControlFormat.JSON, "GET_STATUS", "x")


def test_dial_option() -> None:
    assert ControlFormat.JSON.dial_option == "f(json)"
    assert ControlFormat.PLAIN.dial_option == "f(plain-text)"
