"""Capture to a pcap file with tcpdump, analyse after the call.

Under load, capturing in the harness's own process would compete with the
calls it measures; tcpdump writes the packets to a file and scapy reads them
afterwards. Besides the RTP, the capture holds the WebSocket traffic between
Asterisk and the bot, so an event's departure from Asterisk is known from the
kernel too, not only its arrival in the bot's event loop: the TCP stream is
reassembled and its frames decoded with the ``websockets`` library's sans-I/O
protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from harness.capture import CaptureError, RtpPacket, check_capture_possible, parse_rtp
from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WsMessage:
    """A WebSocket TEXT message seen on the wire, with the kernel time of the
    TCP segment that completed it."""

    t: float
    client_port: int
    text: str


class TcpdumpCapture(Service):
    """tcpdump on loopback writing *pcap*; an async context manager."""

    def __init__(self, bpf: str, pcap: Path, *, iface: str = "lo") -> None:
        self.bpf = bpf
        self.pcap = pcap
        self.iface = iface
        self._proc: asyncio.subprocess.Process | None = None
        self._stderr = pcap.with_suffix(".tcpdump.log")

    async def start(self) -> None:
        check_capture_possible()
        tcpdump = shutil.which("tcpdump")
        if tcpdump is None:
            raise CaptureError(
                "tcpdump is missing: run 'apt-get install tcpdump' (or 'make setup')"
            )
        self.pcap.parent.mkdir(parents=True, exist_ok=True)
        err = self._stderr.open("wb")
        try:
            self._proc = await asyncio.create_subprocess_exec(
                tcpdump,
                "-i",
                self.iface,
                "-n",
                "-s",
                "0",
                "-B",
                "16384",
                "--immediate-mode",
                "-U",
                "-w",
                str(self.pcap),
                self.bpf,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,
            )
        finally:
            err.close()
        # tcpdump says "listening on lo" once the filter is in place.
        for _ in range(int(units(5) / 0.02)):
            if b"listening on" in self._stderr.read_bytes():
                return
            if self._proc.returncode is not None:
                break
            await asyncio.sleep(0.02)
        await self.stop()
        raise CaptureError(f"tcpdump did not start: {self._stderr.read_text(errors='replace')}")

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.returncode is None:
            await asyncio.sleep(0.2)  # let the last packets reach the file
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
            try:
                await asyncio.wait_for(proc.wait(), units(5))
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        stats = self._stderr.read_text(errors="replace")
        if "dropped by kernel" in stats and " 0 packets dropped by kernel" not in stats:
            log.warning("tcpdump dropped packets: %s", stats.strip().splitlines()[-1])


def read_packets(pcap: Path) -> Any:
    """All packets of a pcap file (scapy)."""
    import scapy.all

    return scapy.all.rdpcap(str(pcap))


def read_and_remove(pcap: Path) -> Any:
    """The packets of *pcap*; the file and tcpdump's log are removed."""
    packets = read_packets(pcap)
    pcap.unlink(missing_ok=True)
    pcap.with_suffix(".tcpdump.log").unlink(missing_ok=True)
    return packets


def rtp_by_destination(packets: Any) -> dict[int, list[RtpPacket]]:
    """The RTP in *packets*, grouped by destination port (one caller each)."""
    groups: dict[int, list[RtpPacket]] = defaultdict(list)
    for rtp in parse_rtp(packets):
        groups[rtp.dst[1]].append(rtp)
    return dict(groups)


def websocket_messages(packets: Any, server_port: int) -> dict[int, list[WsMessage]]:
    """TEXT messages sent to the WebSocket server on *server_port*, per client port.

    Each TCP stream towards the server is put back in sequence order
    (retransmissions dropped), its HTTP upgrade request skipped, and the rest
    fed to a server-side ``websockets`` protocol, which unmasks and reassembles
    the frames.
    """
    from scapy.layers.inet import IP, TCP

    streams: dict[int, list[tuple[int, float, bytes]]] = defaultdict(list)
    for pkt in packets:
        if TCP not in pkt or IP not in pkt or int(pkt[TCP].dport) != server_port:
            continue
        payload = bytes(pkt[TCP].payload)
        if payload:
            streams[int(pkt[TCP].sport)].append((int(pkt[TCP].seq), float(pkt.time), payload))

    result: dict[int, list[WsMessage]] = {}
    for port, segments in streams.items():
        result[port] = _decode_stream(port, segments)
    return result


def _decode_stream(port: int, segments: list[tuple[int, float, bytes]]) -> list[WsMessage]:
    segments.sort(key=lambda s: (s[0], s[1]))
    messages: list[WsMessage] = []
    protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=None)
    handshake = b""
    in_handshake = True
    next_seq: int | None = None
    for seq, t, segment in segments:
        end = seq + len(segment)
        fresh = segment
        if next_seq is not None:
            if end <= next_seq:
                continue  # a retransmission of bytes already taken
            if seq < next_seq:
                fresh = segment[next_seq - seq :]
        next_seq = end
        if in_handshake:
            handshake += fresh
            header_end = handshake.find(b"\r\n\r\n")
            if header_end < 0:
                continue
            in_handshake = False
            fresh = handshake[header_end + 4 :]
        protocol.receive_data(fresh)
        for event in protocol.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                text = bytes(event.data).decode(errors="replace")
                messages.append(WsMessage(t, port, text))
    return messages
