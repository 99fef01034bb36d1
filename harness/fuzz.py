"""A grammar-aware fuzzer of chan_websocket's control protocol, with an oracle.

:class:`Grammar` makes messages a broken or hostile bot might send, in either
control format: every command, valid and invalid arguments and ids (too long,
spaces, non-ASCII, control characters, NUL, invalid UTF-8), JSON of every
shape (wrong types, missing fields, arrays, truncated, escapes jansson
refuses), white space around commands, oversized and empty messages, and
binary media of awkward sizes, interleaved at random. Each message carries
the answer ``docs/PROTOCOL.md`` promises for it (:class:`Answer`).

:func:`run` sends them on a real call and :class:`Oracle` checks what came back:

- the immediate answers (ERROR, STATUS, MEDIA_FLUSHED) come in order, one per
  message that calls for one, each ERROR saying what was wrong;
- every mark is answered exactly once (MARK_PLAYED or MARK_CLEARED, and
  MEDIA_MARK_PROCESSED or MEDIA_MARK_CLEARED), no id is answered that was not sent;
- every position is exact: a MARK_PLAYED's or MEDIA_MARK_PROCESSED's
  ``played_ms`` is the media sent before its mark, and a STATUS's or
  MEDIA_FLUSHED's played plus queued (or discarded) is the media sent before
  it, to the millisecond;
- every frame was valid (the bot's WebSocket library fails the connection on
  invalid UTF-8) and, in plain text, one line;
- a final mark after all of it is still exact against the RTP to the caller
  (:meth:`FuzzReport.timing`, once the capture has stopped).

The generator keeps the session inside the limits whose answers depend on
timing (1000 pending marks in the mode, 1000 queued frames) by flushing in time: those
limits have their own tests.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import random
import re
import string
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from astmarks.protocol import MARK_CLEARED_EVENTS, MARK_REACHED_EVENTS, ControlFormat, Event
from harness import audio
from harness.bot import BotError, BotSession
from harness.capture import RtpPacket
from harness.timing import units

log = logging.getLogger(__name__)

#: chan_websocket's limit on a text message, in bytes.
TEXT_MAX = 128
#: The longest MARK id.
MARK_ID_MAX = 64
#: Flush before this many marks are pending or this much media is queued, so
#: that the timing-dependent limits (1000 of each) are never reached.
MARKS_PER_WINDOW = 600
BYTES_PER_WINDOW = 100_000
#: A control character: it would split a plain-text event read as a line.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: White space for padding commands.
WHITESPACE = " \t\n\v\f\r"
#: What ast_strip() removes from both ends of a command: every byte below '!'.
BLANKS = "".join(chr(c) for c in range(33))
#: The index of the first tagged frame before the final mark, and how many.
FINAL_FRAMES = 900_000
FINAL_COUNT = 25
#: Characters for ids the oracle can match in either format.
ID_CHARS = string.ascii_letters + string.digits + "-_.+=/"

COMMANDS = (
    "ANSWER",
    "START_MEDIA_BUFFERING",
    "STOP_MEDIA_BUFFERING",
    "MARK_MEDIA",
    "MARK",
    "REPORT_PROGRESS",
    "FLUSH_MEDIA",
    "GET_STATUS",
    "REPORT_QUEUE_DRAINED",
    "PAUSE_MEDIA",
    "CONTINUE_MEDIA",
    "SET_MEDIA_DIRECTION",
)


class Answer(enum.Enum):
    """What chan_websocket answers a message with (an opted-in app)."""

    #: Nothing right away (media, PAUSE_MEDIA, a valid REPORT_PROGRESS, ...).
    NOTHING = "nothing"
    #: One ERROR, right away.
    ERROR = "error"
    #: One STATUS, right away.
    STATUS = "status"
    #: MARK_CLEARED for each pending mark, then one MEDIA_FLUSHED, right away.
    FLUSHED = "flushed"
    #: MARK_PLAYED once its media is played, or MARK_CLEARED: exactly once.
    MARK = "mark"
    #: MEDIA_MARK_PROCESSED once its media is played, or MEDIA_MARK_CLEARED: exactly once.
    MARK_MEDIA = "mark_media"
    #: MEDIA_BUFFERING_COMPLETED once its media is played, unless a flush comes first.
    BUFFERING = "buffering"


#: The events that answer a MARK or a MARK_MEDIA in mark positions mode.
MARK_ANSWERS = frozenset({*MARK_REACHED_EVENTS, *MARK_CLEARED_EVENTS})

#: The answers that come right away, in the order of the messages.
IMMEDIATE = {Answer.ERROR: "ERROR", Answer.STATUS: "STATUS", Answer.FLUSHED: "MEDIA_FLUSHED"}


@dataclass(frozen=True)
class Message:
    """One message the fuzzer sends, and what it must be answered with."""

    data: bytes
    binary: bool
    answer: Answer
    #: For ERROR: words the error text must contain (case-insensitive).
    error: str = ""
    #: For marks: the id the answer carries ("" for a MARK_MEDIA without one).
    mark_id: str = ""
    note: str = ""

    def describe(self) -> str:
        kind = "binary" if self.binary else "text"
        shown = f"{len(self.data)} bytes" if self.binary else repr(self.data[:60])
        return f"{kind} {shown} -> {self.answer.value}{f' ({self.note})' if self.note else ''}"


def _text(data: str | bytes, answer: Answer, **kw: str) -> Message:
    raw = data.encode() if isinstance(data, str) else data
    return Message(raw, False, answer, **kw)


def refusal(data: bytes, fmt: ControlFormat) -> str | None:
    """The error a text message gets before its command is looked at, if any.

    The checks chan_websocket makes on every text message, in its order.
    """
    if not data:
        return "0 length"
    if len(data) > TEXT_MAX:
        return "exceeds maximum length"
    if b"\0" in data:
        return "NUL"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "not valid UTF-8"
    if fmt is ControlFormat.PLAIN and CONTROL.search(text.strip(BLANKS)):
        return "control character"
    return None


def visible_ascii(text: str) -> bool:
    return bool(text) and all("!" <= c <= "~" for c in text)


@dataclass
class Grammar:
    """Messages for one session in one control format, from a seeded generator."""

    fmt: ControlFormat
    rng: random.Random
    #: Binary bytes sent so far (μ-law: a byte is a sample).
    sent_bytes: int = 0
    #: Flushes so far, and media bytes and marks sent since the last one.
    window: int = 0
    bytes_in_window: int = 0
    marks_in_window: int = 0
    serial: int = 0

    # --- the pieces -----------------------------------------------------------------------

    def new_id(self, longest: int = 24) -> str:
        self.serial += 1
        tail = "".join(self.rng.choices(ID_CHARS, k=self.rng.randint(0, longest)))
        return f"{self.serial}{tail}"[: max(longest, len(str(self.serial)))]

    def junk(self, n: int) -> str:
        """Printable text of every script, for names nobody knows."""
        pools = (
            string.ascii_letters + string.digits + string.punctuation,
            "éüñçøßÅ",
            "日本語コマンド",
            "😀🎧📞",
            "\u2028\u00a0\u200b",
        )
        return "".join(self.rng.choice(self.rng.choice(pools)) for _ in range(n))

    def bad_bytes(self) -> bytes:
        """Bytes that are not UTF-8."""
        return self.rng.choice(
            [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xae", b"\xf8\x88\x80\x80\x80", b"\x80"]
        )

    def pad(self, text: str) -> str:
        """Sometimes surround a command with the white space ast_strip removes."""
        if self.rng.random() < 0.15:
            left = "".join(self.rng.choices(WHITESPACE, k=self.rng.randint(0, 3)))
            right = "".join(self.rng.choices(WHITESPACE, k=self.rng.randint(0, 3)))
            return left + text + right
        return text

    def command(self, name: str, key: str | None = None, value: object = None) -> str:
        """*name* in this format, with an argument (plain) or a key (JSON)."""
        if self.fmt is ControlFormat.PLAIN:
            return name if value is None else f"{name} {value}"
        obj: dict[str, object] = {"command": name}
        if key is not None:
            obj[key] = value
        if self.rng.random() < 0.2:
            obj[self.rng.choice(["x", "id2", "n", "extra"])] = self.rng.choice(
                [1, "y", None, [1, 2], {"a": True}, 1.5]
            )
        return json.dumps(obj, ensure_ascii=self.rng.random() < 0.5)

    # --- messages -------------------------------------------------------------------------

    def message(self) -> Message:
        """The next message: a flush when a window is full, else one at random."""
        if self.marks_in_window >= MARKS_PER_WINDOW or self.bytes_in_window >= BYTES_PER_WINDOW:
            return self.flush()
        msg = self.random_message()
        if not msg.binary and len(msg.data) > TEXT_MAX and msg.error != "exceeds maximum length":
            msg = _text(msg.data, Answer.ERROR, error="exceeds maximum length")
        if msg.answer in (Answer.MARK, Answer.MARK_MEDIA, Answer.BUFFERING):
            self.marks_in_window += 1
        return msg

    def random_message(self) -> Message:
        makers: list[tuple[float, Callable[[], Message]]] = [
            (20, self.media),
            (12, self.mark),
            (6, self.mark_media),
            (4, self.buffering),
            (6, self.status),
            (3, self.progress),
            (3, self.simple),
            (1, self.flush),
            (6, self.unknown),
            (6, self.broken_text),
            (5, self.bad_mark),
        ]
        if self.fmt is ControlFormat.JSON:
            makers += [(6, self.bad_json), (2, self.direction)]
        else:
            makers += [(1, self.plain_direction)]
        weights = [w for w, _ in makers]
        return self.rng.choices([m for _, m in makers], weights=weights)[0]()

    def media(self) -> Message:
        size = self.rng.choice(
            [0, 1, 2, 3, 79, 80, 81, 159, 160, 161, 320, 480, 1000, 1023, 1024, 1600, 3200, 4000]
        )
        return Message(self.rng.randbytes(size), True, Answer.NOTHING, note="media")

    def mark(self) -> Message:
        mark_id = self.new_id(MARK_ID_MAX - 4)
        if self.fmt is ControlFormat.PLAIN:
            text = f"MARK id={mark_id}" if self.rng.random() < 0.3 else f"MARK {mark_id}"
        else:
            text = self.command("MARK", "id", mark_id)
        return _text(self.pad(text), Answer.MARK, mark_id=mark_id)

    def mark_media(self) -> Message:
        if self.rng.random() < 0.15:
            return _text(self.pad(self.command("MARK_MEDIA")), Answer.MARK_MEDIA, mark_id="")
        mark_id = self.new_id()
        if self.fmt is ControlFormat.PLAIN and self.rng.random() < 0.3:
            mark_id = f"{mark_id} two words"  # upstream's ids may have spaces
        if self.fmt is ControlFormat.JSON and self.rng.random() < 0.3:
            mark_id += self.junk(3)  # any string, escaped or not
        text = self.command("MARK_MEDIA", "correlation_id", mark_id)
        if len(text.encode()) > TEXT_MAX:
            return self.mark_media()
        return _text(self.pad(text), Answer.MARK_MEDIA, mark_id=mark_id)

    def buffering(self) -> Message:
        if self.rng.random() < 0.5:
            return _text(self.pad(self.command("START_MEDIA_BUFFERING")), Answer.NOTHING)
        mark_id = self.new_id()
        return _text(
            self.pad(self.command("STOP_MEDIA_BUFFERING", "correlation_id", mark_id)),
            Answer.BUFFERING,
            mark_id=mark_id,
        )

    def status(self) -> Message:
        if self.fmt is ControlFormat.PLAIN and self.rng.random() < 0.2:
            return _text(f"GET_STATUS {self.junk(5)}", Answer.STATUS)
        return _text(self.pad(self.command("GET_STATUS")), Answer.STATUS)

    def progress(self) -> Message:
        good: list[object] = [0, 20, 21, 100, 1000, 60000]
        bad: list[object] = [5, 19, 60001, -20, 4294967316]
        if self.fmt is ControlFormat.PLAIN:
            bad += ["abc", "20x", "", "1e3", "99999999999"]
        else:
            bad += ["100", 20.0, True, None, [20], 1e3]
        if self.rng.random() < 0.5:
            value = self.rng.choice(good)
            return _text(self.command("REPORT_PROGRESS", "interval_ms", value), Answer.NOTHING)
        value = self.rng.choice(bad)
        if self.fmt is ControlFormat.PLAIN and value == "":
            return _text("REPORT_PROGRESS", Answer.ERROR, error="interval_ms")
        text = self.command("REPORT_PROGRESS", "interval_ms", value)
        if self.fmt is ControlFormat.JSON and value is None:
            text = json.dumps({"command": "REPORT_PROGRESS"})
        return _text(text, Answer.ERROR, error="interval_ms")

    def simple(self) -> Message:
        name = self.rng.choice(
            ["ANSWER", "PAUSE_MEDIA", "CONTINUE_MEDIA", "REPORT_QUEUE_DRAINED", "CONTINUE_MEDIA"]
        )
        return _text(self.pad(self.command(name)), Answer.NOTHING)

    def flush(self) -> Message:
        return _text(self.pad(self.command("FLUSH_MEDIA")), Answer.FLUSHED)

    def place(self, msg: Message) -> Sent:
        """Record *msg* as sent now: where it stands in the media."""
        sent = Sent(msg, self.window, self.bytes_in_window)
        if msg.binary:
            self.sent_bytes += len(msg.data)
            self.bytes_in_window += len(msg.data)
        elif msg.answer is Answer.FLUSHED:
            self.window += 1
            self.bytes_in_window = 0
            self.marks_in_window = 0
        return sent

    def unknown(self) -> Message:
        """A command nobody knows, named safely in the ERROR."""
        name = self.rng.choice(
            [
                self.rng.choice(COMMANDS).lower(),
                self.rng.choice(COMMANDS) + "_",
                self.rng.choice(COMMANDS)[:-1],
                self.junk(self.rng.randint(1, 40)),
                "",
            ]
        )
        if self.fmt is ControlFormat.PLAIN:
            name = name.replace(" ", "").strip(BLANKS)
            text = f"{name} {self.junk(4)}" if self.rng.random() < 0.3 else name
            text = text or "   "  # only white space: the command is empty
            if CONTROL.search(text.strip(BLANKS)):
                return self.unknown()
        else:
            text = json.dumps({"command": name}, ensure_ascii=self.rng.random() < 0.5)
        if len(text.encode()) > TEXT_MAX:
            return _text(text, Answer.ERROR, error="exceeds maximum length")
        return _text(text, Answer.ERROR, error="unknown command")

    def broken_text(self) -> Message:
        """Text refused before its command is read: empty, too long, NUL, not UTF-8,
        a control character (plain text)."""
        valid = self.command("GET_STATUS").encode()
        choice = self.rng.randrange(6)
        if choice == 0:
            data = b""
        elif choice == 1:
            data = valid + b" " * (TEXT_MAX - len(valid) + self.rng.randint(1, 200))
        elif choice == 2:
            cut = self.rng.randint(0, len(valid))
            data = valid[:cut] + b"\0" + valid[cut:]
        elif choice == 3:
            cut = self.rng.randint(0, len(valid))
            data = valid[:cut] + self.bad_bytes() + valid[cut:]
        elif choice == 4:
            data = ("MARK_MEDIA " + self.new_id(8)).encode() + self.bad_bytes()
        else:
            control = bytes([self.rng.choice([1, 7, 8, 0x1B, 0x7F, 9, 10, 13])])
            data = self.command("MARK_MEDIA", "correlation_id", "a").encode()
            cut = self.rng.randint(1, len(data) - 1)
            data = data[:cut] + control + data[cut:]
        why = refusal(data, self.fmt)
        if why is None:
            # A control character in JSON: jansson refuses it in a string, and
            # white space is white space between tokens.
            return self.json_verdict(data)
        return _text(data, Answer.ERROR, error=why)

    def json_verdict(self, data: bytes) -> Message:
        """What a JSON text message that passed the checks of every message gets."""
        try:
            obj = json.loads(data.decode())
        except ValueError:
            return _text(data, Answer.ERROR, error="unable to parse")
        if not isinstance(obj, dict | list):
            # jansson takes only an object or an array at the top
            return _text(data, Answer.ERROR, error="unable to parse")
        return self.json_command(data, obj)

    def json_command(self, data: bytes, obj: object) -> Message:
        """The answer to parsed JSON, as handle_command() gives it."""
        if not isinstance(obj, dict) or not isinstance(obj.get("command"), str):
            return _text(data, Answer.ERROR, error="no 'command' string")
        name = obj["command"]
        if name == "GET_STATUS":
            return _text(data, Answer.STATUS)
        if name == "MARK_MEDIA":
            cid = obj.get("correlation_id")
            return _text(data, Answer.MARK_MEDIA, mark_id=cid if isinstance(cid, str) else "")
        if name not in COMMANDS:
            return _text(data, Answer.ERROR, error="unknown command")
        raise ValueError(f"no verdict for {data!r}")  # the grammar does not make these

    def bad_mark(self) -> Message:
        """MARK with an id it refuses."""
        if self.fmt is ControlFormat.PLAIN:
            case = self.rng.choice(
                [
                    ("MARK", "id is required"),
                    ("MARK id=", "id is required"),
                    ("MARK " + "x" * (MARK_ID_MAX + self.rng.randint(1, 20)), "longer than 64"),
                    (f"MARK {self.new_id(6)} {self.new_id(6)}", "visible ASCII"),
                    (f"MARK {self.new_id(4)}{self.junk(3)}", "visible ASCII"),
                ]
            )
            text, error = case
            if "visible ASCII" in error and visible_ascii(text[5:]):
                return self.bad_mark()
            if len(text.encode()) > TEXT_MAX:
                return _text(text, Answer.ERROR, error="exceeds maximum length")
            return _text(self.pad(text), Answer.ERROR, error=error)
        value: object = self.rng.choice(
            [
                None,
                "",
                7,
                1.5,
                True,
                [1],
                {"a": 1},
                "x" * (MARK_ID_MAX + 3),
                "a b",
                "tab\there",
                "caf\u00e9",
                "nl\n",
            ]
        )
        obj: dict[str, object] = {"command": "MARK"}
        if value is not None or self.rng.random() < 0.5:
            obj["id"] = value
        if "id" not in obj or value == "":
            error = "id is required"
        elif not isinstance(value, str):
            error = "must be a string"
        elif len(value) > MARK_ID_MAX:
            error = "longer than 64"
        else:
            error = "visible ASCII"
        return _text(
            json.dumps(obj, ensure_ascii=self.rng.random() < 0.5), Answer.ERROR, error=error
        )

    def bad_json(self) -> Message:
        """JSON of every wrong shape."""
        cases: list[tuple[str | bytes, str]] = [
            ('{"command":"MARK", id:1', "unable to parse"),
            ('{"command":"GET_STATUS"} x', "unable to parse"),
            ("{'command':'GET_STATUS'}", "unable to parse"),
            ('{"command":"MARK","id":"\\u0000"}', "unable to parse"),
            ('{"command":"MARK","id":NaN}', "unable to parse"),
            ('{"command":"GET_STATUS",}', "unable to parse"),
            ("[" * 40 + "]" * 40, "no 'command' string"),
            ('["GET_STATUS"]', "no 'command' string"),
            # jansson takes only an object or an array at the top
            ('"GET_STATUS"', "unable to parse"),
            ("42", "unable to parse"),
            ("null", "unable to parse"),
            ('{"command":7}', "no 'command' string"),
            ('{"command":null}', "no 'command' string"),
            ('{"command":["GET_STATUS"]}', "no 'command' string"),
            ('{"Command":"GET_STATUS"}', "no 'command' string"),
            ("{}", "no 'command' string"),
        ]
        data, error = self.rng.choice(cases)
        return _text(data, Answer.ERROR, error=error)

    def direction(self) -> Message:
        """SET_MEDIA_DIRECTION, but never "in" (the session would lose its timer)."""
        value: object = self.rng.choice(["both", "out", "sideways", "", 3, None, "IN"])
        if value in ("both", "out"):
            return _text(self.command("SET_MEDIA_DIRECTION", "direction", value), Answer.NOTHING)
        obj: dict[str, object] = {"command": "SET_MEDIA_DIRECTION"}
        if value is not None:
            obj["direction"] = value
        error = "not a valid direction" if isinstance(value, str) else "requires a 'direction'"
        return _text(json.dumps(obj), Answer.ERROR, error=error)

    def plain_direction(self) -> Message:
        return _text("SET_MEDIA_DIRECTION in", Answer.ERROR, error="only supports JSON")


# --- the oracle ---------------------------------------------------------------------------


@dataclass
class Sent:
    """A message as sent: where it stood in the session's media."""

    message: Message
    #: Flushes sent before it.
    window: int
    #: Media bytes (μ-law: samples) sent since the last flush.
    since: int


