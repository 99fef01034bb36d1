"""A test host of our own: a network namespace joined to this one by a veth pair.

The bot listens inside the namespace, so chan_websocket reaches it across a
real link whose traffic can be shaped in each direction: packets dropped at
random (loss), all of them (a black hole: no reset, nothing), or held for a
delay with jitter. ``tc netem`` would do all of it, but this machine's kernel
has no netem qdisc ("Specified qdisc kind is unknown") and no nftables
queue, so iptables rules drop packets (the statistic match), and a delay goes
through NFQUEUE to :class:`DelayQueue` (fnfqueue). Needs root (``ip netns``,
``iptables-legacy``).

Each direction is shaped where its packets arrive, as a network between two
hosts would delay them: towards the bot in the namespace's INPUT chain, back
in a chain of this namespace's (``AMK-<pid>-<tag>``, reached from INPUT for the
link's interface only). Holding packets at the sender instead would throttle
the sender's own TCP: Linux does not send more while a socket's earlier
packets are still held (TCP small queues, autocorking), so a command sent
just after audio would wait for the audio's delay to end too.

Everything is removed by :meth:`NetNs.stop`, also after a failure, and
:func:`remove_stale` removes what a killed run left behind (names start with
:data:`PREFIX`, chains with :data:`CHAIN_PREFIX`, then the maker's pid: a
live run's are left alone).
"""

from __future__ import annotations

import asyncio
import ctypes
import heapq
import itertools
import logging
import os
import random
import secrets
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from harness.service import Service

log = logging.getLogger(__name__)

#: Every namespace and link this module makes is named with it.
PREFIX = "amk"
#: The iptables chains this module makes here (for the traffic back).
CHAIN_PREFIX = "AMK-"
CLONE_NEWNET = 0x40000000
#: The NFQUEUE number of the delay towards the namespace (in it).
QUEUE_TO_NS = 1
#: NFQUEUE numbers of delays back (here, one per namespace): this plus 1..250.
QUEUE_TO_HOST_BASE = 31000
IPTABLES = ("iptables-legacy", "-w")
T = TypeVar("T")


class NetNsError(RuntimeError):
    """A namespace, link or qdisc could not be set up."""


def check_possible() -> None:
    """Raise NetNsError saying what is missing to make namespaces here."""
    if os.geteuid() != 0:
        raise NetNsError("network namespaces need root (ip netns add, iptables)")
    for tool, package in (("ip", "iproute2"), ("iptables-legacy", "iptables")):
        if shutil.which(tool) is None:
            raise NetNsError(f"'{tool}' is not installed (Debian: apt-get install {package})")


