"""An ARI application, the way most voice-bot apps reach chan_websocket.

:class:`Ari` is a client of the Asterisk REST Interface: REST calls with
``httpx``, events from the ``/ari/events`` WebSocket with ``websockets``.
:class:`ExternalMediaApp` is the usual voice-bot app on top of it: for every
call that enters Stasis it answers, creates a bridge, creates a WebSocket
channel with ``POST /channels/externalMedia?transport=websocket`` and bridges
the two. The caller's chan_websocket options (the Stasis arguments, from the
``X-WS-Options`` header) go to the WebSocket channel as ``transport_data``,
so a rig can pair the bot's session with its SIP call as it does for
``Dial(WebSocket/...)``. A :class:`MediaPlan` per call chooses how: Asterisk
connecting out to the bot or the bot connecting in, and the bridge (two
parties, softmix forced, or a silent third party in it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from harness.config import CALL_HEADER, DIALPLAN_CONTEXT, HOLD_EXTENSION
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
    #: Receive every channel's events, not only those of the app's channels
    #: (``subscribeAll``): a dialplan's UserEvents, say.
    subscribe_all: bool = False

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
        params = {"app": self.app, "api_key": f"{self.user}:{self.password}"}
        if self.subscribe_all:
            params["subscribeAll"] = "true"
        query = urlencode(params)
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

        scanned = start

        def find() -> tuple[int, Json] | None:
            # Each event is looked at once, however often the list grows.
            nonlocal scanned
            for i in range(scanned, len(self.events)):
                event = self.events[i]
                if event.get("type") == type_ and all(
                    _field(event, k) == v for k, v in match.items()
                ):
                    return i, event
            scanned = max(scanned, len(self.events))
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

#: The Stasis argument of the app's own third parties (not calls to serve).
THIRD_PARTY_ARG = "harness-third-party"

#: What the app calls with (call tag, connection id) when it has created a
#: WebSocket channel that waits for the bot to connect in; it returns once the
#: bot is connected.
ConnectIn = Callable[[str | None, str], Awaitable[None]]


@dataclass(frozen=True)
class MediaPlan:
    """How the app gives one call its bot.

    *connection_type* is externalMedia's: ``client`` (Asterisk connects to
    the websocket_client connection) or ``server`` (a ``WebSocket/INCOMING``
    channel: the bot connects in to ``/media/<connection_id>``). *bridge_type*
    is ARI's bridge type (``mixing`` picks simple_bridge for two parties;
    ``mixing,video_sfu`` forces softmix). *third_party*: a silent Local channel
    joins the bridge before the bot, so even a plain mixing bridge mixes.
    *bridge_delay*: the app's own latency before it bridges the bot.
    """

    connection_type: str = "client"
    bridge_type: str = "mixing"
    third_party: bool = False
    #: Seconds the app lets pass before it adds the bot's channel to the
    #: bridge: an app far from Asterisk, or a slow one.
    bridge_delay: float = 0.0


@dataclass
class BridgedCall:
    """A caller's channel bridged with the WebSocket channel ARI created for it."""

    channel_id: str
    media_channel_id: str
    bridge_id: str
    options: str
    #: The bridge technology Asterisk chose (simple_bridge, softmix, ...).
    technology: str
    plan: MediaPlan = MediaPlan()
    #: chan_websocket's connection id (``server``: the bot connected to it).
    connection_id: str | None = None
    third_party_channel_id: str | None = None
    #: The caller's call tag (``X-Harness-Call``), if it has one.
    tag: str | None = None