@dataclass
class Oracle:
    """Checks a session's events against what its messages were promised.

    Positions count the media accepted on the channel: a flush discards what
    was not played, so after the k-th flush they start again from what its
    MEDIA_FLUSHED says was played (to the millisecond, so a position is known
    to within one millisecond there, and exactly before the first flush).
    """

    fmt: ControlFormat
    sent: list[Sent] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: played_ms of the k-th MEDIA_FLUSHED, from k = 1.
    flush_played: dict[int, int] = field(default_factory=dict)

    def fail(self, text: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(text)

    def check(self, events: Sequence[Event], texts: Sequence[str]) -> None:
        self.check_frames(texts)
        self.check_immediate(events)
        self.check_marks(events)
        self.check_progress(events)

    def accepted_ms(self, s: Sent) -> tuple[int, int] | None:
        """The range in ms of the media accepted before *s*; None if unknown."""
        if s.window == 0:
            return s.since // audio.BYTES_PER_MS, s.since // audio.BYTES_PER_MS
        base = self.flush_played.get(s.window)
        if base is None:
            return None
        return base + s.since // audio.BYTES_PER_MS, base + (s.since + 7) // audio.BYTES_PER_MS

    def check_frames(self, texts: Sequence[str]) -> None:
        if self.fmt is ControlFormat.PLAIN:
            for text in texts:
                if CONTROL.search(text):
                    self.fail(f"a plain-text event with a control character: {text!r}")

    def check_immediate(self, events: Sequence[Event]) -> None:
        """The immediate answers, in order, one per message that calls for one."""
        expected = [s for s in self.sent if s.message.answer in IMMEDIATE]
        got = [e for e in events if e.name in IMMEDIATE.values()]
        for i, (want, event) in enumerate(zip(expected, got, strict=False)):
            msg = want.message
            if event.name != IMMEDIATE[msg.answer]:
                self.fail(f"answer {i}: {event.raw[:120]!r} for {msg.describe()}")
                return  # out of step: the rest would only repeat it
            if msg.answer is Answer.ERROR:
                text = event.get_str("error_text")
                if msg.error.lower() not in text.lower():
                    self.fail(f"ERROR {text!r} for {msg.describe()}, expected {msg.error!r}")
            elif msg.answer is Answer.STATUS:
                self.check_sum(event, "queued_ms", want)
            else:
                self.check_sum(event, "discarded_ms", want)
                self.flush_played[want.window + 1] = event.get_int("played_ms")
        if len(got) != len(expected):
            self.fail(
                f"{len(got)} immediate answers for {len(expected)} messages that call for one"
            )

    def check_sum(self, event: Event, other: str, s: Sent) -> None:
        """played + queued (or discarded) is the media accepted before, to the ms
        (each is rounded down on its own, so the sum may be one less)."""
        span = self.accepted_ms(s)
        if span is None:
            return
        total = event.get_int("played_ms") + event.get_int(other)
        if not span[0] - 1 <= total <= span[1]:
            self.fail(f"{event.raw[:120]!r}: played + {other} = {total}, accepted {span} ms")

    def check_marks(self, events: Sequence[Event]) -> None:
        """Every mark answered exactly once, at the media before it (mark
        positions mode: the fuzzer's session opts in before its first message)."""
        answers: Counter[tuple[str, str]] = Counter()
        played: dict[str, Event] = {}
        for event in events:
            if event.name in MARK_ANSWERS:
                answers[("mark", event.mark_id or "")] += 1
                if event.name in MARK_REACHED_EVENTS:
                    played[event.mark_id or ""] = event
            elif event.name == "MEDIA_BUFFERING_COMPLETED":
                answers[("buffering", event.mark_id or "")] += 1
        wanted: Counter[tuple[str, str]] = Counter()
        for s in self.sent:
            msg = s.message
            if msg.answer in (Answer.MARK, Answer.MARK_MEDIA):
                wanted[("mark", msg.mark_id)] += 1
            elif msg.answer is Answer.BUFFERING:
                wanted[("buffering", msg.mark_id)] += 0
        for s in self.sent:
            msg = s.message
            # Only an id placed once names one answer (a MARK_MEDIA without an
            # id shares "" with every other one).
            if (
                msg.answer in (Answer.MARK, Answer.MARK_MEDIA)
                and msg.mark_id in played
                and wanted[("mark", msg.mark_id)] == 1
            ):
                event = played[msg.mark_id]
                span = self.accepted_ms(s)
                if span is not None and not span[0] <= event.get_int("played_ms") <= span[1]:
                    self.fail(f"{event.raw[:100]!r}: the media before the mark was {span} ms")
        for key, count in answers.items():
            if key not in wanted:
                self.fail(f"an answer for a mark never placed: {key}")
            elif key[0] == "buffering" and count > 1:
                self.fail(f"MEDIA_BUFFERING_COMPLETED {key[1]!r} {count} times")
        for key, count in wanted.items():
            if key[0] == "mark" and answers[key] != count:
                self.fail(f"mark {key[1]!r}: answered {answers[key]} times, placed {count}")

    def check_progress(self, events: Sequence[Event]) -> None:
        """MEDIA_PROGRESS never goes back."""
        last = -1
        for event in events:
            if event.name == "MEDIA_PROGRESS":
                played = event.get_int("played_ms")
                if played < last:
                    self.fail(f"{event.raw!r} after played_ms:{last}")
                last = played


# --- a run --------------------------------------------------------------------------------


@dataclass
class FuzzReport:
    fmt: ControlFormat
    messages: int
    seed: int
    seconds: float
    counts: Counter[str]
    answers: Counter[str]
    failures: list[str]
    #: The final mark's MARK_PLAYED, if it came.
    final_mark: Event | None = None
    #: When the bot sent the final MARK (wall clock).
    final_mark_sent: float | None = None
    #: Its arrival minus when it was due, once known: the RTP departure of the
    #: frame before it, or the MARK's sending if its audio had all been played
    #: by then (a MARK on an empty queue is answered at once).
    final_mark_error_ms: float | None = None
    #: The MARK was sent after its audio had played (the bot was that slow).
    final_mark_late_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failures

    def timing(self, packets: Sequence[RtpPacket]) -> None:
        """Time the final mark against the RTP sent to the caller."""
        if self.final_mark is None:
            return
        index = FINAL_FRAMES + FINAL_COUNT - 1
        last = [p for p in packets if audio.frame_index(p.payload) == index]
        if not last:
            self.failures.append("the final frames never reached the caller")
            return
        due = last[-1].t
        if self.final_mark_sent is not None and self.final_mark_sent > due:
            self.final_mark_late_ms = (self.final_mark_sent - due) * 1000
            due = self.final_mark_sent
        self.final_mark_error_ms = (self.final_mark.t - due) * 1000

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.answers.items()))
        final = (
            "no final mark"
            if self.final_mark_error_ms is None
            else f"final mark {self.final_mark_error_ms:+.2f} ms from its RTP"
            + (
                f" (its MARK was sent {self.final_mark_late_ms:.0f} ms after that RTP: "
                "measured from the sending)"
                if self.final_mark_late_ms
                else ""
            )
        )
        verdict = "OK" if self.ok else f"{len(self.failures)} FAILURES"
        return (
            f"{self.fmt.value}: {self.messages} messages (seed {self.seed}) in "
            f"{self.seconds:.1f} s; sent: {kinds}; {final}; {verdict}"
        )


