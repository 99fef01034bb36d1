"""WebSocket messages decoded from a capture the test builds itself."""

from __future__ import annotations

import os

from scapy.layers.inet import IP, TCP
from scapy.packet import Packet

from harness.pcap import websocket_messages


def masked_text(text: str) -> bytes:
    data = text.encode()
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    return bytes([0x81, 0x80 | len(data)]) + mask + body


def segment(sport: int, seq: int, payload: bytes, t: float) -> Packet:
    pkt = IP(src="127.0.0.1", dst="127.0.0.1") / TCP(sport=sport, dport=9000, seq=seq) / payload
    pkt.time = t
    return pkt


def test_messages_are_reassembled_and_timed_by_the_completing_segment() -> None:
    upgrade = b"GET /media?call=x HTTP/1.1\r\nHost: a\r\n\r\n"
    first = masked_text("MARK_PLAYED seq:1 played_ms:20 queued_ms:0 id:a")
    second = masked_text("MEDIA_XON")
    stream = upgrade + first + second
    cut = len(upgrade) + 10  # the first message spans two segments
    packets = [
        segment(5555, 1000, stream[:cut], 1.0),
        segment(5555, 1000 + cut, stream[cut:], 2.0),
        segment(5555, 1000, stream[:cut], 3.0),  # a retransmission
        segment(6666, 1, b"GET / HTTP/1.1\r\n\r\n" + masked_text("QUEUE_DRAINED"), 4.0),
        IP() / TCP(sport=9000, dport=5555) / b"server to client, ignored",
    ]
    messages = websocket_messages(packets, 9000)
    assert [(m.text, m.t) for m in messages[5555]] == [
        ("MARK_PLAYED seq:1 played_ms:20 queued_ms:0 id:a", 2.0),
        ("MEDIA_XON", 2.0),
    ]
    assert [m.text for m in messages[6666]] == ["QUEUE_DRAINED"]
