"""Configuration files for one sandboxed Asterisk instance.

Pure functions from :class:`AsteriskSettings` to file contents, so that they
are unit-testable without Asterisk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

#: The extension the caller dials; the dialplan sends it to the bot.
BOT_EXTENSION = "bot"
#: The SIP header the caller uses to pass chan_websocket dial options.
OPTIONS_HEADER = "X-WS-Options"
#: The websocket_client.conf connection name of the bot.
BOT_CONNECTION = "bot"
#: The PJSIP endpoint (and From user) of the caller.
CALLER_ENDPOINT = "caller"

#: Modules loaded in every instance (``autoload=no``): a small, fast core.
MODULES: tuple[str, ...] = (
    "res_timing_timerfd.so",
    "res_sorcery_config.so",
    "res_sorcery_memory.so",
    "res_sorcery_astdb.so",
    "res_pjproject.so",
    "res_pjsip.so",
    "res_pjsip_pubsub.so",
    "res_pjsip_session.so",
    "res_pjsip_sdp_rtp.so",
    "res_pjsip_endpoint_identifier_user.so",
    "res_pjsip_header_funcs.so",
    "res_pjsip_logger.so",
    "res_rtp_asterisk.so",
    "res_http_websocket.so",
    "res_websocket_client.so",
    "chan_pjsip.so",
    "chan_websocket.so",
    "codec_ulaw.so",
    "bridge_simple.so",
    "bridge_builtin_features.so",
    "app_dial.so",
    "app_echo.so",
    "func_channel.so",
    "pbx_config.so",
)


@dataclass(frozen=True)
class AsteriskSettings:
    """Everything that differs between two sandboxed instances."""

    install: Path
    sandbox: Path
    sip_port: int
    http_port: int
    rtp_start: int
    rtp_end: int
    bot_uri: str
    control_format: str = "plain-text"
    debug: int = 0
    extra_modules: tuple[str, ...] = field(default_factory=tuple)
    #: Modules Asterisk must load or refuse to start (``require =>``).
    required: tuple[str, ...] = field(default_factory=tuple)

    @property
    def etc(self) -> Path:
        return self.sandbox / "etc"

    @property
    def run(self) -> Path:
        return self.sandbox / "run"

    @property
    def logs(self) -> Path:
        return self.sandbox / "log"

    @property
    def asterisk_conf(self) -> Path:
        return self.etc / "asterisk.conf"


def render(settings: AsteriskSettings) -> dict[str, str]:
    """Return ``{file name: content}`` for every file in the sandbox's etc/."""
    s = settings
    inst = s.install
    sandbox = s.sandbox
    files: dict[str, str] = {}
    files["asterisk.conf"] = f"""\
[directories]
astetcdir => {s.etc}
astmoddir => {inst}/lib/asterisk/modules
astvarlibdir => {sandbox}/lib
astdbdir => {sandbox}/lib
astkeydir => {sandbox}/lib
astdatadir => {inst}/var/lib/asterisk
astagidir => {sandbox}/agi
astspooldir => {sandbox}/spool
astrundir => {s.run}
astlogdir => {s.logs}
astsbindir => {inst}/sbin

[options]
verbose = 3
debug = {s.debug}
nocolor = yes
transmit_silence = no
hideconnect = yes
cache_media_frames = no
documentation_language = en_US
"""
    files["logger.conf"] = """\
[general]
dateformat = %F %T.%3q

[logfiles]
messages.log => notice,warning,error,verbose,debug
console => notice,warning,error
"""
    modules = "\n".join(
        [f"load => {m}" for m in (*MODULES, *s.extra_modules)]
        + [f"require => {m}" for m in s.required]
    )
    files["modules.conf"] = f"""\
[modules]
autoload = no
{modules}
"""
    files["http.conf"] = f"""\
[general]
enabled = yes
bindaddr = 127.0.0.1
bindport = {s.http_port}
"""
    files["rtp.conf"] = f"""\
[general]
rtpstart = {s.rtp_start}
rtpend = {s.rtp_end}
"""
    files["pjsip.conf"] = f"""\
[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{s.sip_port}

[{CALLER_ENDPOINT}]
type = endpoint
context = bot
disallow = all
allow = ulaw
direct_media = no
rtp_symmetric = yes
"""
    files["websocket_client.conf"] = f"""\
[{BOT_CONNECTION}]
type = websocket_client
connection_type = per_call_config
uri = {s.bot_uri}
protocols = media
connection_timeout = 1000
reconnect_attempts = 1
reconnect_interval = 200
"""
    files["chan_websocket.conf"] = f"""\
[global]
type = global
control_message_format = {s.control_format}
"""
    files["extensions.conf"] = f"""\
[general]
static = yes
writeprotect = yes

[bot]
; The caller passes chan_websocket dial options in {OPTIONS_HEADER}.
exten => {BOT_EXTENSION},1,NoOp(Media call: ${{PJSIP_HEADER(read,{OPTIONS_HEADER})}})
 same => n,Dial(WebSocket/{BOT_CONNECTION}/${{PJSIP_HEADER(read,{OPTIONS_HEADER})}})
 same => n,Hangup()

exten => echo,1,Answer()
 same => n,Echo()
"""
    return files


def write(settings: AsteriskSettings) -> None:
    """Create the sandbox's directories and write its configuration."""
    for sub in ("etc", "lib", "agi", "spool", "run", "log"):
        (settings.sandbox / sub).mkdir(parents=True, exist_ok=True)
    for name, content in render(settings).items():
        (settings.etc / name).write_text(content)
