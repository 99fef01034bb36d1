"""RTP capture on loopback with scapy, and RTP parsing with scapy's RTP layer.

Capturing needs root or CAP_NET_RAW, and libpcap (Debian's ``libpcap0.8``)
for the BPF filter; :func:`check_capture_possible` says which one is missing.
Timestamps are the kernel's (libpcap), on the wall clock, so they compare
with the bot's event arrival times (``time.time()``).
"""

from __future__ import annotations

import asyncio
import ctypes.util
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.ports import LOOPBACK
from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)

LOOPBACK_IFACE = "lo"


class CaptureError(RuntimeError):
    """Capture is not possible here, or failed."""


@dataclass(frozen=True)
class RtpPacket:
    """One RTP packet as captured: kernel time, addresses, header and payload."""

    t: float
    src: tuple[str, int]
    dst: tuple[str, int]
    sequence: int
    timestamp: int
    ssrc: int
    payload_type: int
    marker: bool
    payload: bytes


def check_capture_possible() -> None:
    """Raise CaptureError saying what to do if capture cannot work here."""
    if ctypes.util.find_library("pcap") is None:
        raise CaptureError("libpcap is missing: run 'apt-get install libpcap0.8' (or 'make setup')")
    if os.geteuid() != 0 and not _has_cap_net_raw():
        raise CaptureError(
            "capturing packets needs root or CAP_NET_RAW: run as root (sudo make test), or "
            "'sudo setcap cap_net_raw+eip $(readlink -f .venv/bin/python)'"
        )


def _has_cap_net_raw() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 13))
    return False


def _scapy() -> Any:
    import scapy.all

    scapy.all.conf.use_pcap = True
    scapy.all.conf.verb = 0
    return scapy.all


def parse_rtp(packets: Any) -> list[RtpPacket]:
    """Parse captured UDP packets as RTP with scapy's RTP layer.

    Packets that are not UDP, or too short to be RTP, are skipped.
    """
    from scapy.layers.inet import IP, UDP
    from scapy.layers.rtp import RTP

    result: list[RtpPacket] = []
    for pkt in packets:
        if UDP not in pkt or IP not in pkt:
            continue
        raw = bytes(pkt[UDP].payload)
        if len(raw) < 12:
            continue
        rtp = RTP(raw)
        if rtp.version != 2:
            continue
        result.append(
            RtpPacket(
                t=float(pkt.time),
                src=(pkt[IP].src, int(pkt[UDP].sport)),
                dst=(pkt[IP].dst, int(pkt[UDP].dport)),
                sequence=int(rtp.sequence),
                timestamp=int(rtp.timestamp),
                ssrc=int(rtp.sourcesync),
                payload_type=int(rtp.payload_type),
                marker=bool(rtp.marker),
                payload=bytes(rtp.payload),
            )
        )
    return result


def read_pcap(path: Path) -> list[RtpPacket]:
    """Read a pcap file and parse its RTP."""
    sc = _scapy()
    return parse_rtp(sc.rdpcap(str(path)))


def interface_to(peer: str) -> str:
    """The network interface packets from *peer* (an IP address) arrive on."""
    if peer.startswith("127."):
        return LOOPBACK_IFACE
    iface, _, _ = _scapy().conf.route.route(peer)
    return str(iface)


class RtpCapture(Service):
    """Capture UDP on loopback matching *bpf*; an async context manager.

    ``packets`` (parsed RTP) is available after :meth:`stop`; the raw capture
    is written to *pcap* if given.
    """

    def __init__(
        self,
        bpf: str,
        *,
        pcap: Path | None = None,
        iface: str = LOOPBACK_IFACE,
        linger: float = 0.3,
    ) -> None:
        self.bpf = bpf
        self.linger = linger
        self.pcap = pcap
        self.iface = iface
        self._sniffer: Any = None
        self.packets: list[RtpPacket] = []
        self.raw_count = 0

    @classmethod
    def to_port(
        cls, port: int, *, host: str = LOOPBACK, peer: str = LOOPBACK, pcap: Path | None = None
    ) -> RtpCapture:
        """Capture the UDP packets sent to *host*:*port*, on the interface facing *peer*."""
        return cls(
            f"udp and dst host {host} and dst port {port}", pcap=pcap, iface=interface_to(peer)
        )

    async def start(self) -> None:
        check_capture_possible()
        sc = _scapy()
        started = threading.Event()
        self._sniffer = sc.AsyncSniffer(
            iface=self.iface, filter=self.bpf, store=True, started_callback=started.set
        )
        try:
            self._sniffer.start()
        except Exception as exc:
            raise CaptureError(f"cannot capture on {self.iface} ({self.bpf}): {exc}") from exc
        ok = await asyncio.to_thread(started.wait, units(5))
        if not ok:
            raise CaptureError(f"capture on {self.iface} did not start")
        log.debug("capture: started on %s (%s)", self.iface, self.bpf)

    async def stop(self) -> list[RtpPacket]:
        if self._sniffer is None:
            return self.packets
        # libpcap hands packets over in batches: let the last ones through.
        await asyncio.sleep(self.linger)
        sniffer, self._sniffer = self._sniffer, None
        raw = await asyncio.to_thread(sniffer.stop)
        self.raw_count = len(raw)
        if self.pcap is not None:
            sc = _scapy()
            self.pcap.parent.mkdir(parents=True, exist_ok=True)
            sc.wrpcap(str(self.pcap), raw)
        self.packets = parse_rtp(raw)
        log.debug("capture: %d packets, %d RTP", self.raw_count, len(self.packets))
        return self.packets
