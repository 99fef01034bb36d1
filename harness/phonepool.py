"""Many concurrent SIP calls: a pool of caller processes, each a real SipPhone.

pjsua2 allows one Endpoint per process, and the pjsua2-python build holds at
most ``PJSUA_MAX_CALLS`` (4) calls per Endpoint. :class:`PhonePool` starts as
many worker processes as the calls need (``python -m harness.phonepool``),
each running a :class:`~harness.caller.SipPhone`, and talks to them in JSON
lines. Its ``call()`` gives the same kind of call object the rig uses, so a
rig can place 30 calls at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import IO, Any

from harness.caller import CallerError, CallRecord, SipCall, SipPhone
from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)

#: Calls one pjsua2 Endpoint holds (PJSUA_MAX_CALLS in the pjsua2-python build).
CALLS_PER_PROCESS = 4


class RemoteCall:
    """A call placed by a worker process; the methods the rig uses of SipCall."""

    def __init__(self, worker: _Worker, record: CallRecord) -> None:
        self.worker = worker
        self.record = record
        loop = asyncio.get_running_loop()
        self.media_active: asyncio.Future[None] = loop.create_future()
        self.disconnected: asyncio.Future[None] = loop.create_future()

    def _event(self, msg: dict[str, Any]) -> None:
        event = msg["event"]
        if event == "media":
            host, port = msg["local_rtp"]
            self.record.local_rtp = (host, int(port))
            if not self.media_active.done():
                self.media_active.set_result(None)
        elif event == "failed":
            self.record.last_reason = msg.get("error", "")
            for fut in (self.media_active, self.disconnected):
                if not fut.done():
                    fut.set_exception(CallerError(msg.get("error", "call failed")))
        elif event == "disconnected":
            self.record.last_status = int(msg.get("status", 0))
            self.record.states.append((0.0, "DISCONNECTED"))
            if not self.media_active.done():
                self.media_active.set_exception(CallerError("call ended before media"))
            if not self.disconnected.done():
                self.disconnected.set_result(None)
        elif event == "stats":
            self.record.rx_packets = int(msg["rx_packets"])

    async def wait_media(self, timeout: float | None = None) -> None:
        await asyncio.wait_for(
            asyncio.shield(self.media_active), units(15) if timeout is None else timeout
        )

    async def hangup(self) -> None:
        await self.worker.send({"op": "hangup", "tag": self.record.tag})

    async def wait_disconnected(self, timeout: float | None = None) -> None:
        try:
            await asyncio.wait_for(
                asyncio.shield(self.disconnected), units(10) if timeout is None else timeout
            )
        except TimeoutError:
            raise CallerError(f"call {self.record.tag} still up") from None


class _Worker:
    def __init__(self, index: int, workdir: Path) -> None:
        self.index = index
        self.workdir = workdir
        self.proc: asyncio.subprocess.Process | None = None
        self.calls: dict[str, RemoteCall] = {}
        self.active = 0
        self._reader: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        err = (self.workdir / "stderr.log").open("wb")
        try:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "harness.phonepool",
                str(self.workdir),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
            )
        finally:
            err.close()
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), units(15))
        if json.loads(line or b"{}").get("event") != "ready":
            raise CallerError(
                f"caller process {self.index} did not start; see {self.workdir / 'stderr.log'}"
            )
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        async for line in self.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                log.warning("caller process %d: not a message: %r", self.index, line[:200])
                continue
            call = self.calls.get(msg.get("tag", ""))
            if call is not None:
                call._event(msg)
                if msg["event"] in ("disconnected", "failed"):
                    self.active -= 1

    async def send(self, msg: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), units(20))
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


class PhonePool(Service):
    """SIP callers in worker processes, enough for *max_calls* at once."""

    def __init__(self, workdir: Path, max_calls: int) -> None:
        count = -(-max_calls // CALLS_PER_PROCESS)
        self.workers = [_Worker(i, workdir / f"caller-{i}") for i in range(count)]

    async def start(self) -> None:
        await asyncio.gather(*(w.start() for w in self.workers))

    async def stop(self) -> None:
        await asyncio.gather(*(w.stop() for w in self.workers))

    async def call(
        self,
        uri: str,
        *,
        tag: str,
        headers: dict[str, str] | None = None,
        record_to: Path | None = None,
        ptime: int | None = None,
    ) -> RemoteCall:
        # A worker whose last calls are still ending may be full for a moment.
        deadline = asyncio.get_running_loop().time() + units(15)
        while (worker := min(self.workers, key=lambda w: w.active)).active >= CALLS_PER_PROCESS:
            if asyncio.get_running_loop().time() > deadline:
                raise CallerError(
                    f"more than {len(self.workers) * CALLS_PER_PROCESS} calls at once"
                )
            await asyncio.sleep(0.05)
        worker.active += 1
        call = RemoteCall(worker, CallRecord(tag=tag, uri=uri, recording=record_to))
        worker.calls[tag] = call
        await worker.send(
            {"op": "call", "uri": uri, "tag": tag, "headers": headers or {}, "ptime": ptime}
        )
        return call


# --- the worker process -------------------------------------------------------------


async def _serve(workdir: Path, channel: IO[str]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    calls: dict[str, SipCall] = {}
    tasks: set[asyncio.Task[None]] = set()

    def emit(msg: dict[str, Any]) -> None:
        channel.write(json.dumps(msg) + "\n")
        channel.flush()

    async def run_call(phone: SipPhone, msg: dict[str, Any]) -> None:
        tag = msg["tag"]
        try:
            call = await phone.call(
                msg["uri"], tag=tag, headers=msg["headers"], ptime=msg.get("ptime")
            )
            calls[tag] = call
            await call.wait_media()
            emit({"tag": tag, "event": "media", "local_rtp": list(call.record.local_rtp or ())})
            await asyncio.shield(call.disconnected)
            emit({"tag": tag, "event": "disconnected", "status": call.record.last_status})
        except Exception as exc:  # reported to the parent, which raises it
            emit({"tag": tag, "event": "failed", "error": str(exc)})

    async with SipPhone(workdir) as phone:
        emit({"event": "ready"})
        while line := await reader.readline():
            msg = json.loads(line)
            if msg["op"] == "call":
                task = asyncio.create_task(run_call(phone, msg))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif msg["op"] == "hangup" and msg["tag"] in calls:
                await calls[msg["tag"]].hangup()
        for call in calls.values():
            with contextlib.suppress(Exception):
                await call.hangup()
        for task in list(tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, units(5))


if __name__ == "__main__":  # pragma: no cover - the worker process
    logging.basicConfig(filename=str(Path(sys.argv[1]) / "worker.log"), level=logging.INFO)
    # The parent reads messages from our stdout. pjlib prints to the process's
    # stdout (at start and at shutdown, whatever its log settings), so the
    # messages get a descriptor of their own and stdout goes to stderr's log.
    messages = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    asyncio.run(_serve(Path(sys.argv[1]), messages))
