"""A real SIP caller: pjsua2 with the null audio device, in its own thread.

pjsua2 wants one Endpoint per process and every call into it from a thread
it knows, so :class:`SipPhone` owns one worker thread that creates the
Endpoint, pumps ``libHandleEvents()`` and runs every operation posted to it;
asyncio code awaits the results. Account and Call objects are kept referenced
until the Endpoint is destroyed (``libDestroy()``, always).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from harness.ports import LOOPBACK
from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Concurrent calls one SipPhone can hold (the benchmark places 30 at once).
MAX_CALLS = 64


class CallerError(RuntimeError):
    """The SIP caller failed (no pjsua2, call rejected, timeout)."""


def _import_pjsua2() -> Any:
    try:
        import pjsua2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CallerError(
            "pjsua2 is not importable: install the harness's dependencies with 'make setup' "
            "(PyPI package pjsua2-python)"
        ) from exc
    return pjsua2


@dataclass
class CallRecord:
    """What one call did, as seen by the caller. Filled in by the worker thread."""

    tag: str
    uri: str
    states: list[tuple[float, str]] = field(default_factory=list)
    last_status: int = 0
    last_reason: str = ""
    local_rtp: tuple[str, int] | None = None
    remote_rtp: str = ""
    recording: Path | None = None
    rx_packets: int = 0
    rx_bytes: int = 0

    @property
    def state(self) -> str:
        return self.states[-1][1] if self.states else "NULL"


class CallHandle(Protocol):
    """What the rig needs of a call, whichever process placed it."""

    record: CallRecord
    #: Done when the call has ended (or failed to start).
    disconnected: asyncio.Future[None]

    async def wait_media(self, timeout: float | None = None) -> None: ...
    async def hangup(self) -> None: ...
    async def wait_disconnected(self, timeout: float | None = None) -> None: ...


class Phone(Protocol):
    """Something that places calls: a SipPhone, or a pool of them."""

    async def call(
        self,
        uri: str,
        *,
        tag: str,
        headers: dict[str, str] | None = None,
        record_to: Path | None = None,
        ptime: int | None = None,
    ) -> CallHandle: ...


class SipCall:
    """An outgoing call; methods are safe to await from asyncio."""

    def __init__(self, phone: SipPhone, record: CallRecord) -> None:
        self.phone = phone
        self.record = record
        self._pj_call: Any = None
        self._recorder: Any = None
        self._sending = False
        self._player: Any = None
        self._media_index: int | None = None
        self.confirmed: asyncio.Future[None] = phone.loop.create_future()
        self.media_active: asyncio.Future[None] = phone.loop.create_future()
        self.disconnected: asyncio.Future[None] = phone.loop.create_future()

    def _resolve(self, fut: asyncio.Future[None], exc: BaseException | None = None) -> None:
        def done() -> None:
            if fut.done():
                return
            if exc is None:
                fut.set_result(None)
            else:
                fut.set_exception(exc)

        self.phone.loop.call_soon_threadsafe(done)

    async def wait_media(self, timeout: float | None = None) -> None:
        """Wait until the call is confirmed and its audio is flowing."""
        timeout = units(15) if timeout is None else timeout

        async def both() -> None:
            await self.confirmed
            await self.media_active

        waiter = asyncio.ensure_future(both())
        done, _ = await asyncio.wait(
            {waiter, self.disconnected}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if waiter in done:
            waiter.result()
            return
        waiter.cancel()
        with contextlib.suppress(asyncio.CancelledError, CallerError):
            await waiter
        if self.disconnected in done:
            raise CallerError(
                f"call {self.record.tag} ended before media: SIP {self.record.last_status} "
                f"{self.record.last_reason}"
            )
        raise CallerError(
            f"call {self.record.tag} not connected within {timeout:.1f} s "
            f"(state {self.record.state})"
        )

    async def hangup(self) -> None:
        await self.phone.run(self._hangup)

    def _hangup(self) -> None:
        pj = self.phone.pj
        if self._pj_call is not None and self._pj_call.isActive():
            prm = pj.CallOpParam()
            prm.statusCode = 200
            self._pj_call.hangup(prm)

    async def play(self, wav: Path) -> None:
        """Speak into the call: send *wav* (8 kHz 16-bit mono) once, as the caller."""
        await self.phone.run(lambda: self._play(wav))

    def _play(self, wav: Path) -> None:
        pj = self.phone.pj
        if self._pj_call is None or self._media_index is None:
            raise CallerError(f"call {self.record.tag} has no active audio to play into")
        player = pj.AudioMediaPlayer()
        player.createPlayer(str(wav), pj.PJMEDIA_FILE_NO_LOOP)
        player.startTransmit(self._pj_call.getAudioMedia(self._media_index))
        self._player = player

    async def wait_disconnected(self, timeout: float | None = None) -> None:
        timeout = units(10) if timeout is None else timeout
        try:
            await asyncio.wait_for(asyncio.shield(self.disconnected), timeout)
        except TimeoutError:
            raise CallerError(f"call {self.record.tag} still up after {timeout:.1f} s") from None

    async def stats(self) -> CallRecord:
        """Refresh the receive counters from pjsua2's stream statistics."""
        await self.phone.run(self._read_stats)
        return self.record

    def _read_stats(self) -> None:
        call = self._pj_call
        if call is None or not call.isActive() or not call.hasMedia():
            return
        with contextlib.suppress(Exception):
            stat = call.getStreamStat(0)
            self.record.rx_packets = int(stat.rtcp.rxStat.pkt)
            self.record.rx_bytes = int(stat.rtcp.rxStat.bytes)


