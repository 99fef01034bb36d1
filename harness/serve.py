"""Run the patched Asterisk as a service, configured from the environment.

The entry point of the Docker image's ``asterisk`` service (and usable on a
host): ``python3 -m harness.serve`` renders the same configuration as the
tests' sandboxes (:mod:`harness.config`), with the values below taken from the
environment, then replaces itself with ``asterisk -f``. Every module the
install has is loaded, as in a deployment. ``--check`` renders and prints the
settings without starting Asterisk. Only the standard library is needed, so
the runtime image has no virtualenv.

=====================  ==========================  ====================================
variable               default                     meaning
=====================  ==========================  ====================================
ASTERISK_PREFIX        /opt/asterisk-marks         the installed Asterisk
ASTERISK_SANDBOX       /srv/asterisk               configuration, state and logs
SIP_BIND               0.0.0.0                     address SIP and RTP listen on
SIP_PORT               5060                        SIP over UDP
RTP_START, RTP_END     10000, 10099                RTP port range
BOT_URI                ws://bot:8765/media         extension ``bot`` dials this bot
HARNESS_BOT_URI        (unset)                     extension ``harness`` dials this one
CONTROL_FORMAT         plain-text                  or ``json``
EXTERNAL_ADDRESS       (unset)                     address phones outside LOCAL_NET use
LOCAL_NET              private ranges              networks reached without rewriting
SIP_PASSWORD           (unset)                     if set, user ``caller`` must use it
ARI_USER, ARI_PASSWORD (unset)                     an ARI user; ARI is off without one
ARI_APP                voicebot                    extension ``ari`` runs Stasis(ARI_APP)
HTTP_BIND              0.0.0.0 with ARI, else      Asterisk's HTTP server (ARI, inbound
                       127.0.0.1                   WebSocket connections)
HTTP_PORT              8088                        its port
ASTERISK_DEBUG         0                           Asterisk's debug level
=====================  ==========================  ====================================
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from harness import config
from harness.ports import LOOPBACK

log = logging.getLogger("harness.serve")

DEFAULTS = {
    "ASTERISK_PREFIX": "/opt/asterisk-marks",
    "ASTERISK_SANDBOX": "/srv/asterisk",
    "SIP_BIND": "0.0.0.0",
    "SIP_PORT": "5060",
    "RTP_START": "10000",
    "RTP_END": "10099",
    "BOT_URI": "ws://bot:8765/media",
    "CONTROL_FORMAT": "plain-text",
    "LOCAL_NET": "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16",
    "ASTERISK_DEBUG": "0",
    "ARI_APP": "voicebot",
    "HTTP_PORT": "8088",
}
#: The extension (and connection) of ``HARNESS_BOT_URI``: the test runner's bot.
HARNESS_BOT = "harness"
#: Names Asterisk takes as an ARI user or a Stasis application.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class ConfigError(ValueError):
    """The environment does not describe a usable configuration."""


def _port(env: Mapping[str, str], name: str, problems: list[str]) -> int:
    text = env[name]
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        problems.append(f"{name}={text!r}: expected a port number, 1 to 65535")
        return 0
    return int(text)


def _uri(env: Mapping[str, str], name: str, problems: list[str]) -> str:
    text = env[name]
    parts = urlsplit(text)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        problems.append(f"{name}={text!r}: expected a ws:// or wss:// URI with a host")
    return text


def _address(env: Mapping[str, str], name: str, problems: list[str]) -> str:
    text = env[name]
    try:
        ipaddress.ip_address(text)
    except ValueError:
        problems.append(f"{name}={text!r}: expected an IP address")
    return text


def settings_from_env(environ: Mapping[str, str]) -> config.AsteriskSettings:
    """The settings the environment asks for; every problem in one :class:`ConfigError`."""
    env = {**DEFAULTS, **{k: v for k, v in environ.items() if v != ""}}
    problems: list[str] = []
    sip_port = _port(env, "SIP_PORT", problems)
    rtp_start = _port(env, "RTP_START", problems)
    rtp_end = _port(env, "RTP_END", problems)
    if rtp_start and rtp_end and rtp_end <= rtp_start:
        problems.append(f"RTP_END={rtp_end} must be above RTP_START={rtp_start}")
    if sip_port and rtp_start <= sip_port <= rtp_end:
        problems.append(f"SIP_PORT={sip_port} lies in the RTP range {rtp_start}-{rtp_end}")
    bind = _address(env, "SIP_BIND", problems)
    bot_uri = _uri(env, "BOT_URI", problems)
    extra: tuple[tuple[str, str], ...] = ()
    if "HARNESS_BOT_URI" in env:
        extra = ((HARNESS_BOT, _uri(env, "HARNESS_BOT_URI", problems)),)
    fmt = env["CONTROL_FORMAT"]
    if fmt not in ("plain-text", "json"):
        problems.append(f"CONTROL_FORMAT={fmt!r}: expected plain-text or json")
    external = _address(env, "EXTERNAL_ADDRESS", problems) if "EXTERNAL_ADDRESS" in env else None
    nets: list[str] = []
    for net in filter(None, (n.strip() for n in env["LOCAL_NET"].split(","))):
        try:
            nets.append(str(ipaddress.ip_network(net, strict=False)))
        except ValueError:
            problems.append(f"LOCAL_NET: {net!r} is not a network (like 172.16.0.0/12)")
    debug = env["ASTERISK_DEBUG"]
    if not debug.isdigit():
        problems.append(f"ASTERISK_DEBUG={debug!r}: expected a number")
    password = env.get("SIP_PASSWORD")
    if password is not None and any(c in password for c in ";\n\r"):
        problems.append("SIP_PASSWORD may not contain ';' or a line break")
    ari_users: tuple[tuple[str, str], ...] = ()
    user, ari_password = env.get("ARI_USER"), env.get("ARI_PASSWORD")
    if user is not None or ari_password is not None:
        if user is None or ari_password is None:
            problems.append("ARI_USER and ARI_PASSWORD go together: set both, or neither")
        elif not _NAME.fullmatch(user):
            problems.append(f"ARI_USER={user!r}: letters, digits, '_', '.', '-' (64 at most)")
        elif any(c in ari_password for c in ";\n\r") or ari_password != ari_password.strip():
            problems.append("ARI_PASSWORD may not contain ';', a line break or outer spaces")
        else:
            ari_users = ((user, ari_password),)
    app = env["ARI_APP"]
    if not _NAME.fullmatch(app):
        problems.append(f"ARI_APP={app!r}: letters, digits, '_', '.', '-' (64 at most)")
    http_bind = _address(env, "HTTP_BIND", problems) if "HTTP_BIND" in env else None
    http_port = _port(env, "HTTP_PORT", problems)
    if http_port and http_port == sip_port:
        problems.append(f"HTTP_PORT={http_port} is SIP_PORT too")
    install = Path(env["ASTERISK_PREFIX"])
    if not (install / "sbin" / "asterisk").exists():
        problems.append(f"ASTERISK_PREFIX={install}: no sbin/asterisk there")
    if problems:
        raise ConfigError("; ".join(problems))
    return config.AsteriskSettings(
        install=install,
        sandbox=Path(env["ASTERISK_SANDBOX"]),
        sip_port=sip_port,
        http_port=http_port,
        rtp_start=rtp_start,
        rtp_end=rtp_end,
        bot_uri=bot_uri,
        control_format=fmt,
        debug=int(debug),
        bind_address=bind,
        extra_bots=extra,
        external_address=external,
        local_nets=tuple(nets) if external else (),
        sip_password=password,
        console_verbose=True,
        autoload=True,
        # ARI is for other hosts (containers); without it HTTP stays inside.
        http_bind=http_bind or ("0.0.0.0" if ari_users else LOOPBACK),
        ari_users=ari_users,
        ari_app=app,
    )


def describe(s: config.AsteriskSettings) -> str:
    """What a person needs to know to call this Asterisk."""
    lines = [
        f"SIP on {s.bind_address}:{s.sip_port}/udp, RTP {s.rtp_start}-{s.rtp_end}/udp",
        *(f"extension {name} -> {uri}" for name, uri in s.bots),
        f"caller: user '{config.CALLER_ENDPOINT}', "
        + ("password required" if s.sip_password is not None else "no password"),
        f"control format: {s.control_format}; configuration in {s.etc}",
        (
            f"ARI on http://{s.http_bind}:{s.http_port}/ari for user "
            f"'{s.ari_users[0][0]}'; extension {config.ARI_EXTENSION} -> Stasis({s.ari_app})"
            if s.ari_users
            else f"ARI off (no ARI_USER); HTTP on {s.http_bind}:{s.http_port}"
        ),
    ]
    if s.external_address:
        lines.append(f"phones outside {', '.join(s.local_nets)} use {s.external_address}")
    return "\n".join(lines)


def command(s: config.AsteriskSettings) -> list[str]:
    """Asterisk in the foreground, with this configuration."""
    return [str(s.install / "sbin" / "asterisk"), "-f", "-n", "-C", str(s.asterisk_conf)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m harness.serve",
        description="Run Asterisk configured from the environment (see the module's doc).",
    )
    parser.add_argument("--check", action="store_true", help="write and show, do not start")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="serve: %(message)s", stream=sys.stderr)
    try:
        settings = settings_from_env(os.environ)
        config.write(settings)
    except (ConfigError, OSError) as exc:
        log.error("cannot configure Asterisk: %s", exc)
        return 2
    for line in describe(settings).splitlines():
        log.info("%s", line)
    if args.check:
        return 0
    argv_ = command(settings)
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        filter(None, [str(settings.install / "lib"), env.get("LD_LIBRARY_PATH")])
    )
    log.info("exec %s", " ".join(argv_))
    sys.stderr.flush()
    os.execve(argv_[0], argv_, env)


if __name__ == "__main__":
    sys.exit(main())
