"""Configuration files for one sandboxed Asterisk instance.

Pure functions from :class:`AsteriskSettings` to file contents, so that they
are unit-testable without Asterisk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.ports import LOOPBACK

#: The dialplan context of the caller's calls (and of every extension below).
DIALPLAN_CONTEXT = "bot"
#: The extension the caller dials; the dialplan sends it to the bot.
BOT_EXTENSION = "bot"
#: The SIP header the caller uses to pass chan_websocket dial options.
OPTIONS_HEADER = "X-WS-Options"
#: The websocket_client.conf connection name of the bot.
BOT_CONNECTION = "bot"
#: The PJSIP endpoint (and From user) of the caller.
CALLER_ENDPOINT = "caller"
#: The extension that hands a call to the ARI application (when ARI is on).
ARI_EXTENSION = "ari"
#: The extension that dials ``WebSocket/INCOMING`` (when ARI is on): the bot
#: connects in to ``/media/<connection_id>``, which the dialplan announces
#: with a ``UserEvent`` named :data:`INCOMING_EVENT`.
INCOMING_EXTENSION = "bot-in"
INCOMING_EVENT = "MediaWebSocketIncoming"
#: The SIP header that carries the harness's call tag (for the dialplan).
CALL_HEADER = "X-Harness-Call"
#: An extension that answers and stays silent: a third party for a bridge.
HOLD_EXTENSION = "hold"

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
    "codec_alaw.so",
    "codec_resample.so",
    "bridge_simple.so",
    "bridge_builtin_features.so",
    "app_dial.so",
    "app_echo.so",
    "func_channel.so",
    "pbx_config.so",
)

#: Loaded besides :data:`MODULES` when ARI is on: ARI with the resources an
#: externalMedia app uses, Stasis, a mixing bridge, and Gosub with UserEvent
#: (the pre-dial handler that announces a WebSocket/INCOMING channel).
ARI_MODULES: tuple[str, ...] = (
    "res_ari.so",
    "res_ari_model.so",
    "res_ari_events.so",
    "res_ari_channels.so",
    "res_ari_bridges.so",
    "res_stasis.so",
    "res_stasis_answer.so",
    "res_stasis_playback.so",
    "res_stasis_recording.so",
    "res_stasis_snoop.so",
    "app_stasis.so",
    "app_stack.so",
    "app_userevent.so",
    "bridge_softmix.so",
)


#: With every module loaded (a deployment): the files those modules need to
#: load and stay quiet, each the smallest that does (Asterisk's samples
#: describe every option).
DEPLOYMENT_FILES: dict[str, str] = {
    "acl.conf": "",
    "ccss.conf": "[general]\n",
    "cdr.conf": "[general]\nenable = no\n",
    "cel.conf": "[general]\nenable = no\n",
    "confbridge.conf": "[general]\n",
    "features.conf": "[general]\n",
    "geolocation.conf": "",
    "pjproject.conf": "",
    "pjsip_notify.conf": "",
    "pjsip_wizard.conf": "",
    "res_stun_monitor.conf": "[general]\n",
    "statsd.conf": "[general]\nenabled = no\n",
    "udptl.conf": "[general]\n",
    # Call progress tones (ringback, busy) of the United States.
    "indications.conf": """\
[general]
country = us

[us]
description = United States / North America
ringcadence = 2000,4000
dial = 350+440
busy = 480+620/500,0/500
ring = 440+480/2000,0/4000
congestion = 480+620/250,0/250
callwaiting = 440/300,0/10000
record = 1400/500,0/15000
info = !950/330,!1400/330,!1800/330,0
""",
}


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
    #: Where SIP and RTP listen: loopback for the tests, 0.0.0.0 in a container.
    bind_address: str = LOOPBACK
    #: More bots, as (name, URI): each gets a connection and an extension of that name.
    extra_bots: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: The address SIP phones outside ``local_nets`` reach Asterisk at (NAT, port mapping).
    external_address: str | None = None
    #: Networks that reach Asterisk directly (no address rewriting for them).
    local_nets: tuple[str, ...] = field(default_factory=tuple)
    #: If set, the caller endpoint must authenticate as user ``caller`` with it.
    sip_password: str | None = None
    #: Verbose messages on the console too (a container's log).
    console_verbose: bool = False
    #: Load every module the install has (a deployment) instead of :data:`MODULES`.
    autoload: bool = False
    #: Attempts to connect to a bot per call (websocket_client.conf
    #: ``reconnect_attempts``): 1 fails a call at once when the bot is not
    #: there; across a lossy link a lost SYN outlasts the 1 s timeout.
    connect_attempts: int = 1
    #: Where Asterisk's HTTP server (ARI, inbound WebSockets) listens.
    http_bind: str = LOOPBACK
    #: ARI users as (name, password); ARI is off without any.
    ari_users: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: The Stasis application extension :data:`ARI_EXTENSION` hands calls to.
    ari_app: str = "voicebot"

    @property
    def bots(self) -> tuple[tuple[str, str], ...]:
        """Every bot as (name, URI); the first one is :data:`BOT_CONNECTION`."""
        return ((BOT_CONNECTION, self.bot_uri), *self.extra_bots)

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
    console = "notice,warning,error" + (",verbose" if s.console_verbose else "")
    files["logger.conf"] = f"""\
[general]
dateformat = %F %T.%3q
; Tests read the log: a burst of debug lines (a flooding bot with debug on)
; must not make the logger drop messages on a busy machine (default 1000).
logger_queue_limit = 100000

