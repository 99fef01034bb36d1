"""A test host of our own: a network namespace joined to this one by a veth pair.

The bot listens inside the namespace, so chan_websocket reaches it across a
real link whose traffic can be shaped in each direction: packets dropped at
random (loss), all of them (a black hole: no reset, nothing), or held for a
delay with jitter. ``tc netem`` would do all of it, but this machine's kernel
has no netem qdisc ("Specified qdisc kind is unknown"), so the namespace's
own nftables drop packets, and delays go through NFQUEUE to
:mod:`harness.delayq`. Needs root (``ip netns``, ``nft``).

Everything is removed by :meth:`NetNs.stop`, also after a failure, and
:func:`remove_stale` removes what a killed run left behind (names start with
:data:`PREFIX`).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass

from harness.service import Service

log = logging.getLogger(__name__)

#: Every namespace and link this module makes is named with it.
PREFIX = "amk"
CLONE_NEWNET = 0x40000000


class NetNsError(RuntimeError):
    """A namespace, link or qdisc could not be set up."""


def check_possible() -> None:
    """Raise NetNsError saying what is missing to make namespaces here."""
    if os.geteuid() != 0:
        raise NetNsError("network namespaces need root (ip netns add, nft)")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            raise NetNsError(f"'{tool}' is not installed (Debian: apt-get install {package})")


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetNsError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def remove_stale() -> list[str]:
    """Remove the namespaces (and so their links) of runs that did not clean up."""
    removed = []
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
            removed.append(name)
    for line in _run("ip", "-o", "link", "show").splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            if link.startswith(f"{PREFIX}h"):
                subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
                removed.append(link)
    if removed:
        log.info("netns: removed stale %s", ", ".join(removed))
    return removed


@dataclass(frozen=True)
class Shape:
    """What happens to the packets of one direction of the link."""

    loss_percent: float = 0.0
    blackhole: bool = False

    @classmethod
    def loss(cls, percent: float) -> Shape:
        return cls(loss_percent=percent)

    @classmethod
    def black_hole(cls) -> Shape:
        return cls(blackhole=True)

    def rules(self) -> list[str]:
        """nftables statements for a chain of this direction."""
        if self.blackhole:
            return ["drop"]
        if self.loss_percent:
            return [f"numgen random mod 10000 < {round(self.loss_percent * 100)} drop"]
        return []


class NetNs(Service):
    """A namespace with one veth link to this one: ``host_ip`` here, ``ns_ip`` there."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        self.name = f"{PREFIX}{tag}"
        # Interface names: at most 15 characters.
        self.host_if = f"{PREFIX}h{tag}"
        self.ns_if = f"{PREFIX}n{tag}"
        octet = int(tag[:2], 16) % 250 + 1
        self.host_ip = f"10.213.{octet}.1"
        self.ns_ip = f"10.213.{octet}.2"
        self._made: list[str] = []

    async def start(self) -> None:
        check_possible()
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        _run("ip", "netns", "add", self.name)
        self._made.append("netns")
        _run("ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if)
        self._made.append("link")
        _run("ip", "link", "set", self.ns_if, "netns", self.name)
        _run("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if)
        _run("ip", "link", "set", self.host_if, "up")
        _run("ip", "-n", self.name, "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if)
        _run("ip", "-n", self.name, "link", "set", self.ns_if, "up")
        _run("ip", "-n", self.name, "link", "set", "lo", "up")
        log.info("netns: %s up (%s here, %s there)", self.name, self.host_ip, self.ns_ip)

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        if "link" in self._made:
            subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, check=False)
        if "netns" in self._made:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        self._made.clear()
        log.info("netns: %s removed", self.name)

    async def shape(self, to_ns: Shape = Shape(), to_host: Shape = Shape()) -> None:
        """Shape the traffic towards the namespace and back (replaces any earlier)."""
        await asyncio.to_thread(self._shape, to_ns, to_host)

    def _shape(self, to_ns: Shape, to_host: Shape) -> None:
        lines = [
            "table inet amk {}",
            "flush table inet amk",
            "table inet amk {",
            "  chain in { type filter hook input priority 0; policy accept;",
            *(f"    iifname {self.ns_if} {rule}" for rule in to_ns.rules()),
            "  }",
            "  chain out { type filter hook output priority 0; policy accept;",
            *(f"    oifname {self.ns_if} {rule}" for rule in to_host.rules()),
            "  }",
            "}",
        ]
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, "nft", "-f", "-"],
            input="\n".join(lines) + "\n",
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise NetNsError(f"nft in {self.name}: {proc.stderr.strip()}")
        log.info("netns: %s shaped: to it %s, back %s", self.name, to_ns, to_host)

    def listening_socket(self, port: int = 0) -> socket.socket:
        """A TCP socket listening on the namespace's address (made in the namespace)."""
        result: list[socket.socket | BaseException] = []
        thread = threading.Thread(target=self._make_socket, args=(port, result))
        thread.start()
        thread.join()
        made = result[0]
        if isinstance(made, BaseException):
            raise NetNsError(f"cannot listen in {self.name}: {made}") from made
        return made

    def _make_socket(self, port: int, result: list[socket.socket | BaseException]) -> None:
        """In a thread of its own: enter the namespace, make the socket, leave."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the namespace")
            try:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.ns_ip, port))
                sock.listen(16)
                sock.setblocking(False)
                result.append(sock)
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back")
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)
        finally:
            os.close(home)
            os.close(target)
