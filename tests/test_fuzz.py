"""The fuzzer's grammar and oracle, without Asterisk: the oracle must catch each
kind of wrong answer, and the grammar must stay inside the limits it promises."""

from __future__ import annotations

import random

import pytest

from astmarks.protocol import ControlFormat, Event, parse_event
from harness import fuzz
from harness.fuzz import Answer, Message, Oracle, Sent

PLAIN, JSON = ControlFormat.PLAIN, ControlFormat.JSON


@pytest.mark.parametrize(
    ("data", "fmt", "why"),
    [
        (b"", PLAIN, "0 length"),
        (b"GET_STATUS " + b"x" * 200, PLAIN, "exceeds maximum length"),
        (b"MARK a\0b", PLAIN, "NUL"),
        (b"MARK_MEDIA caf\xc3", JSON, "not valid UTF-8"),
        (b"MARK_MEDIA a\nb", PLAIN, "control character"),
        (b"MARK_MEDIA a\x7f", PLAIN, "control character"),
        (b'{"command":\n"GET_STATUS"}', JSON, None),
        (b"\x01GET_STATUS\r\n", PLAIN, None),  # ast_strip() removes it
        (b"MARK_MEDIA \xe6\x97\xa5", PLAIN, None),
    ],
)
def test_refusal_follows_the_drivers_checks(data: bytes, fmt: ControlFormat, why: str) -> None:
    assert fuzz.refusal(data, fmt) == why


@pytest.mark.parametrize("fmt", [PLAIN, JSON])
def test_the_grammar_is_seeded_and_stays_inside_the_limits(fmt: ControlFormat) -> None:
    def messages(seed: int) -> list[Message]:
        grammar = fuzz.Grammar(fmt, random.Random(seed))
        out = []
        for _ in range(20_000):
            msg = grammar.message()
            grammar.place(msg)
            assert grammar.marks_in_window <= fuzz.MARKS_PER_WINDOW
            assert grammar.bytes_in_window <= fuzz.BYTES_PER_WINDOW + 4000
            out.append(msg)
        return out

    first = messages(11)
    assert first == messages(11)
    assert first != messages(12)
    for msg in first:
        if not msg.binary and len(msg.data) > fuzz.TEXT_MAX:
            assert msg.error == "exceeds maximum length", msg
        if msg.answer is Answer.ERROR:
            assert msg.error, msg
    kinds = {msg.answer for msg in first}
    assert kinds == set(Answer), "every kind of answer is exercised"
    assert any(b"\0" in m.data for m in first)
    assert any(m.binary and len(m.data) % 160 for m in first)


def events(fmt: ControlFormat, *texts: str) -> list[Event]:
    out = []
    for i, text in enumerate(texts):
        event = parse_event(text)
        out.append(
            Event(name=event.name, fields=event.fields, raw=text, format=fmt, index=i, t=0, mono=0)
        )
    return out


def oracle(*sent: Sent) -> Oracle:
    o = Oracle(PLAIN)
    o.sent.extend(sent)
    return o


def text(answer: Answer, **kw: str) -> Message:
    return Message(b"x", False, answer, **kw)


MEDIA = Message(bytes(800), True, Answer.NOTHING)
STATUS = (
    "STATUS channel_id:1 queue_length:5 xon_level:800 xoff_level:900 queue_full:false "
    "bulk_media:false media_paused:false pending_marks:0 played_ms:{} queued_ms:{}"
)


def session() -> list[Sent]:
    """An unknown command, 100 ms of media, a mark, a status and a flush."""
    return [
        Sent(text(Answer.ERROR, error="unknown command"), 0, 0),
        Sent(MEDIA, 0, 0),
        Sent(text(Answer.MARK, mark_id="m1"), 0, 800),
        Sent(text(Answer.STATUS), 0, 800),
        Sent(text(Answer.FLUSHED), 0, 800),
    ]


GOOD = [
    "ERROR channel_id:1 error_text:Unknown command 'x'",
    STATUS.format(40, 60),
    "MARK_PLAYED seq:1 played_ms:100 queued_ms:0 id:m1",
    "MEDIA_FLUSHED reason:flush played_ms:100 discarded_ms:0 cleared_marks:0",
]


def test_the_oracle_passes_a_right_session() -> None:
    o = oracle(*session())
    o.check(events(PLAIN, *GOOD), GOOD)
    assert o.failures == []


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (lambda e: e[1:], "answer 0"),
        (lambda e: e[:-1], "immediate answers"),
        (lambda e: [e[0], e[0], *e[1:]], "answer 1"),
        (
            lambda e: [e[0].replace("Unknown command", "Bad id"), *e[1:]],
            "expected 'unknown command'",
        ),
        (lambda e: [e[0], STATUS.format(40, 80), *e[2:]], "played + queued_ms"),
        (
            lambda e: [*e[:2], e[2].replace("played_ms:100", "played_ms:98"), e[3]],
            "before the mark",
        ),
        (lambda e: [*e[:3], e[2], e[3]], "answered 2 times"),
        (lambda e: [e[0], e[1], e[3]], "answered 0 times"),
        (lambda e: [*e, "MEDIA_MARK_PROCESSED ghost"], "never placed"),
        (lambda e: [*e, "ERROR channel_id:1 error_text:a\tb"], "control character"),
        (
            lambda e: [
                *e,
                "MEDIA_PROGRESS played_ms:100 queued_ms:0 pending_marks:0",
                "MEDIA_PROGRESS played_ms:80 queued_ms:0 pending_marks:0",
            ],
            "after played_ms:100",
        ),
    ],
)
def test_the_oracle_catches_every_kind_of_wrong_answer(change: object, complaint: str) -> None:
    texts = change(list(GOOD))  # type: ignore[operator]
    o = oracle(*session())
    o.check(events(PLAIN, *texts), texts)
    assert any(complaint in f for f in o.failures), o.failures


def test_positions_after_a_flush_start_from_what_was_played() -> None:
    """After a flush, positions continue from its played_ms (known to the ms)."""
    sent = [
        *session(),
        Sent(MEDIA, 1, 0),
        Sent(text(Answer.MARK, mark_id="m2"), 1, 800),
    ]
    good = [*GOOD, "MARK_PLAYED seq:2 played_ms:200 queued_ms:0 id:m2"]
    o = oracle(*sent)
    o.check(events(PLAIN, *good), good)
    assert o.failures == []
    bad = [*GOOD, "MARK_PLAYED seq:2 played_ms:300 queued_ms:0 id:m2"]
    o = oracle(*sent)
    o.check(events(PLAIN, *bad), bad)
    assert any("before the mark" in f for f in o.failures)
