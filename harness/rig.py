"""A rig: one Asterisk, the bot server and the SIP phone, and calls through them.

``Rig.call()`` places a real SIP call to the extension that dials the bot,
waits for the bot's WebSocket session and the caller's media, starts the RTP
capture of what Asterisk sends to the caller and yields a :class:`LiveCall`.
Its *topology* (:mod:`harness.topology`) chooses how the call reaches the bot:
``Dial`` or an ARI app's externalMedia, Asterisk connecting out or the bot
connecting in, a two-party or a mixing bridge. A rig made with ``ari=True``
runs its Asterisk with ARI, and the ARI app that topologies other than
``dial`` need.

Normally the rig starts an Asterisk of its own on loopback. Given
:class:`Services` (``HARNESS_ASTERISK_HOST`` and friends, as docker compose
sets them) it uses an Asterisk that runs elsewhere, configured by
:mod:`harness.serve`, whose ``harness`` extension dials this rig's bot.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astmarks.protocol import ControlFormat
from harness.ari import Ari, AriError, BridgedCall, ExternalMediaApp, MediaPlan
from harness.asterisk import Asterisk, AsteriskError, tail
from harness.bot import BotError, BotServer, BotSession
from harness.caller import CallerError, CallHandle, Phone, SipPhone
from harness.capture import RtpCapture, RtpPacket
from harness.config import (
    ARI_EXTENSION,
    BOT_CONNECTION,
    BOT_EXTENSION,
    CALL_HEADER,
    INCOMING_EVENT,
    INCOMING_EXTENSION,
    OPTIONS_HEADER,
)
from harness.ports import LOOPBACK, parse_host_port, source_address
from harness.service import Service
from harness.topology import DIAL, Creation, Topology

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Services:
    """An Asterisk that runs elsewhere, and where this rig's bot must listen for it."""

    asterisk_host: str
    sip_port: int = 5060
    #: The extension that dials this rig's bot (``HARNESS_BOT_URI`` there).
    extension: str = "harness"
    bot_host: str = "0.0.0.0"
    bot_port: int = 8765
    #: Asterisk's log directory, if shared with this host (for failure reports).
    logs: Path | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Services | None:
        """The services named by ``HARNESS_ASTERISK_HOST`` & co.; None if unset."""
        host = environ.get("HARNESS_ASTERISK_HOST")
        if not host:
            return None
        listen = environ.get("HARNESS_BOT_LISTEN", "0.0.0.0:8765")
        sip_port = environ.get("HARNESS_ASTERISK_SIP_PORT", "5060")
        try:
            bot_host, bot_port = parse_host_port(listen)
            _, port = parse_host_port(f"{host}:{sip_port}")
        except ValueError as exc:
            raise AsteriskError(f"HARNESS_BOT_LISTEN / HARNESS_ASTERISK_SIP_PORT: {exc}") from None
        logs = environ.get("HARNESS_ASTERISK_LOGS")
        return cls(
            asterisk_host=host,
            sip_port=port,
            extension=environ.get("HARNESS_EXTENSION", "harness"),
            bot_host=bot_host,
            bot_port=bot_port,
            logs=Path(logs) if logs else None,
        )

    def address(self) -> str:
        """Asterisk's IP address."""
        try:
            return socket.gethostbyname(self.asterisk_host)
        except OSError as exc:
            raise AsteriskError(
                f"cannot resolve the Asterisk host {self.asterisk_host!r}: {exc}"
            ) from None

    def local_address(self) -> str:
        """This host's address on the way to Asterisk (the phone binds to it)."""
        return source_address(self.address())


@dataclass
class LiveCall:
    """One call in progress: the bot's session, the SIP call and the capture."""

    tag: str
    session: BotSession
    sip: CallHandle
    capture: RtpCapture | None
    started: float = field(default_factory=time.time)
    packets: list[RtpPacket] = field(default_factory=list)
    topology: Topology = DIAL
    #: What the ARI app made of the call (ARI topologies).
    bridged: BridgedCall | None = None

    async def stop_capture(self) -> list[RtpPacket]:
        """Stop the capture (if any) and return the RTP sent to the caller."""
        if self.capture is not None:
            self.packets = await self.capture.stop()
        return self.packets


