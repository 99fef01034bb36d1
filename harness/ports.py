"""Free loopback ports, chosen at start rather than fixed, and local addresses."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """Return a port that was free on loopback a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def port_is_free(port: int, kind: int = socket.SOCK_STREAM) -> bool:
    """Whether *port* can be bound on loopback now."""
    with socket.socket(socket.AF_INET, kind) as s:
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return False
        return True


def ephemeral_low(default: int = 32768) -> int:
    """The first port of the kernel's ephemeral range (``ip_local_port_range``):
    where a socket bound to port 0, or connecting, gets its port."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return default


def free_udp_range(size: int, *, low: int = 20000, high: int | None = None, tries: int = 50) -> int:
    """Return the even first port of *size* consecutive UDP ports that are free.

    RTP uses even ports; Asterisk picks inside the range it is given. By
    default the range lies below the kernel's ephemeral ports, so that no
    socket bound to port 0 (a SIP phone's RTP, a port :func:`free_port`
    chose for another Asterisk's SIP) can be in it, nor it take one of theirs.
    """
    if high is None:
        high = ephemeral_low()
        if high - low < 4 * size:  # an unusual ephemeral range: share it
            high = 60000
    rng = random.Random()
    for _ in range(tries):
        start = rng.randrange(low, high - size) & ~1
        if all(port_is_free(p, socket.SOCK_DGRAM) for p in range(start, start + size)):
            return start
    raise OSError(f"no {size} consecutive free UDP ports on {LOOPBACK} after {tries} tries")


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port); ValueError that names the text if it is not."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT, like 0.0.0.0:8765, not {text!r}")
    return host, int(port)


def source_address(host: str) -> str:
    """The local address this machine sends from to reach *host* (no packet is sent)."""
    try:
        addr = socket.gethostbyname(host)
    except OSError as exc:
        raise OSError(f"cannot resolve {host!r}: {exc}") from exc
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((addr, 9))
        local: str = s.getsockname()[0]
        return local
