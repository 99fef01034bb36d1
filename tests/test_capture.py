"""RTP capture on loopback, on packets this test sends itself."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from pathlib import Path

from scapy.layers.rtp import RTP

from harness import audio
from harness.capture import RtpCapture, parse_rtp, read_pcap
from harness.ports import free_port


async def test_capture_parses_rtp_with_kernel_timestamps(capture_ok: None, tmp_path: Path) -> None:
    port = free_port(socket.SOCK_DGRAM)
    pcap = tmp_path / "rtp.pcap"
    cap = RtpCapture.to_port(port, pcap=pcap)
    await cap.start()
    sent_at = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"not rtp", ("127.0.0.1", port))
        for i in range(10):
            rtp = RTP(payload_type=0, sequence=1000 + i, timestamp=160 * i, sourcesync=0xBEEF)
            s.sendto(bytes(rtp / audio.tagged_frame(i)), ("127.0.0.1", port))
            sent_at.append(time.time())
            await asyncio.sleep(0.005)
        # Another port: the filter must leave it out.
        s.sendto(bytes(RTP(sequence=1) / (b"x" * 20)), ("127.0.0.1", free_port(socket.SOCK_DGRAM)))
    await asyncio.sleep(0.2)
    packets = await cap.stop()
    assert cap.raw_count == 11
    assert [p.sequence for p in packets] == list(range(1000, 1010))
    assert [audio.frame_index(p.payload) for p in packets] == list(range(10))
    assert all(p.ssrc == 0xBEEF and p.payload_type == 0 for p in packets)
    assert all(p.dst[1] == port for p in packets)
    # Kernel timestamps: in order, and within a few ms of when we sent.
    assert all(a.t <= b.t for a, b in itertools.pairwise(packets))
    assert all(abs(p.t - t) < 0.05 for p, t in zip(packets, sent_at, strict=True))
    # The pcap file holds the same packets.
    assert [p.sequence for p in read_pcap(pcap)] == list(range(1000, 1010))


def test_parse_rtp_skips_non_rtp() -> None:
    from scapy.layers.inet import IP, UDP

    packets = [
        IP() / UDP() / b"short",
        IP() / UDP() / (b"\x00" * 20),  # version 0
        IP() / UDP() / RTP(sequence=5) / b"abc",
    ]
    parsed = parse_rtp(packets)
    assert [p.sequence for p in parsed] == [5]
    assert parsed[0].payload == b"abc"
