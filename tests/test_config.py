"""Configuration generation for a sandboxed Asterisk."""

from __future__ import annotations

import configparser
import dataclasses
from pathlib import Path

from harness import config


def settings(tmp_path: Path) -> config.AsteriskSettings:
    return config.AsteriskSettings(
        install=Path("/opt/ast"),
        sandbox=tmp_path,
        sip_port=5070,
        http_port=8089,
        rtp_start=30000,
        rtp_end=30199,
        bot_uri="ws://127.0.0.1:9999/media",
    )


def parse(text: str) -> configparser.ConfigParser:
    cp = configparser.ConfigParser(
        delimiters=("=>", "="), comment_prefixes=(";",), strict=False, interpolation=None
    )
    # Asterisk allows repeated keys (load =>) and continuation lines we do not need here.
    cp.read_string("\n".join(line for line in text.splitlines() if not line.startswith(" ")))
    return cp


def test_every_file_is_rendered(tmp_path: Path) -> None:
    files = config.render(settings(tmp_path))
    assert set(files) == {
        "asterisk.conf",
        "logger.conf",
        "modules.conf",
        "http.conf",
        "rtp.conf",
        "pjsip.conf",
        "websocket_client.conf",
        "chan_websocket.conf",
        "extensions.conf",
        "ari.conf",
    }


def test_directories_point_at_sandbox_and_install(tmp_path: Path) -> None:
    s = settings(tmp_path)
    dirs = parse(config.render(s)["asterisk.conf"])["directories"]
    assert dirs["astmoddir"] == "/opt/ast/lib/asterisk/modules"
    assert dirs["astsbindir"] == "/opt/ast/sbin"
    for key in ("astetcdir", "astrundir", "astlogdir", "astvarlibdir", "astspooldir"):
        assert Path(dirs[key]).is_relative_to(tmp_path), key


def test_ports_and_uri(tmp_path: Path) -> None:
    files = config.render(settings(tmp_path))
    assert "bind = 127.0.0.1:5070" in files["pjsip.conf"]
    assert "bindport = 8089" in files["http.conf"]
    assert "bindaddr = 127.0.0.1" in files["http.conf"]
    rtp = parse(files["rtp.conf"])["general"]
    assert (rtp["rtpstart"], rtp["rtpend"]) == ("30000", "30199")
    ws = parse(files["websocket_client.conf"])[config.BOT_CONNECTION]
    assert ws["uri"] == "ws://127.0.0.1:9999/media"
    assert ws["protocols"] == "media"


def test_modules_are_explicit(tmp_path: Path) -> None:
    text = config.render(settings(tmp_path))["modules.conf"]
    assert "autoload = no" in text
    loads = [line.split("=>")[1].strip() for line in text.splitlines() if "=>" in line]
    assert "chan_websocket.so" in loads
    assert "res_timing_timerfd.so" in loads
    assert len(loads) == len(set(loads))


def test_required_modules(tmp_path: Path) -> None:
    s = config.AsteriskSettings(**{**settings(tmp_path).__dict__, "required": ("x.so",)})
    assert "require => x.so" in config.render(s)["modules.conf"]


def test_dialplan_dials_the_bot_with_caller_options(tmp_path: Path) -> None:
    text = config.render(settings(tmp_path))["extensions.conf"]
    assert f"exten => {config.BOT_EXTENSION},1," in text
    assert (
        f"Dial(WebSocket/{config.BOT_CONNECTION}/${{PJSIP_HEADER(read,{config.OPTIONS_HEADER})}})"
        in text
    )


def test_control_format_is_configurable(tmp_path: Path) -> None:
    s = config.AsteriskSettings(**{**settings(tmp_path).__dict__, "control_format": "json"})
    assert "control_message_format = json" in config.render(s)["chan_websocket.conf"]


def test_write_creates_sandbox(tmp_path: Path) -> None:
    s = settings(tmp_path / "box")
    config.write(s)
    assert (s.etc / "asterisk.conf").is_file()
    for sub in ("run", "log", "lib", "spool"):
        assert (s.sandbox / sub).is_dir()


def test_ari_is_off_without_users(tmp_path: Path) -> None:
    files = config.render(settings(tmp_path))
    assert parse(files["ari.conf"])["general"]["enabled"] == "no"
    assert "Stasis" not in files["extensions.conf"]
    assert parse(files["http.conf"])["general"]["bindaddr"] == "127.0.0.1"


def test_ari_users_and_the_stasis_extension(tmp_path: Path) -> None:
    s = dataclasses.replace(
        settings(tmp_path), ari_users=(("u1", "p1"), ("u2", "p2")), ari_app="bots"
    )
    ari = parse(config.render(s)["ari.conf"])
    assert ari["general"]["enabled"] == "yes"
    assert (ari["u1"]["type"], ari["u1"]["password"]) == ("user", "p1")
    assert ari["u2"]["password"] == "p2"
    dialplan = config.render(s)["extensions.conf"]
    assert f"exten => {config.ARI_EXTENSION},1," in dialplan
    assert "Stasis(bots," in dialplan
    # The bot connecting in: Dial(WebSocket/INCOMING) announces its connection
    # id in a pre-dial handler; and a silent third party for mixing bridges.
    assert f"exten => {config.INCOMING_EXTENSION},1," in dialplan
    assert "Dial(WebSocket/INCOMING/" in dialplan and "b(announce-incoming^s^1)" in dialplan
    assert f"UserEvent({config.INCOMING_EVENT},connection_id: ${{ID}}" in dialplan
    assert f"exten => {config.HOLD_EXTENSION},1,Answer()" in dialplan
    loads = config.render(s)["modules.conf"]
    for module in config.ARI_MODULES:
        assert f"load => {module}" in loads


def test_ari_modules_are_loaded_only_with_ari(tmp_path: Path) -> None:
    loads = config.render(settings(tmp_path))["modules.conf"]
    assert "res_ari" not in loads and "bridge_softmix" not in loads


def test_autoload_loads_everything_and_quiets_it(tmp_path: Path) -> None:
    s = dataclasses.replace(settings(tmp_path), autoload=True)
    files = config.render(s)
    assert parse(files["modules.conf"])["modules"]["autoload"] == "yes"
    assert "load =>" not in files["modules.conf"]
    for name, content in config.DEPLOYMENT_FILES.items():
        assert files[name] == content
    assert parse(files["indications.conf"])["general"]["country"] == "us"
