"""A real Asterisk process in a sandbox directory.

Started in the foreground (``asterisk -f -n -C <sandbox>/etc/asterisk.conf``)
on free loopback ports, ready when ``core waitfullybooted`` answers, stopped
with ``core stop now`` and then killed. Its console output and ``messages.log``
stay in the sandbox and are shown when something fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from harness import config
from harness.ari import AriSettings
from harness.ports import LOOPBACK, free_port, free_udp_range, port_is_free
from harness.service import Service
from harness.timing import units

log = logging.getLogger(__name__)

#: The ARI user of an instance started with ``ari=True``.
ARI_USER = "harness"

#: Where the Makefile links the builds, relative to the checkout.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The pull request whose build is the mode as submitted upstream (master
#: with the pull requests up to 14b): ``make asterisk-pr-form``.
PR_FORM = "ignored-input-errors"


@dataclasses.dataclass(frozen=True)
class Build:
    """Where a flavour of build is installed, the variable that moves it, and
    the make target that makes it."""

    default: Path
    variable: str
    target: str


BUILDS = {
    "patched": Build(REPO_ROOT / "build" / "asterisk", "ASTERISK_PREFIX", "asterisk"),
    "upstream": Build(
        REPO_ROOT / "build" / "asterisk-upstream", "ASTERISK_UPSTREAM_PREFIX", "asterisk-upstream"
    ),
    "pr": Build(
        REPO_ROOT / "build" / "pr" / PR_FORM / "asterisk",
        "ASTERISK_PR_PREFIX",
        f"asterisk-pr PR={PR_FORM}",
    ),
}


class AsteriskError(RuntimeError):
    """Asterisk could not be started, or failed while running."""


def find_install(flavour: str = "patched") -> Path:
    """The install prefix of a build: ``$ASTERISK_PREFIX`` or ``build/<name>``."""
    build = BUILDS[flavour]
    env = os.environ.get(build.variable)
    path = Path(env) if env else build.default
    binary = path / "sbin" / "asterisk"
    if not binary.exists():
        raise AsteriskError(
            f"no Asterisk build at {path} ({binary} is missing): run 'make {build.target}' first"
        )
    return path


def tail(path: Path, lines: int = 60) -> str:
    """The last *lines* lines of a text file, or a note that it is absent."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


