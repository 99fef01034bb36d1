"""Tests that run only inside docker compose (``make docker-test``'s ``tests``
service): ARI against the ``asterisk`` service, and faults made through the
Docker engine (docker-py, with the engine's socket mounted by
``docker/docker-compose.test.yml``).

They are not collected by a plain ``pytest`` (``norecursedirs``); asked for
outside compose, they fail (CI) or skip, saying why.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from astmarks.protocol import (
    MARK_CLEARED_EVENTS,
    MARK_REACHED_EVENTS,
    ProtocolError,
    parse_event,
)
from harness.ari import Ari, AriSettings
from harness.caller import CallHandle, SipPhone
from harness.capture import RtpCapture, RtpPacket
from harness.config import OPTIONS_HEADER
from harness.rig import Services
from harness.timing import poll
from tests.conftest import SERVICES, need

#: What the demo bot's debug log says for a command it sent / an event it got.
_SENT = re.compile(r"session (?P<tag>\S+): -> (?P<text>.*)$")
_GOT = re.compile(r"session (?P<tag>\S+): <- (?P<text>.*)$")


@pytest.fixture(scope="session")
def services() -> Services:
    need(SERVICES is not None, "runs inside docker compose: make docker-test")
    assert SERVICES is not None
    return SERVICES


@pytest.fixture(scope="session")
def ari_settings() -> AriSettings:
    settings = AriSettings.from_env()
    need(settings is not None, "needs ARI (HARNESS_ARI_URL): make docker-test sets it")
    assert settings is not None
    return settings


@pytest.fixture
async def ari(ari_settings: AriSettings) -> AsyncIterator[Ari]:
    async with Ari(ari_settings) as client:
        yield client


class Project:
    """The compose project this test runner belongs to, through the Docker engine."""

    def __init__(self) -> None:
        # The Docker SDK (docker-py). Imported by name at run time: to mypy,
        # "docker" is this repository's docker/ directory.
        docker: Any = importlib.import_module("docker")
        try:
            self.client = docker.from_env()
            me = self.client.containers.get(socket.gethostname())
        except docker.errors.DockerException as exc:
            need(False, f"no Docker engine through /var/run/docker.sock: {exc}")
            raise
        self.name = me.labels["com.docker.compose.project"]

    def container(self, service: str) -> Any:
        found = self.client.containers.list(
            all=True,
            filters={
                "label": [
                    f"com.docker.compose.project={self.name}",
                    f"com.docker.compose.service={service}",
                ]
            },
        )
        assert len(found) == 1, f"one {service} container in {self.name}: {found}"
        return found[0]

    def network(self, service: str) -> tuple[Any, str, str]:
        """The (only) network *service* is on, its address there, and its alias."""
        container = self.container(service)
        networks = container.attrs["NetworkSettings"]["Networks"]
        assert len(networks) == 1, networks
        name, settings = next(iter(networks.items()))
        return self.client.networks.get(name), settings["IPAddress"], service

    async def wait_healthy(self, service: str, timeout: float) -> float:
        """Seconds until *service*'s healthcheck passes."""
        t0 = time.monotonic()

        async def healthy() -> bool | None:
            c = await asyncio.to_thread(self.container, service)
            state = c.attrs["State"]
            return True if state.get("Health", {}).get("Status") == "healthy" else None

        await poll(healthy, timeout=timeout, what=f"{service} to be healthy", interval=0.5)
        return time.monotonic() - t0

    async def wait_listening(self, host: str, port: int, timeout: float) -> None:
        async def listening() -> bool | None:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection(host, port)
                writer.close()
                return True
            return None

        await poll(listening, timeout=timeout, what=f"{host}:{port} to accept connections")

    def logs(self, service: str, since: float) -> list[str]:
        raw = self.container(service).logs(since=datetime.fromtimestamp(since, UTC))
        return [line for line in raw.decode(errors="replace").splitlines() if line]

    async def wait_no_channels(self, timeout: float) -> None:
        """Until Asterisk has no channel left."""

        async def none_left() -> bool | None:
            out = await asyncio.to_thread(self.asterisk_cli, "core show channels count")
            return True if "0 active channels" in out else None

        await poll(none_left, timeout=timeout, what="Asterisk to let go of every channel")

    async def bot_fates(self, tag: str, since: float) -> MarkFates:
        """What the demo bot's log says of the marks of call *tag*."""
        lines = await asyncio.to_thread(self.logs, "bot", since - 1)
        return MarkFates.from_bot_log(lines, tag)

    def asterisk_cli(self, command: str) -> str:
        """An Asterisk CLI command in the asterisk service (as the image's healthcheck does)."""
        result = self.container("asterisk").exec_run(
            [
                "timeout",
                "10",
                "/opt/asterisk-marks/sbin/asterisk",
                "-C",
                "/srv/asterisk/etc/asterisk.conf",
                "-rx",
                command,
            ],
            user="999",
        )
        output: str = result.output.decode(errors="replace")
        assert result.exit_code == 0, output
        return output


@pytest.fixture(scope="session")
def project(services: Services) -> Project:
    return Project()


@dataclass
class MarkFates:
    """Every MARK a bot sent in one call, and what became of it."""

    sent: list[str] = field(default_factory=list)
    played: list[str] = field(default_factory=list)
    cleared: list[str] = field(default_factory=list)

    @property
    def unanswered(self) -> list[str]:
        answered = set(self.played) | set(self.cleared)
        return [m for m in self.sent if m not in answered]

    @classmethod
    def from_bot_log(cls, lines: list[str], tag: str) -> MarkFates:
        """From the demo bot's debug log (HARNESS_DEBUG): its commands and events."""
        fates = cls()
        for line in lines:
            if m := _SENT.search(line):
                words = m["text"].split()
                if m["tag"] == tag and words[:1] in (["MARK"], ["MARK_MEDIA"]):
                    fates.sent.append(words[1])
            elif (m := _GOT.search(line)) and m["tag"] == tag:
                try:
                    event = parse_event(m["text"])
                except ProtocolError:
                    continue
                ident = event.mark_id
                if event.name in MARK_REACHED_EVENTS and ident:
                    fates.played.append(ident)
                elif event.name in MARK_CLEARED_EVENTS and ident:
                    fates.cleared.append(ident)
        return fates

    def __str__(self) -> str:
        return (
            f"{len(self.sent)} sent: {len(self.played)} played, {len(self.cleared)} cleared, "
            f"{len(self.unanswered)} unanswered"
        )


@dataclass
class DemoCall:
    """A call from the test runner's phone to the demo bot (extension ``bot``)."""

    tag: str
    sip: CallHandle
    capture: RtpCapture
    started: float

    @property
    def packets(self) -> list[RtpPacket]:
        return self.capture.packets


@contextlib.asynccontextmanager
async def demo_call(phone: SipPhone, services: Services) -> AsyncIterator[DemoCall]:
    """Call the demo bot with its speech captured; hang up at the end if still up."""
    host = services.address()
    tag = uuid.uuid4().hex[:12]
    started = time.time()
    sip = await phone.call(
        f"sip:bot@{host}:{services.sip_port}",
        tag=tag,
        headers={OPTIONS_HEADER: f"c(ulaw)v(call={tag})"},
    )
    try:
        await sip.wait_media()
        assert sip.record.local_rtp is not None
        local, port = sip.record.local_rtp
        async with RtpCapture.to_port(port, host=local, peer=host) as capture:
            yield DemoCall(tag, sip, capture, started)
    finally:
        with contextlib.suppress(Exception):
            await sip.hangup()