def _run(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetNsError(f"{' '.join(args)}: {proc.stderr.strip() or proc.returncode}")
    return proc.stdout


def _owner_alive(name: str, prefix: str) -> bool:
    """Whether the process named in *name* (``<prefix><pid>-<tag>``) still runs."""
    pid, sep, _ = name[len(prefix) :].partition("-")
    if not sep or not pid.isdigit():
        return False  # an older name, without its owner
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale() -> list[str]:
    """Remove the namespaces, links and chains of runs that did not clean up.

    Each name carries its maker's pid: what a running process made is left
    alone, so a test run beside a benchmark does not undo the benchmark's link.
    """
    removed = []
    alive_tags = set()
    for line in _run("ip", "netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        if _owner_alive(name, PREFIX):
            alive_tags.add(name.rpartition("-")[2])
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        removed.append(name)
    for line in _run("ip", "-o", "link", "show").splitlines():
        parts = line.split(":")
        if len(parts) > 1:
            link = parts[1].strip().split("@")[0]
            host = f"{PREFIX}h"
            if link.startswith(host) and link[len(host) :] not in alive_tags:
                subprocess.run(["ip", "link", "del", link], capture_output=True, check=False)
                removed.append(link)
    stale_chains = [
        parts[1]
        for line in _run(*IPTABLES, "-S").splitlines()
        if (parts := line.split())[:1] == ["-N"]
        and parts[1].startswith(CHAIN_PREFIX)
        and not _owner_alive(parts[1], CHAIN_PREFIX)
    ]
    for line in _run(*IPTABLES, "-S").splitlines():
        parts = line.split()
        if parts[:1] == ["-A"] and "-j" in parts and parts[parts.index("-j") + 1] in stale_chains:
            subprocess.run([*IPTABLES, "-D", *parts[1:]], capture_output=True, check=False)
    for chain in stale_chains:
        subprocess.run([*IPTABLES, "-F", chain], capture_output=True, check=False)
        subprocess.run([*IPTABLES, "-X", chain], capture_output=True, check=False)
        removed.append(chain)
    if removed:
        log.info("netns: removed stale %s", ", ".join(removed))
    return removed


@dataclass(frozen=True)
class Shape:
    """What happens to the packets of one direction of the link."""

    loss_percent: float = 0.0
    blackhole: bool = False
    delay_ms: int = 0
    jitter_ms: int = 0

    @classmethod
    def loss(cls, percent: float) -> Shape:
        return cls(loss_percent=percent)

    @classmethod
    def black_hole(cls) -> Shape:
        return cls(blackhole=True)

    @classmethod
    def delay(cls, ms: int, jitter_ms: int = 0, loss_percent: float = 0.0) -> Shape:
        return cls(delay_ms=ms, jitter_ms=jitter_ms, loss_percent=loss_percent)

    def rules(self, queue: int) -> list[list[str]]:
        """iptables rule specifications for this direction (*queue*: its NFQUEUE)."""
        if self.blackhole:
            return [["-j", "DROP"]]
        rules = []
        if self.loss_percent:
            probability = f"{self.loss_percent / 100:.4f}"
            rules.append(["-m", "statistic", "--mode", "random", "--probability", probability])
            rules[-1] += ["-j", "DROP"]
        if self.delay_ms or self.jitter_ms:
            rules.append(["-j", "NFQUEUE", "--queue-num", str(queue), "--queue-bypass"])
        return rules


class NetNs(Service):
    """A namespace with one veth link to this one: ``host_ip`` here, ``ns_ip`` there."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        # The maker's pid in the names: remove_stale() spares a live run's.
        self.name = f"{PREFIX}{os.getpid()}-{tag}"
        # Interface names: at most 15 characters.
        self.host_if = f"{PREFIX}h{tag}"
        self.ns_if = f"{PREFIX}n{tag}"
        octet = int(tag[:2], 16) % 250 + 1
        self.host_ip = f"10.213.{octet}.1"
        self.ns_ip = f"10.213.{octet}.2"
        self.chain = f"{CHAIN_PREFIX}{os.getpid()}-{tag}"
        self.queue_to_host = QUEUE_TO_HOST_BASE + octet
        self._made: list[str] = []
        self._delays: dict[int, DelayQueue] = {}

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
        _run(*IPTABLES, "-N", self.chain)
        self._made.append("chain")
        _run(*IPTABLES, "-I", "INPUT", "-i", self.host_if, "-j", self.chain)
        log.info("netns: %s up (%s here, %s there)", self.name, self.host_ip, self.ns_ip)

    async def stop(self) -> None:
        await asyncio.to_thread(self._stop)

    def _stop(self) -> None:
        for delay in self._delays.values():
            delay.stop()
        self._delays.clear()
        if "chain" in self._made:
            for args in (
                ("-D", "INPUT", "-i", self.host_if, "-j", self.chain),
                ("-F", self.chain),
                ("-X", self.chain),
            ):
                subprocess.run([*IPTABLES, *args], capture_output=True, check=False)
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
        for queue, shape, there in (
            (QUEUE_TO_NS, to_ns, True),
            (self.queue_to_host, to_host, False),
        ):
            old = self._delays.pop(queue, None)
            if old is not None:
                old.stop()
            if (shape.delay_ms or shape.jitter_ms) and not shape.blackhole:
                delay = DelayQueue(self, queue, shape.delay_ms, shape.jitter_ms, in_ns=there)
                delay.start()
                self._delays[queue] = delay
        ipt = ["ip", "netns", "exec", self.name, *IPTABLES]
        _run(*ipt, "-F", "INPUT")
        _run(*IPTABLES, "-F", self.chain)
        for rule in to_ns.rules(QUEUE_TO_NS):
            _run(*ipt, "-A", "INPUT", "-i", self.ns_if, *rule)
        for rule in to_host.rules(self.queue_to_host):
            _run(*IPTABLES, "-A", self.chain, *rule)
        log.info("netns: %s shaped: to it %s, back %s", self.name, to_ns, to_host)

    def listening_socket(self, port: int = 0) -> socket.socket:
        """A TCP socket listening on the namespace's address (made in the namespace)."""

        def make() -> socket.socket:
            # IPPROTO_TCP named, as getaddrinfo would: asyncio sets TCP_NODELAY
            # on the accepted connections only then (else Nagle holds each
            # small message back until the last one is acknowledged).
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.ns_ip, port))
            sock.listen(16)
            sock.setblocking(False)
            return sock

        return self.inside(make)

    def inside(self, make: Callable[[], T]) -> T:
        """Call *make* in a thread that has entered the namespace, and return what it made.

        A socket made there stays in the namespace; so do threads it starts.
        """
        result: list[Any] = []
        thread = threading.Thread(target=self._inside, args=(make, result), daemon=True)
        thread.start()
        thread.join()
        made = result[0]
        if isinstance(made, BaseException):
            raise NetNsError(f"in {self.name}: {made}") from made
        return made  # type: ignore[no-any-return]

    def _inside(self, make: Callable[[], object], result: list[object]) -> None:
        """The thread of :meth:`inside`: enter, make, leave (the thread ends anyway)."""
        libc = ctypes.CDLL(None, use_errno=True)
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the namespace")
            try:
                result.append(make())
            finally:
                libc.setns(home, CLONE_NEWNET)
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)
        finally:
            os.close(home)
            os.close(target)