class Asterisk(Service):
    """One sandboxed Asterisk process; an async context manager.

    ``bot_uri`` is where chan_websocket connects for ``Dial(WebSocket/bot/...)``.
    """

    def __init__(
        self,
        install: Path,
        bot_uri: str,
        *,
        sandbox: Path | None = None,
        control_format: str = "plain-text",
        sip_port: int | None = None,
        debug: int | None = None,
        required: tuple[str, ...] = (),
        name: str = "asterisk",
        ari: bool = False,
        wrapper: Sequence[str] = (),
        connect_attempts: int = 1,
    ) -> None:
        """*ari*: ARI on, for :attr:`ari_settings` (and what ARI topologies need);
        *wrapper*: a command Asterisk runs under (valgrind, say), which must
        exec it in the same process; *connect_attempts*: per call, to the bot."""
        self.name = name
        self._own_sip_port = sip_port is None
        self.wrapper = tuple(wrapper)
        self.install = install
        self._own_sandbox = sandbox is None
        # Short path: the control socket's path must fit in sockaddr_un.
        self.sandbox = sandbox or Path(tempfile.mkdtemp(prefix="ast-"))
        if debug is None:
            debug = int(os.environ.get("HARNESS_ASTERISK_DEBUG", "0"))
        rtp_start = free_udp_range(200)
        self.settings = config.AsteriskSettings(
            install=install,
            sandbox=self.sandbox,
            sip_port=sip_port if sip_port is not None else free_port(socket.SOCK_DGRAM),
            http_port=free_port(),
            rtp_start=rtp_start,
            rtp_end=rtp_start + 199,
            bot_uri=bot_uri,
            control_format=control_format,
            debug=debug,
            required=required,
            ari_users=((ARI_USER, secrets.token_hex(8)),) if ari else (),
            connect_attempts=connect_attempts,
        )
        self.process: asyncio.subprocess.Process | None = None
        self._console: Path = self.sandbox / "console.log"
        self.started_at = 0.0

    # --- paths and facts --------------------------------------------------------

    @property
    def binary(self) -> Path:
        return self.install / "sbin" / "asterisk"

    @property
    def env(self) -> dict[str, str]:
        """The environment for Asterisk: its own shared libraries come first."""
        env = dict(os.environ)
        lib = str(self.install / "lib")
        env["LD_LIBRARY_PATH"] = ":".join(filter(None, [lib, env.get("LD_LIBRARY_PATH")]))
        return env

    @property
    def sip_port(self) -> int:
        return self.settings.sip_port

    @property
    def http_uri(self) -> str:
        """Asterisk's HTTP server (ARI, inbound media WebSockets)."""
        return f"http://{self.settings.http_bind}:{self.settings.http_port}"

    @property
    def ari_settings(self) -> AriSettings:
        """How to reach this instance's ARI (started with ``ari=True``)."""
        if not self.settings.ari_users:
            raise AsteriskError(f"{self.name} was started without ARI")
        user, password = self.settings.ari_users[0]
        return AriSettings(self.http_uri, user, password, self.settings.ari_app)

    @property
    def messages_log(self) -> Path:
        return self.settings.logs / "messages.log"

    @property
    def console_log(self) -> Path:
        return self._console

    def log_offset(self) -> int:
        """Where messages.log ends now: :meth:`log_since` reads what comes after."""
        try:
            return self.messages_log.stat().st_size
        except FileNotFoundError:
            return 0

    def log_since(self, offset: int) -> tuple[str, int]:
        """What messages.log got after *offset* (whole lines only), and the new offset."""
        try:
            with self.messages_log.open("rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return "", offset
        end = data.rfind(b"\n") + 1
        return data[:end].decode(errors="replace"), offset + end

    def describe_logs(self, lines: int = 60) -> str:
        """The tails of this instance's logs, for a failure report."""
        return (
            f"--- {self.name}: console ({self._console}) ---\n{tail(self._console, lines)}\n"
            f"--- {self.name}: messages.log ({self.messages_log}) ---\n"
            f"{tail(self.messages_log, lines)}"
        )

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None

    # --- lifecycle ------------------------------------------------------------------

    async def start(self, timeout: float | None = None) -> None:
        """Write the configuration, start Asterisk and wait until fully booted."""
        timeout = units(30) if timeout is None else timeout
        if self._own_sip_port and not port_is_free(self.sip_port, socket.SOCK_DGRAM):
            # Another socket took the port since it was chosen: choose again.
            taken = self.sip_port
            self.settings = dataclasses.replace(
                self.settings, sip_port=free_port(socket.SOCK_DGRAM)
            )
            log.info(
                "%s: SIP port %d was taken meanwhile; using %d", self.name, taken, self.sip_port
            )
        if not port_is_free(self.sip_port, socket.SOCK_DGRAM):
            raise AsteriskError(
                f"{self.name}: SIP port {LOOPBACK}:{self.sip_port}/udp is already in use"
            )
        config.write(self.settings)
        cmd = [*self.wrapper, str(self.binary), "-f", "-n", "-C", str(self.settings.asterisk_conf)]
        log.info("%s: starting %s", self.name, " ".join(cmd))
        console = self._console.open("wb")
        try:
            self.process = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=console,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=self.env,
            )
        finally:
            console.close()
        self.started_at = time.monotonic()
        try:
            await self._wait_booted(timeout)
            await self._check_listening()
        except AsteriskError as exc:
            raise await self._startup_failure(exc) from None
        except BaseException:
            await self.stop()
            raise
        log.info(
            "%s: fully booted in %.2f s (pid %d, SIP %d)",
            self.name,
            time.monotonic() - self.started_at,
            self.process.pid,
            self.sip_port,
        )

    async def _startup_failure(self, exc: AsteriskError) -> AsteriskError:
        """Stop a failed start; prefer the exit status and logs as the reason."""
        proc = self.process
        assert proc is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), units(1))
        if proc.returncode is not None and "exited with status" not in str(exc):
            exc = AsteriskError(
                f"{self.name} exited with status {proc.returncode} while starting\n"
                f"{self.describe_logs()}"
            )
        await self.stop()
        return exc

    async def _wait_booted(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ctl = self.settings.run / "asterisk.ctl"
        while True:
            assert self.process is not None
            if self.process.returncode is not None:
                raise AsteriskError(
                    f"{self.name} exited with status {self.process.returncode} while "
                    f"starting\n{self.describe_logs()}"
                )
            if ctl.exists():
                try:
                    await self.cli("core waitfullybooted", timeout=max(units(1), 0.5))
                    return
                except AsteriskError:
                    pass
            if time.monotonic() > deadline:
                raise AsteriskError(
                    f"{self.name} did not finish booting within {timeout:.0f} s\n"
                    f"{self.describe_logs()}"
                )
            await asyncio.sleep(0.05)

    async def _check_listening(self) -> None:
        """Fail fast if the SIP transport did not bind (port taken, for example)."""
        out = await self.cli("pjsip show transports")
        if f"127.0.0.1:{self.sip_port}" not in out:
            raise AsteriskError(
                f"{self.name}: the SIP transport on 127.0.0.1:{self.sip_port} is not up "
                f"(port in use?)\n{out}\n{self.describe_logs()}"
            )

    async def cli(self, command: str, timeout: float | None = None) -> str:
        """Run a CLI command over the remote console; return its output."""
        timeout = units(10) if timeout is None else timeout
        proc = await asyncio.create_subprocess_exec(
            str(self.binary),
            "-C",
            str(self.settings.asterisk_conf),
            "-rx",
            command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.env,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise AsteriskError(f"{self.name}: CLI '{command}' timed out") from None
        text = out.decode(errors="replace")
        if proc.returncode != 0:
            raise AsteriskError(f"{self.name}: CLI '{command}' failed: {text.strip()}")
        return text

    async def stop(self, timeout: float | None = None) -> int | None:
        """Stop gracefully (``core stop now``), then SIGTERM, then SIGKILL."""
        timeout = units(10) if timeout is None else timeout
        proc = self.process
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(AsteriskError):
                await self.cli("core stop now", timeout=timeout / 2)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    await asyncio.wait_for(proc.wait(), timeout / 2)
                    break
                except TimeoutError:
                    log.warning("%s: still running, sending %s", self.name, sig.name)
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, sig)
            await proc.wait()
        log.info("%s: stopped (status %s)", self.name, proc.returncode)
        return proc.returncode

    def cleanup(self) -> None:
        """Remove the sandbox if this instance created it."""
        if self._own_sandbox:
            shutil.rmtree(self.sandbox, ignore_errors=True)
