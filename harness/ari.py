"""An ARI application, the way most voice-bot apps reach chan_websocket.

:class:`Ari` is a client of the Asterisk REST Interface: REST calls with
``httpx``, events from the ``/ari/events`` WebSocket with ``websockets``.
:class:`ExternalMediaApp` is the usual voice-bot app on top of it: for every
call that enters Stasis it answers, creates a bridge, creates a WebSocket
channel with ``POST /channels/externalMedia?transport=websocket`` and bridges
the two. The caller's chan_websocket options (the Stasis arguments, from the
``X-WS-Options`` header) go to the WebSocket channel as ``transport_data``,
so a rig can pair the bot's session with its SIP call as it does for
``Dial(WebSocket/...)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)

Json = dict[str, Any]


class AriError(RuntimeError):
    """ARI refused a request, or did not answer."""


@dataclass(frozen=True)
class AriSettings:
    """Where ARI is, who we are, and the Stasis application we serve."""

    url: str  # http://host:8088
    user: str
    password: str
    app: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> AriSettings | None:
        """``HARNESS_ARI_URL``, ``_USER``, ``_PASSWORD`` and ``_APP``; None if unset."""
        url = environ.get("HARNESS_ARI_URL")
        if not url:
            return None
        missing = [
            f"HARNESS_ARI_{k}" for k in ("USER", "PASSWORD") if not environ.get(f"HARNESS_ARI_{k}")
        ]
        if missing:
            raise AriError(f"HARNESS_ARI_URL is set but {' and '.join(missing)} is not")
        return cls(
            url=url.rstrip("/"),
            user=environ["HARNESS_ARI_USER"],
            password=environ["HARNESS_ARI_PASSWORD"],
            app=environ.get("HARNESS_ARI_APP", "voicebot"),
        )

    @property
    def events_uri(self) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        query = urlencode({"app": self.app, "api_key": f"{self.user}:{self.password}"})
        return f"{scheme}://{parts.netloc}/ari/events?{query}"


class Ari(Service):
    """An ARI client: REST calls and the application's event stream."""

    def __init__(self, settings: AriSettings) -> None:
        self.settings = settings
        self.app = settings.app
        self.events: list[Json] = []
        self._changed = asyncio.Condition()
        self._http: httpx.AsyncClient | None = None
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self._http = httpx.AsyncClient(
            base_url=f"{self.settings.url}/ari",
            auth=(self.settings.user, self.settings.password),
            timeout=units(10),
        )
        try:
            self._ws = await asyncio.wait_for(
                connect(self.settings.events_uri, open_timeout=None), units(10)
            )
        except (OSError, TimeoutError, InvalidStatus) as exc:
            raise AriError(
                f"cannot open ARI's event WebSocket at {self.settings.url} (app {self.app}): {exc}"
            ) from None
        self._reader = asyncio.create_task(self._read(self._ws))
        log.info("ari: connected to %s as app %s", self.settings.url, self.app)

    async def stop(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._http is not None:
            await self._http.aclose()

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                event: Json = json.loads(message)
                log.debug("ari: event %s", event.get("type"))
                async with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()
        except ConnectionClosed:
            pass
        finally:
            self.closed.set()
            async with self._changed:
                self._changed.notify_all()

    async def wait_event(
        self, type_: str, *, start: int = 0, timeout: float | None = None, **match: str
    ) -> tuple[int, Json]:
        """The first event of *type_* at index *start* or later whose fields match.

        *match* compares ``channel_id`` (the event's channel's id) and top-level
        string fields. Returns the index and the event; raises AriError if the
        event stream ends first or *timeout* (default 10 units) passes.
        """

        def find() -> tuple[int, Json] | None:
            for i in range(start, len(self.events)):
                event = self.events[i]
                if event.get("type") == type_ and all(
                    _field(event, k) == v for k, v in match.items()
                ):
                    return i, event
            return None

        async def wait() -> tuple[int, Json]:
            async with self._changed:
                while (found := find()) is None:
                    if self.closed.is_set():
                        raise AriError(f"ARI's event stream ended before {type_} {match}")
                    await self._changed.wait()
                return found

        try:
            return await asyncio.wait_for(wait(), units(10) if timeout is None else timeout)
        except TimeoutError:
            raise AriError(f"no {type_} event {match} from ARI") from None

    async def request(self, method: str, path: str, **params: str) -> Json | None:
        """One REST call; the JSON it returns (None for 204). Raises AriError."""
        assert self._http is not None, "ARI client not started"
        try:
            response = await self._http.request(method, path, params=params)
        except httpx.HTTPError as exc:
            raise AriError(f"ARI {method} {path}: {exc!r}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise AriError(f"ARI {method} {path}: {response.status_code} {message}")
        if response.status_code == 204 or not response.content:
            return None
        body: Json = response.json()
        return body

    async def post(self, path: str, **params: str) -> Json | None:
        return await self.request("POST", path, **params)

    async def delete(self, path: str, **params: str) -> Json | None:
        return await self.request("DELETE", path, **params)


def _field(event: Json, key: str) -> object:
    if key == "channel_id":
        return (event.get("channel") or {}).get("id")
    return event.get(key)


_CODEC = re.compile(r"c\(([^)]*)\)")


@dataclass
class BridgedCall:
    """A caller's channel bridged with the WebSocket channel ARI created for it."""

    channel_id: str
    media_channel_id: str
    bridge_id: str
    options: str
    #: The bridge technology Asterisk chose (simple_bridge, softmix, ...).
    technology: str


class ExternalMediaApp(Service):
    """Bridge every call that enters the app with an externalMedia WebSocket channel.

    *connection* is the websocket_client.conf connection Asterisk dials (the
    bot); *bridge_type* is ARI's (``mixing``; ``mixing,video_sfu`` forces a
    softmix bridge). Each call is handled in a task of its own; when the
    caller leaves, its media channel is hung up and its bridge destroyed, and
    :meth:`stop` does the same for calls still up.
    """

    def __init__(self, ari: Ari, connection: str, bridge_type: str = "mixing") -> None:
        self.ari = ari
        self.connection = connection
        self.bridge_type = bridge_type
        self.calls: dict[str, BridgedCall] = {}
        self.errors: list[str] = []
        self._serving: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: What each call created, in order, to delete when it ends.
        self._created: dict[str, list[str]] = {}

    async def start(self) -> None:
        self._serving = asyncio.create_task(self._serve(len(self.ari.events)))

    async def stop(self) -> None:
        tasks = [t for t in (self._serving, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel_id in list(self._created):
            await self._clean_up(channel_id)

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, start: int) -> None:
        while not self.ari.closed.is_set():
            try:
                index, event = await self.ari.wait_event("StasisStart", start=start, timeout=3600)
            except AriError:
                continue  # no call for an hour, or the event stream ended
            start = index + 1
            channel = event["channel"]
            if not channel["name"].startswith("WebSocket/"):  # not our own media channel
                self._spawn(self._handle(channel["id"], ",".join(event.get("args", []))))

    async def _handle(self, channel_id: str, options: str) -> None:
        """One call: bridge it, then clean up after it once the caller leaves."""
        try:
            await self._bridge(channel_id, options)
            await self.ari.wait_event("StasisEnd", channel_id=channel_id, timeout=86400)
        except asyncio.CancelledError:
            raise
        except AriError as exc:
            if channel_id not in self.calls:
                log.error("ari: cannot bridge %s: %s", channel_id, exc)
                self.errors.append(str(exc))
        except Exception as exc:
            log.exception("ari: call %s failed", channel_id)
            self.errors.append(f"{channel_id}: {exc!r}")
        await self._clean_up(channel_id)

    async def _bridge(self, channel_id: str, options: str) -> BridgedCall:
        ari = self.ari
        created = self._created.setdefault(channel_id, [f"/channels/{channel_id}"])
        codec = m.group(1) if (m := _CODEC.search(options)) else "ulaw"
        await ari.post(f"/channels/{channel_id}/answer")
        bridge = await ari.post("/bridges", type=self.bridge_type)
        assert bridge is not None
        created.insert(0, f"/bridges/{bridge['id']}")
        await ari.post(f"/bridges/{bridge['id']}/addChannel", channel=channel_id)
        mark = len(ari.events)
        media = await ari.post(
            "/channels/externalMedia",
            app=ari.app,
            external_host=self.connection,
            transport="websocket",
            encapsulation="none",
            format=codec,
            transport_data=options,
        )
        assert media is not None
        created.insert(0, f"/channels/{media['id']}")
        # It enters the app once chan_websocket has connected to the bot.
        await ari.wait_event("StasisStart", start=mark, channel_id=media["id"])
        await ari.post(f"/bridges/{bridge['id']}/addChannel", channel=media["id"])
        now = await ari.request("GET", f"/bridges/{bridge['id']}")
        technology = str((now or {}).get("technology", "?"))
        call = BridgedCall(channel_id, media["id"], bridge["id"], options, technology)
        self.calls[channel_id] = call
        log.info(
            "ari: %s bridged with %s in a %s bridge %s (%s)",
            channel_id,
            media["id"],
            technology,
            bridge["id"],
            options,
        )
        return call

    async def _clean_up(self, channel_id: str) -> None:
        """Delete what the call created (media channel, bridge) and the caller's channel."""
        for path in self._created.pop(channel_id, []):
            with contextlib.suppress(AriError):
                await self.ari.delete(path)