async def run(
    session: BotSession,
    fmt: ControlFormat,
    count: int,
    seed: int,
    *,
    progress: Callable[[str], None] | None = None,
) -> FuzzReport:
    """Send *count* fuzzed messages on *session*, then check every answer."""
    rng = random.Random(seed)
    grammar = Grammar(fmt, rng)
    oracle = Oracle(fmt)
    t0 = time.monotonic()
    # Mark positions mode: every bad input gets an ERROR, every mark a position.
    await session.command("REPORT_MARK_POSITIONS")
    counts: Counter[str] = Counter()
    answers: Counter[str] = Counter()
    pending = _Pending(session)
    for i in range(count):
        msg = grammar.message()
        oracle.sent.append(grammar.place(msg))
        counts["binary" if msg.binary else "text"] += 1
        answers[msg.answer.value] += 1
        if msg.binary:
            await session.send_audio(msg.data)
        else:
            await session.send_raw_text(msg.data)
        if session.closed.is_set():
            oracle.fail(f"the connection closed (code {session.close_code}) at message {i}")
            break
        if msg.answer in IMMEDIATE:
            pending.expected += 1
        if i % 50 == 49 and not await pending.catch_up(AHEAD):
            oracle.fail(f"Asterisk stopped answering at message {i}: {session.summary()}")
            break
        if progress is not None and (i + 1) % 10_000 == 0:
            progress(f"{fmt.value}: {i + 1} of {count} messages sent")
    # The end: flush what is left, then a mark after whole tagged frames.
    final = grammar.flush()
    oracle.sent.append(grammar.place(final))
    await session.send_raw_text(final.data)
    mark, mark_sent = await final_mark(session, grammar, oracle)
    await asyncio.sleep(0.2)
    oracle.check(session.events, session.texts)
    if session.protocol_errors:
        oracle.fail(f"events the harness could not parse: {session.protocol_errors[:3]}")
    report = FuzzReport(
        fmt=fmt,
        messages=count,
        seed=seed,
        seconds=time.monotonic() - t0,
        counts=counts,
        answers=answers,
        failures=oracle.failures,
        final_mark=mark,
        final_mark_sent=mark_sent,
    )
    log.info("fuzz: %s", report.summary())
    return report


