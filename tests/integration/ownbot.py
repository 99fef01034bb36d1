"""Calls to a bot that owns its WebSocket server, as a bot author's does.

The rig's own bot server (:class:`harness.bot.BotServer`) records everything;
the library's tests and the examples instead run a bot written against the
public API only (a ``websockets`` server, :class:`astmarks.MediaSession`),
in the test's process or as a program of its own. :func:`asterisk_for`
starts an Asterisk whose ``bot`` extension dials that bot's URI, and
:func:`call` places a real SIP call to it and captures the RTP the caller
gets.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from harness.asterisk import Asterisk
from harness.caller import SipCall, SipPhone
from harness.capture import RtpCapture, RtpPacket
from harness.config import BOT_EXTENSION, OPTIONS_HEADER
from harness.ports import LOOPBACK

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def asterisk_for(
    install: Path, bot_uri: str, name: str, failed: list[str] | None = None
) -> AsyncIterator[Asterisk]:
    """An Asterisk that dials *bot_uri* for extension ``bot``; its log is
    printed if the block raises."""
    asterisk = Asterisk(install, bot_uri, name=name)
    await asterisk.start()
    try:
        yield asterisk
    except BaseException:
        print(asterisk.describe_logs())  # noqa: T201 - shown in the failure report
        raise
    finally:
        await asterisk.stop()


@dataclass
class Call:
    sip: SipCall
    tag: str
    packets: list[RtpPacket] = field(default_factory=list)


@contextlib.asynccontextmanager
async def call(
    asterisk: Asterisk, phone: SipPhone, options: str = "c(ulaw)"
) -> AsyncIterator[Call]:
    """A call to the bot with chan_websocket dial *options*; the RTP the
    caller got is in ``packets`` once the block ends.

    The capture starts before the call (the bot may stream the moment it is
    connected): every packet from Asterisk's RTP ports, but to them.
    """
    tag = uuid.uuid4().hex[:12]
    uri = f"sip:{BOT_EXTENSION}@{LOOPBACK}:{asterisk.sip_port}"
    ports = f"{asterisk.settings.rtp_start}-{asterisk.settings.rtp_end}"
    async with RtpCapture(
        f"udp and src portrange {ports} and not dst portrange {ports}"
    ) as capture:
        sip = await phone.call(uri, tag=tag, headers={OPTIONS_HEADER: f"{options}v(call={tag})"})
        result = Call(sip, tag)
        try:
            await sip.wait_media()
            yield result
        finally:
            with contextlib.suppress(Exception):
                await sip.hangup()
    result.packets = capture.packets