@contextlib.contextmanager
def _stdout_silenced() -> Iterator[None]:
    """Point file descriptor 1 at /dev/null for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


class SipPhone(Service):
    """The process's one pjsua2 Endpoint, in a worker thread; async context manager."""

    def __init__(self, workdir: Path, *, address: str = LOOPBACK, log_level: int = 4) -> None:
        self.workdir = workdir
        #: The local address SIP and RTP bind to (and that the SDP offers).
        self.address = address
        self.log_path = workdir / "pjsua2.log"
        self.log_level = log_level
        self.pj: Any = None
        self.loop: asyncio.AbstractEventLoop = asyncio.get_event_loop()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stop = threading.Event()
        self._ep: Any = None
        self._account: Any = None
        self._calls: list[SipCall] = []  # keeps pjsua2 Call objects alive
        self.sip_port = 0

    # --- the worker thread --------------------------------------------------------

    def _worker(self) -> None:
        try:
            self._init_endpoint()
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._destroy_endpoint()
            return
        self._ready.set_result(None)
        try:
            while not self._stop.is_set():
                self._ep.libHandleEvents(5)
                while True:
                    try:
                        job, fut = self._jobs.get_nowait()
                    except queue.Empty:
                        break
                    if fut.set_running_or_notify_cancel():
                        try:
                            fut.set_result(job())
                        except BaseException as exc:
                            fut.set_exception(exc)
        finally:
            self._destroy_endpoint()

    def _init_endpoint(self) -> None:
        pj = self.pj = _import_pjsua2()
        self.workdir.mkdir(parents=True, exist_ok=True)
        ep = self._ep = pj.Endpoint()
        with _stdout_silenced():  # pjlib prints its banner before logging is set up
            ep.libCreate()
        cfg = pj.EpConfig()
        cfg.uaConfig.threadCnt = 0
        cfg.uaConfig.maxCalls = MAX_CALLS
        cfg.uaConfig.mainThreadOnly = False
        cfg.uaConfig.userAgent = "asterisk-marks-harness"
        cfg.logConfig.level = self.log_level
        cfg.logConfig.consoleLevel = 0
        cfg.logConfig.filename = str(self.log_path)
        cfg.medConfig.threadCnt = 1
        cfg.medConfig.noVad = True
        cfg.medConfig.ecTailLen = 0
        ep.libInit(cfg)
        tcfg = pj.TransportConfig()
        tcfg.boundAddress = self.address
        tcfg.publicAddress = self.address
        tcfg.port = 0
        tid = ep.transportCreate(pj.PJSIP_TRANSPORT_UDP, tcfg)
        self.sip_port = int(ep.transportGetInfo(tid).localName.rsplit(":", 1)[1])
        ep.libStart()
        ep.audDevManager().setNullDev()
        for codec in ep.codecEnum2():
            ep.codecSetPriority(codec.codecId, 0)
        ep.codecSetPriority("PCMU/8000", 255)
        acfg = pj.AccountConfig()
        acfg.idUri = f"sip:caller@{self.address}:{self.sip_port}"
        acfg.mediaConfig.transportConfig.boundAddress = self.address
        acfg.mediaConfig.transportConfig.port = 0
        acfg.natConfig.sdpNatRewriteUse = 0
        acfg.natConfig.viaRewriteUse = 0
        acfg.natConfig.contactRewriteUse = 0
        self._account = pj.Account()
        self._account.create(acfg)
        log.info("caller: pjsua2 %s on %s:%d", ep.libVersion().full, self.address, self.sip_port)

    def _destroy_endpoint(self) -> None:
        ep = self._ep
        if ep is None:
            return
        with contextlib.suppress(Exception):
            ep.hangupAllCalls()
        # pjsua2 objects must die before the library: drop every reference.
        for call in self._calls:
            call._pj_call = None
            call._recorder = None
            call._player = None
        self._calls.clear()
        self._account = None
        gc.collect()
        try:
            ep.libDestroy()
        except Exception:
            log.exception("caller: libDestroy failed")
        self._ep = None

    # --- the asyncio side ----------------------------------------------------------

    async def run(self, job: Callable[[], T], timeout: float | None = None) -> T:
        """Run *job* in the worker thread and return its result."""
        if self._thread is None or not self._thread.is_alive():
            raise CallerError("the SIP phone is not running")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._jobs.put((job, fut))
        timeout = units(10) if timeout is None else timeout
        return await asyncio.wait_for(asyncio.wrap_future(fut), timeout)

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._worker, name="pjsua2", daemon=True)
        self._thread.start()
        await asyncio.wait_for(asyncio.wrap_future(self._ready), units(10))

    async def stop(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        await asyncio.to_thread(self._thread.join, units(15))
        if self._thread.is_alive():
            log.error("caller: pjsua2 thread did not stop")
        self._thread = None

    async def call(
        self,
        uri: str,
        *,
        tag: str,
        headers: dict[str, str] | None = None,
        record_to: Path | None = None,
        ptime: int | None = None,
    ) -> SipCall:
        """Place a call to *uri*; return at once (await ``wait_media()`` next).

        *ptime* adds ``a=ptime`` to the offer (pjmedia never does): with
        ``use_ptime`` Asterisk then sends through its RTP smoother.
        """
        record = CallRecord(tag=tag, uri=uri, recording=record_to)
        call = SipCall(self, record)
        self._calls.append(call)
        await self.run(lambda: self._make_call(call, headers or {}, ptime))
        return call

    def _make_call(self, call: SipCall, headers: dict[str, str], ptime: int | None) -> None:
        pj = self.pj
        phone = self

        class _Call(pj.Call):  # type: ignore[misc, name-defined]
            def onCallSdpCreated(self, prm: Any) -> None:
                if ptime is not None:
                    prm.sdp.wholeSdp = prm.sdp.wholeSdp.rstrip("\r\n") + f"\r\na=ptime:{ptime}\r\n"

            def onCallState(self, prm: Any) -> None:
                info = self.getInfo()
                rec = call.record
                rec.states.append((time.time(), info.stateText))
                rec.last_status = int(info.lastStatusCode)
                rec.last_reason = str(info.lastReason)
                log.debug("caller: %s %s (%s)", rec.tag, info.stateText, info.lastStatusCode)
                if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
                    call._resolve(call.confirmed)
                elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
                    err = CallerError(f"call ended: {info.lastStatusCode} {info.lastReason}")
                    call._resolve(call.confirmed, err)
                    call._resolve(call.media_active, err)
                    call._resolve(call.disconnected)

            def onCallMediaState(self, prm: Any) -> None:
                info = self.getInfo()
                for i, media in enumerate(info.media):
                    if (
                        media.type == pj.PJMEDIA_TYPE_AUDIO
                        and media.status == pj.PJSUA_CALL_MEDIA_ACTIVE
                    ):
                        phone._media_up(call, self, i)

        pj_call = _Call(self._account)
        call._pj_call = pj_call
        prm = pj.CallOpParam(True)
        for name, value in headers.items():
            hdr = pj.SipHeader()
            hdr.hName = name
            hdr.hValue = value
            prm.txOption.headers.append(hdr)
        pj_call.makeCall(call.record.uri, prm)

    def _media_up(self, call: SipCall, pj_call: Any, index: int) -> None:
        rec = call.record
        call._media_index = index
        try:
            tp = pj_call.getMedTransportInfo(index)
            host, _, port = tp.localRtpName.rpartition(":")
            rec.local_rtp = (host, int(port))
            rec.remote_rtp = str(tp.srcRtpName)
        except Exception:
            log.exception("caller: no media transport info")
        if not call._sending:
            # A phone sends RTP all through the call; with the null device,
            # silence. (Without a source pjsua sends some calls' RTP and not
            # others', which made Asterisk's work per call differ.)
            self.pj.Endpoint.instance().audDevManager().getCaptureDevMedia().startTransmit(
                pj_call.getAudioMedia(index)
            )
            call._sending = True
        if rec.recording is not None and call._recorder is None:
            recorder = self.pj.AudioMediaRecorder()
            recorder.createRecorder(str(rec.recording))
            pj_call.getAudioMedia(index).startTransmit(recorder)
            call._recorder = recorder
        log.debug("caller: %s media active, local RTP %s", rec.tag, rec.local_rtp)
        call._resolve(call.media_active)
