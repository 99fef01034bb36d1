"""harness.serve: the Docker image's Asterisk, configured from the environment."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import config, serve


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    (tmp_path / "opt" / "sbin").mkdir(parents=True)
    (tmp_path / "opt" / "sbin" / "asterisk").touch()
    return tmp_path / "opt"


def env(prefix: Path, **extra: str) -> dict[str, str]:
    return {"ASTERISK_PREFIX": str(prefix), "ASTERISK_SANDBOX": "/srv/x", **extra}


def test_defaults_suit_the_compose_network(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix))
    assert (s.bind_address, s.sip_port, s.rtp_start, s.rtp_end) == ("0.0.0.0", 5060, 10000, 10099)
    assert s.bots == (("bot", "ws://bot:8765/media"),)
    files = config.render(s)
    assert "bind = 0.0.0.0:5060" in files["pjsip.conf"]
    assert "external_media_address" not in files["pjsip.conf"]
    assert "auth =" not in files["pjsip.conf"]
    assert "console => notice,warning,error,verbose" in files["logger.conf"]
    assert "bindaddr = 127.0.0.1" in files["http.conf"], "HTTP stays inside the container"
    assert "enabled = no" in files["ari.conf"], "no ARI without a user"
    assert "Stasis(" not in files["extensions.conf"]
    # A deployment: every module the install has, and the files they need.
    assert "autoload = yes" in files["modules.conf"]
    assert "load =>" not in files["modules.conf"]
    assert set(config.DEPLOYMENT_FILES) <= set(files)


def test_harness_bot_gets_its_own_connection_and_extension(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix, HARNESS_BOT_URI="ws://tests:8765/media"))
    files = config.render(s)
    assert "[harness]\ntype = websocket_client" in files["websocket_client.conf"]
    assert "uri = ws://tests:8765/media" in files["websocket_client.conf"]
    assert "exten => harness,1," in files["extensions.conf"]
    assert "Dial(WebSocket/harness/" in files["extensions.conf"]
    assert "Dial(WebSocket/bot/" in files["extensions.conf"]


def test_external_address_and_local_nets(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix, EXTERNAL_ADDRESS="192.0.2.10"))
    pjsip = config.render(s)["pjsip.conf"]
    assert "external_media_address = 192.0.2.10" in pjsip
    assert "external_signaling_address = 192.0.2.10" in pjsip
    assert "local_net = 172.16.0.0/12" in pjsip


def test_password_makes_the_caller_authenticate(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix, SIP_PASSWORD="s3cret"))
    pjsip = config.render(s)["pjsip.conf"]
    assert "auth = caller-auth" in pjsip
    assert "[caller-auth]\ntype = auth" in pjsip
    assert "password = s3cret" in pjsip


def test_ari_user_turns_ari_on_for_other_hosts(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix, ARI_USER="app", ARI_PASSWORD="pw", ARI_APP="bots"))
    files = config.render(s)
    assert "enabled = yes" in files["ari.conf"]
    assert "[app]\ntype = user\nread_only = no\npassword = pw" in files["ari.conf"]
    assert "bindaddr = 0.0.0.0" in files["http.conf"]
    assert "bindport = 8088" in files["http.conf"]
    dialplan = files["extensions.conf"]
    assert "exten => ari,1,NoOp(" in dialplan
    assert "Stasis(bots,${PJSIP_HEADER(read,X-WS-Options)})" in dialplan
    assert "ARI on http://0.0.0.0:8088/ari for user 'app'" in serve.describe(s)


def test_http_bind_and_port_can_be_set(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix, HTTP_BIND="127.0.0.1", HTTP_PORT="8090"))
    assert (s.http_bind, s.http_port) == ("127.0.0.1", 8090)
    s = serve.settings_from_env(env(prefix, ARI_USER="a", ARI_PASSWORD="b", HTTP_BIND="127.0.0.1"))
    assert s.http_bind == "127.0.0.1", "HTTP_BIND wins over the ARI default"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ({"ARI_USER": "app"}, "ARI_USER and ARI_PASSWORD go together"),
        ({"ARI_PASSWORD": "pw"}, "ARI_USER and ARI_PASSWORD go together"),
        ({"ARI_USER": "a b", "ARI_PASSWORD": "pw"}, "ARI_USER='a b'"),
        ({"ARI_USER": "a", "ARI_PASSWORD": "p;w"}, "ARI_PASSWORD may not contain"),
        ({"ARI_APP": "my app"}, "ARI_APP='my app'"),
        ({"HTTP_PORT": "80800"}, "HTTP_PORT='80800'"),
        ({"HTTP_PORT": "5060"}, "HTTP_PORT=5060 is SIP_PORT too"),
        ({"HTTP_BIND": "everywhere"}, "HTTP_BIND='everywhere'"),
    ],
)
def test_bad_ari_and_http_settings_are_named(
    prefix: Path, extra: dict[str, str], problem: str
) -> None:
    with pytest.raises(serve.ConfigError, match=re.escape(problem)):
        serve.settings_from_env(env(prefix, **extra))


def test_empty_values_mean_the_default(prefix: Path) -> None:
    s = serve.settings_from_env(env(prefix, EXTERNAL_ADDRESS="", SIP_PASSWORD="", SIP_PORT=""))
    assert s.external_address is None and s.sip_password is None and s.sip_port == 5060


def test_every_problem_is_reported_at_once(prefix: Path) -> None:
    bad = env(
        prefix,
        SIP_PORT="5o60",
        RTP_START="20000",
        RTP_END="10000",
        BOT_URI="http://bot/media",
        CONTROL_FORMAT="xml",
        EXTERNAL_ADDRESS="my-host",
        LOCAL_NET="10.0.0.0/8,nonsense",
        SIP_PASSWORD="a;b",
    )
    with pytest.raises(serve.ConfigError) as err:
        serve.settings_from_env(bad)
    text = str(err.value)
    for part in (
        "SIP_PORT='5o60'",
        "RTP_END=10000 must be above RTP_START=20000",
        "BOT_URI='http://bot/media'",
        "CONTROL_FORMAT='xml'",
        "EXTERNAL_ADDRESS='my-host'",
        "'nonsense' is not a network",
        "SIP_PASSWORD may not contain",
    ):
        assert part in text


def test_missing_install_is_named(tmp_path: Path) -> None:
    with pytest.raises(serve.ConfigError, match="no sbin/asterisk there"):
        serve.settings_from_env({"ASTERISK_PREFIX": str(tmp_path)})


def test_main_exits_2_with_a_message_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("ASTERISK_PREFIX", str(tmp_path))
    monkeypatch.setenv("ASTERISK_SANDBOX", str(tmp_path / "srv"))
    monkeypatch.setenv("SIP_PORT", "99999")
    assert serve.main(["--check"]) == 2
    assert "SIP_PORT='99999'" in caplog.text
    assert not (tmp_path / "srv").exists()


def test_main_check_writes_the_configuration(
    prefix: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env(prefix, ASTERISK_SANDBOX=str(tmp_path / "srv")).items():
        monkeypatch.setenv(key, value)
    assert serve.main(["--check"]) == 0
    assert (tmp_path / "srv" / "etc" / "asterisk.conf").exists()
    assert serve.command(serve.settings_from_env(env(prefix)))[1:3] == ["-f", "-n"]