class DelayQueue:
    """Holds each packet of an NFQUEUE for a delay with jitter, then lets it go.

    What ``tc netem delay`` would do where there is no netem: iptables queue
    the packets (``NFQUEUE --queue-num N --queue-bypass``), and a netlink
    connection made in the same namespace (fnfqueue) gives each its verdict
    when its time has come. Jitter can reorder packets, as netem's does.
    """

    def __init__(
        self, ns: NetNs, queue: int, delay_ms: int, jitter_ms: int, *, in_ns: bool = True
    ) -> None:
        """*in_ns*: the queue is the namespace's (else this namespace's)."""
        self.ns = ns
        self.in_ns = in_ns
        self.queue = queue
        self.delay = delay_ms / 1000
        self.jitter = jitter_ms / 1000
        self._rng = random.Random(queue)
        self._held: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._ready = threading.Condition()
        self._conn: Any = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self.packets = 0

    def start(self) -> None:
        try:
            import fnfqueue
        except ImportError as exc:
            raise NetNsError("a delay needs fnfqueue (pip install fnfqueue)") from exc

        def connect() -> Any:
            conn = fnfqueue.Connection()
            queue = conn.bind(self.queue)
            queue.set_mode(0xFFFF, fnfqueue.COPY_META)
            return conn

        self._conn = self.ns.inside(connect) if self.in_ns else connect()
        for target in (self._receive, self._release):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info(
            "netns: delay %s ms +- %s ms on queue %d",
            self.delay * 1000,
            self.jitter * 1000,
            self.queue,
        )

    def _receive(self) -> None:
        try:
            for packet in self._conn:
                hold = max(0.0, self.delay + self._rng.uniform(-self.jitter, self.jitter))
                with self._ready:
                    heapq.heappush(self._held, (time.monotonic() + hold, next(self._order), packet))
                    self.packets += 1
                    self._ready.notify()
        except Exception as exc:  # the connection closed, or overflowed
            if not self._stopping:
                log.warning("netns: delay queue %d stopped: %s", self.queue, exc)

    def _release(self) -> None:
        while True:
            with self._ready:
                while not self._stopping and (
                    not self._held or self._held[0][0] > time.monotonic()
                ):
                    wait = self._held[0][0] - time.monotonic() if self._held else None
                    self._ready.wait(wait)
                if self._stopping:
                    return
                _, _, packet = heapq.heappop(self._held)
            try:
                packet.accept()
            except Exception as exc:  # the connection closed under us
                log.debug("netns: delay queue %d: %s", self.queue, exc)

    def stop(self) -> None:
        """Let every held packet go and stop (packets no longer queued pass: bypass)."""
        with self._ready:
            self._stopping = True
            held, self._held = self._held, []
            self._ready.notify_all()
        for _, _, packet in held:
            try:
                packet.accept()
            except Exception as exc:  # the connection closed under us
                log.debug("netns: delay queue %d: %s", self.queue, exc)
        if self._conn is not None:
            self._conn.close()
        for thread in self._threads:
            thread.join(timeout=2)