[logfiles]
messages.log => notice,warning,error,verbose,debug
console => {console}
"""
    ari_modules = ARI_MODULES if s.ari_users else ()
    loads = () if s.autoload else (*MODULES, *ari_modules, *s.extra_modules)
    modules = "\n".join([f"load => {m}" for m in loads] + [f"require => {m}" for m in s.required])
    files["modules.conf"] = f"""\
[modules]
autoload = {"yes" if s.autoload else "no"}
{modules}
"""
    files["http.conf"] = f"""\
[general]
enabled = yes
bindaddr = {s.http_bind}
bindport = {s.http_port}
"""
    files["ari.conf"] = _ari(s)
    if s.autoload:
        files.update(DEPLOYMENT_FILES)
    files["rtp.conf"] = f"""\
[general]
rtpstart = {s.rtp_start}
rtpend = {s.rtp_end}
"""
    files["pjsip.conf"] = _pjsip(s)
    files["websocket_client.conf"] = "\n".join(
        f"""\
[{name}]
type = websocket_client
connection_type = per_call_config
uri = {uri}
protocols = media
connection_timeout = 1000
reconnect_attempts = {s.connect_attempts}
reconnect_interval = 200
"""
        for name, uri in s.bots
    )
    files["chan_websocket.conf"] = f"""\
[global]
type = global
control_message_format = {s.control_format}
"""
    dial = "\n".join(
        f"""
; The caller passes chan_websocket dial options in {OPTIONS_HEADER}.
exten => {name},1,NoOp(Media call to {name}: ${{PJSIP_HEADER(read,{OPTIONS_HEADER})}})
 same => n,Dial(WebSocket/{name}/${{PJSIP_HEADER(read,{OPTIONS_HEADER})}})
 same => n,Hangup()"""
        for name, _ in s.bots
    )
    files["extensions.conf"] = f"""\
[general]
static = yes
writeprotect = yes

[{DIALPLAN_CONTEXT}]{dial}

exten => echo,1,Answer()
 same => n,Echo()
{_ari_extension(s)}"""
    return files


def _ari(s: AsteriskSettings) -> str:
    users = "".join(
        f"""
[{name}]
type = user
read_only = no
password = {password}
"""
        for name, password in s.ari_users
    )
    return f"""\
[general]
enabled = {"yes" if s.ari_users else "no"}
pretty = no
{users}"""


def _ari_extension(s: AsteriskSettings) -> str:
    """With ARI on: the extension that hands calls to the ARI app (the caller's
    options as its args), the one that dials ``WebSocket/INCOMING`` and
    announces the connection id, and a silent third party."""
    if not s.ari_users:
        return ""
    return f"""
; Calls to {ARI_EXTENSION} go to the ARI application {s.ari_app}; its StasisStart
; carries the caller's {OPTIONS_HEADER} (chan_websocket dial options).
exten => {ARI_EXTENSION},1,NoOp(Call to the ARI application {s.ari_app})
 same => n,Stasis({s.ari_app},${{PJSIP_HEADER(read,{OPTIONS_HEADER})}})
 same => n,Hangup()

; Calls to {INCOMING_EXTENSION}: the bot connects in to /media/<connection_id>.
; The WebSocket channel's pre-dial handler announces its connection id (and
; the caller's {CALL_HEADER}) in a UserEvent, which ARI apps subscribed to
; all channels receive as ChannelUserevent.
exten => {INCOMING_EXTENSION},1,NoOp(Media call, the bot connects in)
 same => n,Set(__HARNESS_CALL=${{PJSIP_HEADER(read,{CALL_HEADER})}})
 same => n,Set(WS_OPTIONS=${{PJSIP_HEADER(read,{OPTIONS_HEADER})}})
 same => n,Dial(WebSocket/INCOMING/${{WS_OPTIONS}},,b(announce-incoming^s^1))
 same => n,Hangup()

; A party that answers and says nothing (a muted supervisor, say).
exten => {HOLD_EXTENSION},1,Answer()
 same => n,Wait(86400)
 same => n,Hangup()

[announce-incoming]
exten => s,1,Set(ID=${{MEDIA_WEBSOCKET_CONNECTION_ID}})
 same => n,UserEvent({INCOMING_EVENT},connection_id: ${{ID}},call: ${{HARNESS_CALL}})
 same => n,Return()
"""


def _pjsip(s: AsteriskSettings) -> str:
    transport = f"""\
[transport-udp]
type = transport
protocol = udp
bind = {s.bind_address}:{s.sip_port}
"""
    if s.external_address:
        transport += (
            f"external_media_address = {s.external_address}\n"
            f"external_signaling_address = {s.external_address}\n"
        )
    transport += "".join(f"local_net = {net}\n" for net in s.local_nets)
    endpoint = f"""
[{CALLER_ENDPOINT}]
type = endpoint
context = {DIALPLAN_CONTEXT}
disallow = all
allow = ulaw
; A phone's a=ptime sets the packetization of what Asterisk sends it.
use_ptime = yes
direct_media = no
rtp_symmetric = yes
force_rport = yes
rewrite_contact = yes
"""
    if s.sip_password is None:
        return transport + endpoint
    return (
        transport
        + endpoint
        + f"""auth = {CALLER_ENDPOINT}-auth

[{CALLER_ENDPOINT}-auth]
type = auth
auth_type = userpass
username = {CALLER_ENDPOINT}
password = {s.sip_password}
"""
    )


def write(settings: AsteriskSettings) -> None:
    """Create the sandbox's directories and write its configuration."""
    for sub in ("etc", "lib", "lib/keys", "agi", "spool", "run", "log"):
        (settings.sandbox / sub).mkdir(parents=True, exist_ok=True)
    for name, content in render(settings).items():
        (settings.etc / name).write_text(content)
