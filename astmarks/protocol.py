"""chan_websocket's control protocol: events in, commands out, in both formats.

Asterisk speaks either *plain-text* (``NAME key:value key:value``) or *JSON*
(``{"event": "NAME", ...}``) on a channel; the format is chosen by the dial
string's ``f()`` option or ``chan_websocket.conf``. Both parse to the same
:class:`Event`.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

# Plain-text events that carry one bare value instead of key:value pairs.
_POSITIONAL_KEY = {
    "MEDIA_MARK_PROCESSED": "correlation_id",
    "MEDIA_BUFFERING_COMPLETED": "correlation_id",
}
# Keys whose value runs to the end of the line: free text, and mark ids, which
# the patched driver puts last because a MARK_MEDIA id may contain spaces.
_REST_OF_LINE_KEYS = frozenset({"error_text", "id", "correlation_id"})
_KEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*):(.*)$")

#: The events that say a mark's audio was handed to the call: ``MARK_MEDIA``'s
#: (with positions in mark positions mode) and ``MARK``'s.
MARK_REACHED_EVENTS = ("MEDIA_MARK_PROCESSED", "MARK_PLAYED")
#: The events that say a flush or the hangup discarded a mark's audio.
MARK_CLEARED_EVENTS = ("MEDIA_MARK_CLEARED", "MARK_CLEARED")

# How each command's argument is named in the JSON format.
COMMAND_ARGUMENT_KEYS: dict[str, str] = {
    "MARK": "id",
    "MARK_MEDIA": "correlation_id",
    "STOP_MEDIA_BUFFERING": "correlation_id",
    "REPORT_PROGRESS": "interval_ms",
    "SET_MEDIA_DIRECTION": "direction",
}


class ProtocolError(ValueError):
    """A control message that is not a valid chan_websocket event."""


class ControlFormat(enum.StrEnum):
    """The two control message formats of chan_websocket."""

    PLAIN = "plain-text"
    JSON = "json"

    @property
    def dial_option(self) -> str:
        """The dial-string option that selects this format."""
        return f"f({self.value})"


@dataclass(frozen=True)
class Event:
    """One control event received from Asterisk.

    ``fields`` holds every key but ``event``; values are what the wire carried
    (strings in plain-text, JSON types in JSON). ``t`` is the wall-clock
    arrival time (``time.time()``, the clock of packet captures), ``mono``
    the monotonic one.
    """

    name: str
    fields: dict[str, Any]
    raw: str
    format: ControlFormat
    t: float = 0.0
    mono: float = 0.0
    index: int = field(default=-1, compare=False)

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def get_str(self, key: str) -> str:
        """A field as a string; KeyError if absent."""
        value = self.fields[key]
        return value if isinstance(value, str) else json.dumps(value)

    def get_int(self, key: str) -> int:
        """A field as an integer; KeyError if absent, ProtocolError if not a number."""
        value = self.fields[key]
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int):
            return value
        try:
            return int(str(value))
        except ValueError as exc:
            raise ProtocolError(f"{self.name}: {key}={value!r} is not an integer") from exc

    def get_bool(self, key: str) -> bool:
        value = self.fields[key]
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("true", "yes", "1"):
            return True
        if text in ("false", "no", "0"):
            return False
        raise ProtocolError(f"{self.name}: {key}={value!r} is not a boolean")

    @property
    def mark_id(self) -> str | None:
        """The mark id of a mark event, whichever generation of the protocol."""
        for key in ("id", "correlation_id"):
            if key in self.fields:
                return self.get_str(key)
        return None


def parse_event(text: str, *, t: float = 0.0, mono: float = 0.0) -> Event:
    """Parse one TEXT message from Asterisk, in either format."""
    stripped = text.strip()
    if not stripped:
        raise ProtocolError("empty control message")
    if stripped.startswith("{"):
        return _parse_json(stripped, t, mono)
    return _parse_plain(stripped, t, mono)


def _parse_json(text: str, t: float, mono: float) -> Event:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON event: {exc.msg} in {text[:80]!r}") from exc
    if not isinstance(obj, dict):
        raise ProtocolError(f"JSON event is not an object: {text[:80]!r}")
    name = obj.pop("event", None)
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"JSON event without an 'event' name: {text[:80]!r}")
    return Event(name=name, fields=obj, raw=text, format=ControlFormat.JSON, t=t, mono=mono)


def _parse_plain(text: str, t: float, mono: float) -> Event:
    name, _, rest = text.partition(" ")
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
        raise ProtocolError(f"not a plain-text event: {text[:80]!r}")
    fields: dict[str, Any] = {}
    if name in _POSITIONAL_KEY and rest and not _KEY_RE.match(rest):
        # Upstream prints the app's id as it is, spaces and all.
        fields[_POSITIONAL_KEY[name]] = rest
        return Event(name=name, fields=fields, raw=text, format=ControlFormat.PLAIN, t=t, mono=mono)
    tokens = rest.split(" ") if rest else []
    key: str | None = None
    i = 0
    while i < len(tokens):
        token = tokens[i]
        match = _KEY_RE.match(token)
        if match and match.group(1) in _REST_OF_LINE_KEYS:
            fields[match.group(1)] = " ".join([match.group(2), *tokens[i + 1 :]])
            break
        if match:
            key = match.group(1)
            fields[key] = match.group(2)
        elif key is None and name in _POSITIONAL_KEY and _POSITIONAL_KEY[name] not in fields:
            fields[_POSITIONAL_KEY[name]] = token
        elif key is not None:
            fields[key] = f"{fields[key]} {token}"
        else:
            raise ProtocolError(f"{name}: unexpected token {token!r} in {text[:80]!r}")
        i += 1
    return Event(name=name, fields=fields, raw=text, format=ControlFormat.PLAIN, t=t, mono=mono)


def format_command(
    fmt: ControlFormat, command: str, argument: str | int | None = None, **extra: Any
) -> str:
    """Render a command in *fmt*.

    Plain-text: ``COMMAND argument``. JSON: ``{"command": COMMAND, key: argument}``
    where key comes from :data:`COMMAND_ARGUMENT_KEYS`; *extra* adds JSON keys
    (plain-text has no place for them and rejects them).
    """
    if fmt is ControlFormat.JSON:
        obj: dict[str, Any] = {"command": command}
        if argument is not None:
            key = COMMAND_ARGUMENT_KEYS.get(command)
            if key is None:
                raise ValueError(f"{command} takes no argument")
            obj[key] = argument
        obj.update(extra)
        return json.dumps(obj, separators=(",", ":"))
    if extra:
        raise ValueError(f"plain-text commands have no named fields: {sorted(extra)}")
    return command if argument is None else f"{command} {argument}"
