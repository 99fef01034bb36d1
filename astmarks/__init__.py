"""Exact playback acknowledgment for bots on Asterisk's chan_websocket.

A bot that streams speech into a call over chan_websocket wraps its WebSocket
in a :class:`MediaSession`: it places marks and awaits their results (played,
with the position, or cleared by a flush), flushes on barge-in and learns how
much the caller heard, and reads the caller's audio. :class:`Pacer` streams a
response from a TTS engine, keeping a little audio queued in Asterisk, paced
by the marks.

Modules: :mod:`astmarks.session` (the session and what it returns),
:mod:`astmarks.server` (a server for Asterisk to dial, a session per call),
:mod:`astmarks.pacer` (pacing a streamed response), :mod:`astmarks.protocol`
(parsing events, formatting commands), :mod:`astmarks.transport` (the
WebSocket under a session: ``websockets``, Starlette/FastAPI, aiohttp, or a
transport of the bot's own).

The protocol itself (events and commands, plain-text and JSON) is in
:mod:`astmarks.protocol`. The only dependency is ``websockets``.
"""

from astmarks import pacer, protocol, server, session, transport
from astmarks.pacer import Pacer, PacingResult
from astmarks.protocol import ControlFormat, Event, ProtocolError, format_command, parse_event
from astmarks.server import serve
from astmarks.session import (
    Capabilities,
    DriverError,
    Flushed,
    Mark,
    MarkCleared,
    MarkPlayed,
    MarkResult,
    MediaSession,
    MediaSessionError,
    MediaTimeout,
    Position,
    SessionClosed,
    Status,
)
from astmarks.transport import Transport, TransportClosed

__version__ = "0.2.0"

__all__ = [
    "Capabilities",
    "ControlFormat",
    "DriverError",
    "Event",
    "Flushed",
    "Mark",
    "MarkCleared",
    "MarkPlayed",
    "MarkResult",
    "MediaSession",
    "MediaSessionError",
    "MediaTimeout",
    "Pacer",
    "PacingResult",
    "Position",
    "ProtocolError",
    "SessionClosed",
    "Status",
    "Transport",
    "TransportClosed",
    "format_command",
    "pacer",
    "parse_event",
    "protocol",
    "serve",
    "server",
    "session",
    "transport",
]