class Rig(Service):
    """Asterisk + bot server + SIP phone; an async context manager."""

    def __init__(
        self,
        install: Path | None,
        workdir: Path,
        *,
        phone: Phone | None = None,
        name: str = "asterisk",
        services: Services | None = None,
        bot: BotServer | None = None,
        ari: bool = False,
        asterisk_wrapper: Sequence[str] = (),
        boot_timeout: float | None = None,
        connect_attempts: int = 1,
    ) -> None:
        """*bot* is the bot server Asterisk dials (default: one on loopback);
        *ari*: ARI on, and the ARI app of the topologies that need it;
        *asterisk_wrapper*: a command Asterisk runs under (valgrind), with
        *boot_timeout* s to boot (default: :meth:`Asterisk.start`'s);
        *connect_attempts*: Asterisk's attempts per call to reach the bot."""
        self.asterisk_wrapper = tuple(asterisk_wrapper)
        self.connect_attempts = connect_attempts
        self.boot_timeout = boot_timeout
        if install is None and services is None:
            raise ValueError("a rig needs an Asterisk install or running services")
        self.install = install
        self.workdir = workdir
        self.name = name
        self.services = services
        if bot is None:
            bot = BotServer(services.bot_host, services.bot_port) if services else BotServer()
        self.bot = bot
        if ari and services is not None:
            raise ValueError("ARI topologies need a rig with an Asterisk of its own")
        self.want_ari = ari
        self.ari: Ari | None = None
        self.app: ExternalMediaApp | None = None
        #: Errors of the bot connecting in for INCOMING channels, per call tag.
        self.errors: dict[str | None, list[str]] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._connecting: set[asyncio.Task[None]] = set()
        self.asterisk: Asterisk | None = None
        #: Where calls go: Asterisk's address, SIP port and the bot's extension.
        self.sip_host = LOOPBACK
        self.sip_port = 0
        self.extension = services.extension if services else BOT_EXTENSION
        self._own_phone: SipPhone | None = None
        if phone is None:
            address = services.local_address() if services else LOOPBACK
            self._own_phone = SipPhone(workdir / "pjsua2", address=address)
        self.phone: Phone = phone or self._own_phone  # type: ignore[assignment]
        # Calls are set up one at a time: Asterisk 22.10.1 stores a call's v()
        # URI parameters on the shared websocket_client object just before it
        # connects, so concurrent Dial()s can connect with each other's
        # parameters (res_websocket_client.c, ast_websocket_client_add_uri_params).
        self._setup = asyncio.Lock()

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        await self.bot.start()
        if self.services is not None:
            self.sip_host = self.services.address()
            self.sip_port = self.services.sip_port
            log.info(
                "rig: using the Asterisk at %s:%d (extension %s), bot on %s",
                self.sip_host,
                self.sip_port,
                self.extension,
                self.bot.uri,
            )
        else:
            assert self.install is not None
            self.asterisk = Asterisk(
                self.install,
                self.bot.uri,
                name=self.name,
                ari=self.want_ari,
                wrapper=self.asterisk_wrapper,
                connect_attempts=self.connect_attempts,
            )
            await self.asterisk.start(self.boot_timeout)
            self.sip_port = self.asterisk.sip_port
            if self.want_ari:
                await self._start_ari(self.asterisk)
        if self._own_phone is not None:
            await self._own_phone.start()

    async def _start_ari(self, asterisk: Asterisk) -> None:
        settings = dataclasses.replace(asterisk.ari_settings, subscribe_all=True)
        self.ari = Ari(settings)
        await self.ari.start()
        self.app = ExternalMediaApp(self.ari, BOT_CONNECTION, connect_in=self._connect_in)
        await self.app.start()
        self._watcher = asyncio.create_task(self._watch_incoming(self.ari))

    async def _watch_incoming(self, ari: Ari) -> None:
        """Connect the bot in for every WebSocket/INCOMING channel the dialplan announces."""
        start = 0
        while not ari.closed.is_set():
            try:
                index, event = await ari.wait_event(
                    "ChannelUserevent", start=start, timeout=86400, eventname=INCOMING_EVENT
                )
            except AriError:
                continue
            start = index + 1
            fields = event.get("userevent") or {}
            tag, connection_id = fields.get("call") or None, fields.get("connection_id")
            if not connection_id:
                problem = f"{INCOMING_EVENT} without a connection_id: {event}"
                self.errors.setdefault(tag, []).append(problem)
                continue
            task = asyncio.create_task(self._connect_in(tag, connection_id))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)
            task.add_done_callback(_log_failure)

    async def _connect_in(self, tag: str | None, connection_id: str) -> None:
        """The bot connects in to the WebSocket channel *connection_id* (call *tag*)."""
        assert self.asterisk is not None
        uri = self.asterisk.http_uri.replace("http://", "ws://", 1) + f"/media/{connection_id}"
        try:
            await self.bot.connect_in(uri, tag)
        except BotError as exc:
            self.errors.setdefault(tag, []).append(str(exc))
            raise

    async def stop(self) -> None:
        try:
            if self._own_phone is not None:
                await self._own_phone.stop()
            if self.app is not None:
                await self.app.stop()
            tasks = [t for t in (self._watcher, *self._connecting) if t is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.ari is not None:
                await self.ari.stop()
            if self.asterisk is not None:
                await self.asterisk.stop()
        finally:
            await self.bot.stop()

    def describe_logs(self) -> str:
        if self.asterisk is not None:
            return self.asterisk.describe_logs()
        if self.services is not None and self.services.logs is not None:
            messages = self.services.logs / "messages.log"
            return f"--- {self.name}: messages.log ({messages}) ---\n{tail(messages)}"
        return ""

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
        extension: str | None = None,
        ptime: int | None = None,
        topology: Topology = DIAL,
        plan: MediaPlan | None = None,
        wait_for_bridge: bool = True,
    ) -> AsyncIterator[LiveCall]:
        """Place a call into the bot and yield it once media flows.

        *topology* is how the call reaches the bot (the rig needs ``ari=True``
        for any but ``dial``); in ARI topologies the call is yielded once the
        app has put the bot's channel in the bridge (*wait_for_bridge* false:
        at ``MEDIA_START``, as a bot sees it). *extension* is the one the
        call goes to (default: the topology's); *plan* is the ARI app's for
        it (default: the topology's, :meth:`Topology.plan`). Whatever answers it must
        connect the bot with the call's chan_websocket options, as ``ari``
        with an ARI app does. *ptime* makes the phone offer ``a=ptime`` (see
        :meth:`SipPhone.call`).
        """
        assert self.sip_port, "rig not started"
        if topology.needs_ari and self.app is None:
            raise ValueError(f"topology {topology}: the rig needs ARI (Rig(..., ari=True))")
        if plan is not None and topology.creation is not Creation.ARI:
            raise ValueError(f"topology {topology}: no ARI app places the call, so no plan")
        tag = uuid.uuid4().hex[:12]
        # A WebSocket/INCOMING channel takes no URI parameters: the rig pairs
        # the bot's session with the call by the connection id instead.
        tagging = "" if topology.connects_in else f"v(call={tag})"
        dial_options = f"c({codec}){control_format.dial_option}{tagging}{options}"
        if extension is None:
            extension = {
                Creation.ARI: ARI_EXTENSION,
                Creation.DIAL: INCOMING_EXTENSION if topology.connects_in else self.extension,
            }[topology.creation]
        uri = f"sip:{extension}@{self.sip_host}:{self.sip_port}"
        log.info(
            "rig: call %s -> %s (%s) with WebSocket options %s", tag, uri, topology, dial_options
        )
        if topology.creation is Creation.ARI:
            assert self.app is not None
            self.app.plans[tag] = plan or topology.plan()
        try:
            headers = {OPTIONS_HEADER: dial_options, CALL_HEADER: tag}
            bridged = None
            async with self._setup:
                sip = await self.phone.call(
                    uri, tag=tag, headers=headers, record_to=record, ptime=ptime
                )
                accepted: BotSession | None = None
                try:
                    accepted = await self._accept(tag, sip)
                    if topology.creation is Creation.ARI and wait_for_bridge:
                        assert self.app is not None
                        bridged = await self.app.wait_bridged(tag)
                except BaseException:
                    with contextlib.suppress(Exception):
                        if accepted is not None:
                            await accepted.close()
                    with contextlib.suppress(Exception):
                        await sip.hangup()
                    raise
                session = accepted
            live: LiveCall | None = None
            try:
                await sip.wait_media()
                cap = None
                if capture:
                    assert sip.record.local_rtp is not None
                    host, port = sip.record.local_rtp
                    cap = RtpCapture.to_port(port, host=host, peer=self.sip_host, pcap=pcap)
                    await cap.start()
                live = LiveCall(
                    tag=tag,
                    session=session,
                    sip=sip,
                    capture=cap,
                    topology=topology,
                    bridged=bridged,
                )
                yield live
            finally:
                if live is not None:
                    await live.stop_capture()
                with contextlib.suppress(Exception):
                    await sip.hangup()
                with contextlib.suppress(Exception):
                    await sip.wait_disconnected()
        finally:
            if self.app is not None:
                self.app.plans.pop(tag, None)

    def _problems(self, tag: str) -> str:
        """What went wrong on the way to the bot for call *tag*, if anything."""
        found = [*self.errors.get(tag, []), *(self.app.failures(tag) if self.app else [])]
        return "; ".join(found)

    async def _accept(self, tag: str, sip: CallHandle) -> BotSession:
        """The bot's session for the call, unless the SIP call ends first."""
        accept = asyncio.ensure_future(self.bot.accept(tag))
        waiters: set[asyncio.Future[Any]] = {accept, sip.disconnected}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if accept.done():
            try:
                return accept.result()
            except BotError as exc:
                if not (problems := self._problems(tag)):
                    raise
                raise BotError(f"{exc}; {problems}") from None
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError, BotError):
            await accept
        # (An ARI app that cannot bridge the call hangs it up: say why.)
        problems = self._problems(tag)
        reason = f"SIP {sip.record.last_status} {sip.record.last_reason}".strip()
        raise CallerError(
            f"call {tag} ended before the bot was connected ({reason})"
            + (f": {problems}" if problems else "")
        )


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("rig: the bot could not connect in: %s", exc)
