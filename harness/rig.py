"""A rig: one Asterisk, the bot server and the SIP phone, and calls through them.

``Rig.call()`` places a real SIP call to the extension that dials the bot,
waits for the bot's WebSocket session and the caller's media, starts the RTP
capture of what Asterisk sends to the caller and yields a :class:`LiveCall`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.asterisk import Asterisk
from harness.bot import BotError, BotServer, BotSession
from harness.caller import CallerError, CallHandle, Phone, SipPhone
from harness.capture import RtpCapture, RtpPacket
from harness.config import BOT_EXTENSION, OPTIONS_HEADER
from harness.events import ControlFormat
from harness.ports import LOOPBACK
from harness.service import Service

log = logging.getLogger(__name__)


@dataclass
class LiveCall:
    """One call in progress: the bot's session, the SIP call and the capture."""

    tag: str
    session: BotSession
    sip: CallHandle
    capture: RtpCapture | None
    started: float = field(default_factory=time.time)
    packets: list[RtpPacket] = field(default_factory=list)

    async def stop_capture(self) -> list[RtpPacket]:
        """Stop the capture (if any) and return the RTP sent to the caller."""
        if self.capture is not None:
            self.packets = await self.capture.stop()
        return self.packets


class Rig(Service):
    """Asterisk + bot server + SIP phone; an async context manager."""

    def __init__(
        self,
        install: Path,
        workdir: Path,
        *,
        phone: Phone | None = None,
        name: str = "asterisk",
    ) -> None:
        self.install = install
        self.workdir = workdir
        self.name = name
        self.bot = BotServer()
        self.asterisk: Asterisk | None = None
        self._own_phone: SipPhone | None = None
        if phone is None:
            self._own_phone = SipPhone(workdir / "pjsua2")
        self.phone: Phone = phone or self._own_phone  # type: ignore[assignment]
        # Calls are set up one at a time: Asterisk 22.10.1 stores a call's v()
        # URI parameters on the shared websocket_client object just before it
        # connects, so concurrent Dial()s can connect with each other's
        # parameters (res_websocket_client.c, ast_websocket_client_add_uri_params).
        self._setup = asyncio.Lock()

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.bot.start()
        self.asterisk = Asterisk(self.install, self.bot.uri, name=self.name)
        await self.asterisk.start()
        if self._own_phone is not None:
            await self._own_phone.start()

    async def stop(self) -> None:
        try:
            if self._own_phone is not None:
                await self._own_phone.stop()
            if self.asterisk is not None:
                await self.asterisk.stop()
        finally:
            await self.bot.stop()

    def describe_logs(self) -> str:
        parts = []
        if self.asterisk is not None:
            parts.append(self.asterisk.describe_logs())
        return "\n".join(parts)

    @contextlib.asynccontextmanager
    async def call(
        self,
        *,
        control_format: ControlFormat = ControlFormat.PLAIN,
        options: str = "",
        codec: str = "ulaw",
        capture: bool = True,
        pcap: Path | None = None,
        record: Path | None = None,
    ) -> AsyncIterator[LiveCall]:
        """Place a call into the bot and yield it once media flows."""
        assert self.asterisk is not None, "rig not started"
        tag = uuid.uuid4().hex[:12]
        dial_options = f"c({codec}){control_format.dial_option}v(call={tag}){options}"
        uri = f"sip:{BOT_EXTENSION}@{LOOPBACK}:{self.asterisk.sip_port}"
        log.info("rig: call %s -> %s with WebSocket options %s", tag, uri, dial_options)
        async with self._setup:
            sip = await self.phone.call(
                uri, tag=tag, headers={OPTIONS_HEADER: dial_options}, record_to=record
            )
            try:
                session = await self._accept(tag, sip)
            except BaseException:
                with contextlib.suppress(Exception):
                    await sip.hangup()
                raise
        live: LiveCall | None = None
        try:
            await sip.wait_media()
            cap = None
            if capture:
                assert sip.record.local_rtp is not None
                cap = RtpCapture.to_port(sip.record.local_rtp[1], pcap=pcap)
                await cap.start()
            live = LiveCall(tag=tag, session=session, sip=sip, capture=cap)
            yield live
        finally:
            if live is not None:
                await live.stop_capture()
            with contextlib.suppress(Exception):
                await sip.hangup()
            with contextlib.suppress(Exception):
                await sip.wait_disconnected()

    async def _accept(self, tag: str, sip: CallHandle) -> BotSession:
        """The bot's session for the call, unless the SIP call ends first."""
        accept = asyncio.ensure_future(self.bot.accept(tag))
        waiters: set[asyncio.Future[Any]] = {accept, sip.disconnected}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if accept.done():
            return accept.result()
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError, BotError):
            await accept
        reason = f"SIP {sip.record.last_status} {sip.record.last_reason}".strip()
        raise CallerError(f"call {tag} ended before the bot was connected ({reason})")
