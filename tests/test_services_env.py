"""Services.from_env: how docker compose points the test runner at Asterisk."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.asterisk import AsteriskError
from harness.ports import parse_host_port
from harness.rig import Services


def test_unset_means_an_asterisk_per_test() -> None:
    assert Services.from_env({}) is None


def test_compose_settings() -> None:
    env = {
        "HARNESS_ASTERISK_HOST": "asterisk",
        "HARNESS_ASTERISK_SIP_PORT": "5070",
        "HARNESS_BOT_LISTEN": "0.0.0.0:9000",
        "HARNESS_ASTERISK_LOGS": "/srv/asterisk/log",
    }
    assert Services.from_env(env) == Services(
        "asterisk", 5070, "harness", "0.0.0.0", 9000, Path("/srv/asterisk/log")
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("HARNESS_BOT_LISTEN", "8765"),
        ("HARNESS_BOT_LISTEN", "x:99999"),
        ("HARNESS_ASTERISK_SIP_PORT", "sip"),
    ],
)
def test_bad_values_are_named(key: str, value: str) -> None:
    with pytest.raises(AsteriskError, match=f"{key}.*expected HOST:PORT.*{value}"):
        Services.from_env({"HARNESS_ASTERISK_HOST": "asterisk", key: value})


def test_parse_host_port() -> None:
    assert parse_host_port("127.0.0.1:8765") == ("127.0.0.1", 8765)
    for bad in ("8765", ":8765", "host:", "host:0", "host:65536", "host:port"):
        with pytest.raises(ValueError, match="HOST:PORT"):
            parse_host_port(bad)