#: How many immediate answers the fuzzer may be ahead of Asterisk.
AHEAD = 200


@dataclass
class _Pending:
    """How far Asterisk's immediate answers lag behind the messages that call for them."""

    session: BotSession
    expected: int = 0
    received: int = 0
    _seen: int = 0

    async def catch_up(self, slack: int) -> bool:
        """Wait (letting the bot read) until at most *slack* answers are missing;
        False if Asterisk stops answering for 20 time units."""
        deadline = time.monotonic() + units(20)
        while True:
            events = self.session.events
            self.received += sum(1 for e in events[self._seen :] if e.name in IMMEDIATE.values())
            self._seen = len(events)
            if self.received >= self.expected - slack:
                return True
            if time.monotonic() > deadline or self.session.closed.is_set():
                return False
            await asyncio.sleep(0.002)


async def final_mark(
    session: BotSession, grammar: Grammar, oracle: Oracle
) -> tuple[Event | None, float | None]:
    """After everything: tagged frames and a mark; its MARK_PLAYED, if it came,
    and when the MARK was sent."""
    flushes = grammar.window
    try:
        await session.wait_for(
            "MEDIA_FLUSHED", lambda e: len(session.named("MEDIA_FLUSHED")) >= flushes
        )
    except BotError as exc:
        oracle.fail(f"the last flush was not answered: {exc}")
        return None, None
    await session.command("CONTINUE_MEDIA")
    frames = Message(audio.tagged_frames(FINAL_FRAMES, FINAL_COUNT), True, Answer.NOTHING)
    oracle.sent.append(grammar.place(frames))
    await session.send_audio(frames.data)
    mark = Message(b"", False, Answer.MARK, mark_id=f"final-{grammar.serial}")
    oracle.sent.append(grammar.place(mark))
    await session.command("MARK", mark.mark_id)
    sent = time.time()
    try:
        return await session.wait_mark(mark.mark_id, names=("MARK_PLAYED",)), sent
    except BotError as exc:
        oracle.fail(f"the final mark was not played: {exc}")
        return None, sent