class ExternalMediaApp(Service):
    """Bridge every call that enters the app with an externalMedia WebSocket channel.

    *connection* is the websocket_client.conf connection Asterisk dials (the
    bot) for ``client`` plans; *plan* is the default :class:`MediaPlan`, and
    :attr:`plans` holds plans per call tag (the caller's ``X-Harness-Call``
    header, read through ARI). *connect_in* is called for ``server`` plans.
    Each call is handled in a task of its own; when the caller or the bot's
    channel leaves, what the call created is deleted (the other side is hung
    up, as ``Dial`` does), and :meth:`stop` does the same for calls still up.
    """

    def __init__(
        self,
        ari: Ari,
        connection: str,
        bridge_type: str | None = None,
        *,
        plan: MediaPlan | None = None,
        connect_in: ConnectIn | None = None,
    ) -> None:
        if plan is not None and bridge_type is not None:
            raise ValueError("give a bridge_type or a plan, not both")
        self.ari = ari
        self.connection = connection
        self.plan = plan or MediaPlan(bridge_type=bridge_type or "mixing")
        self.plans: dict[str, MediaPlan] = {}
        self.connect_in = connect_in
        self.calls: dict[str, BridgedCall] = {}
        self._bridged = asyncio.Condition()
        #: Every call's failure, in order; :meth:`failures` has one call's.
        self.errors: list[str] = []
        self._failed: dict[str | None, list[str]] = {}
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
            args = event.get("args", [])
            # Not our own media channels or third parties.
            if not channel["name"].startswith("WebSocket/") and args[:1] != [THIRD_PARTY_ARG]:
                self._spawn(self._handle(channel["id"], ",".join(args), index))

    async def _handle(self, channel_id: str, options: str, since: int) -> None:
        """One call (its StasisStart at *since* in the event list): bridge it,
        then clean up after it once the caller or the bot leaves."""
        tag = None
        try:
            tag = await self._call_tag(channel_id) if self.plans or self.connect_in else None
            call = await self._bridge(channel_id, options, tag)
            # The call ends when either side leaves, as with Dial().
            ends = [
                asyncio.ensure_future(
                    self.ari.wait_event("StasisEnd", start=since, channel_id=c, timeout=86400)
                )
                for c in (channel_id, call.media_channel_id)
            ]
            try:
                await asyncio.wait(ends, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for end in ends:
                    end.cancel()
                await asyncio.gather(*ends, return_exceptions=True)
        except asyncio.CancelledError:
            raise
        except AriError as exc:
            if channel_id not in self.calls:
                log.error("ari: cannot bridge %s: %s", channel_id, exc)
                await self._fail(tag, str(exc))
        except Exception as exc:
            log.exception("ari: call %s failed", channel_id)
            await self._fail(tag, f"{channel_id}: {exc!r}")
        await self._clean_up(channel_id)

    async def _call_tag(self, channel_id: str) -> str | None:
        """The caller's ``X-Harness-Call`` header, if it has one."""
        try:
            found = await self.ari.request(
                "GET",
                f"/channels/{channel_id}/variable",
                variable=f"PJSIP_HEADER(read,{CALL_HEADER})",
            )
        except AriError:
            return None
        value = (found or {}).get("value")
        return str(value) if value else None

    async def _bridge(self, channel_id: str, options: str, tag: str | None) -> BridgedCall:
        ari = self.ari
        created = self._created.setdefault(channel_id, [f"/channels/{channel_id}"])
        if self.plans and tag not in self.plans:
            # A call placed for a plan must get it, not quietly the default.
            raise AriError(f"no plan for call {tag!r} (channel {channel_id})")
        plan = self.plans.get(tag or "", self.plan)
        codec = m.group(1) if (m := _CODEC.search(options)) else "ulaw"
        await ari.post(f"/channels/{channel_id}/answer")
        bridge = await ari.post("/bridges", type=plan.bridge_type)
        assert bridge is not None
        created.insert(0, f"/bridges/{bridge['id']}")
        await ari.post(f"/bridges/{bridge['id']}/addChannel", channel=channel_id)
        third_party = None
        if plan.third_party:
            third_party = await self._add_third_party(bridge["id"], codec, created)
        mark = len(ari.events)
        where = (
            {"external_host": self.connection}
            if plan.connection_type == "client"
            else {"connection_type": "server"}
        )
        media = await ari.post(
            "/channels/externalMedia",
            app=ari.app,
            transport="websocket",
            encapsulation="none",
            format=codec,
            transport_data=options,
            **where,
        )
        assert media is not None
        created.insert(0, f"/channels/{media['id']}")
        connection_id = (media.get("channelvars") or {}).get("MEDIA_WEBSOCKET_CONNECTION_ID")
        if plan.connection_type == "server":
            if connection_id is None or self.connect_in is None:
                raise AriError(
                    f"externalMedia server channel {media['id']}: "
                    + ("no MEDIA_WEBSOCKET_CONNECTION_ID" if connection_id is None else "no bot")
                )
            try:
                await self.connect_in(tag, connection_id)
            except Exception as exc:  # the bot's side: its own message
                raise AriError(f"the bot did not connect in to {connection_id}: {exc}") from None
        # It enters the app once the bot is connected (and the channel answered).
        await ari.wait_event("StasisStart", start=mark, channel_id=media["id"])
        await asyncio.sleep(plan.bridge_delay)
        await ari.post(f"/bridges/{bridge['id']}/addChannel", channel=media["id"])
        now = await ari.request("GET", f"/bridges/{bridge['id']}")
        technology = str((now or {}).get("technology", "?"))
        call = BridgedCall(
            channel_id,
            media["id"],
            bridge["id"],
            options,
            technology,
            plan,
            connection_id,
            third_party,
            tag,
        )
        async with self._bridged:
            self.calls[channel_id] = call
            self._bridged.notify_all()
        log.info(
            "ari: %s bridged with %s (%s) in a %s bridge %s%s (%s)",
            channel_id,
            media["id"],
            plan.connection_type,
            technology,
            bridge["id"],
            " with a third party" if third_party else "",
            options,
        )
        return call

    async def wait_bridged(self, tag: str, timeout: float | None = None) -> BridgedCall:
        """The call tagged *tag* once its media channel is in its bridge.

        The bot's MEDIA_START comes before that: audio a bot sends between the
        two is read by Stasis, which has nowhere to send it. Raises AriError
        if the call failed or *timeout* (default 10 units) passes first.
        """

        def find() -> BridgedCall | None:
            return next((c for c in self.calls.values() if c.tag == tag), None)

        async def wait() -> BridgedCall:
            async with self._bridged:
                while (found := find()) is None:
                    if failed := self.failures(tag):
                        raise AriError(f"the app could not bridge call {tag}: {'; '.join(failed)}")
                    await self._bridged.wait()
                return found

        try:
            return await asyncio.wait_for(wait(), units(10) if timeout is None else timeout)
        except TimeoutError:
            raise AriError(f"call {tag} was not bridged; the app's errors: {self.errors}") from None

    def failures(self, tag: str | None) -> list[str]:
        """What went wrong with the call tagged *tag* (None: calls without a tag)."""
        return list(self._failed.get(tag, []))

    async def _fail(self, tag: str | None, message: str) -> None:
        async with self._bridged:
            self.errors.append(message)
            self._failed.setdefault(tag, []).append(message)
            self._bridged.notify_all()

    async def _add_third_party(self, bridge_id: str, codec: str, created: list[str]) -> str:
        """A Local channel to the silent extension, in the bridge; its id."""
        mark = len(self.ari.events)
        # In the call's codec: a softmix bridge mixes at the highest rate
        # among its channels, and a Local channel left to choose may bring
        # in 16 or 48 kHz, resampling everyone's audio.
        local = await self.ari.post(
            "/channels",
            endpoint=f"Local/{HOLD_EXTENSION}@{DIALPLAN_CONTEXT}",
            app=self.ari.app,
            appArgs=THIRD_PARTY_ARG,
            formats=codec,
        )
        assert local is not None
        created.insert(0, f"/channels/{local['id']}")
        await self.ari.wait_event("StasisStart", start=mark, channel_id=local["id"])
        await self.ari.post(f"/bridges/{bridge_id}/addChannel", channel=local["id"])
        return str(local["id"])

    async def _clean_up(self, channel_id: str) -> None:
        """Delete what the call created (media channel, bridge) and the caller's channel."""
        for path in self._created.pop(channel_id, []):
            with contextlib.suppress(AriError):
                await self.ari.delete(path)
