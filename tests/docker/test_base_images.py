"""The Debian base images the Dockerfile starts from (``make docker-base``).

Where no registry answers, they are debootstrapped from the mirror this
machine's apt uses; then they must say so, carry that mirror, reach it from a
container, and the slim one must be slim.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import ROOT, need
from tests.docker.test_compose_up import engine_answers

IMAGES = ("debian:bookworm", "debian:bookworm-slim")
LABEL = "io.asterisk-marks.base"


def docker(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def label(image: str) -> str:
    done = docker("image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', image)
    assert done.returncode == 0, f"{image} is missing: make docker-base ({done.stderr})"
    return done.stdout.strip().replace("<no value>", "")


@pytest.fixture(scope="module", autouse=True)
def engine() -> None:
    need(engine_answers(), "no Docker engine answers 'docker info'")


def this_machines_mirror() -> str:
    done = subprocess.run(
        [str(ROOT / "scripts" / "docker-base.sh"), "mirror"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[0].split()[1]


@pytest.mark.parametrize("image", IMAGES)
def test_a_debootstrapped_base_uses_this_machines_mirror(image: str) -> None:
    how = label(image)
    if not how:
        return  # pulled from a registry: Debian's own image, nothing of ours to check
    mirror = this_machines_mirror()
    assert mirror in how, how
    sources = docker("run", "--rm", image, "cat", "/etc/apt/sources.list.d/debian.sources")
    assert f"URIs: {mirror}" in sources.stdout, sources.stdout
    # The mirror is reachable from a container, with the image's apt settings.
    update = docker("run", "--rm", image, "apt-get", "-q", "update", timeout=300)
    assert update.returncode == 0, update.stdout + update.stderr
    assert "W: " not in update.stdout + update.stderr, update.stdout + update.stderr


def test_the_slim_base_has_no_documentation() -> None:
    if not label("debian:bookworm-slim"):
        return
    slim = docker(
        "run",
        "--rm",
        "debian:bookworm-slim",
        "bash",
        "-c",
        "ls /usr/share/man | wc -l; find /usr/share/doc -type f ! -name copyright | wc -l;"
        " cat /etc/dpkg/dpkg.cfg.d/docker",
    )
    man, docs, *excludes = slim.stdout.splitlines()
    assert (man, docs) == ("0", "0"), slim.stdout
    assert "path-exclude /usr/share/doc/*" in excludes
    full = docker("run", "--rm", "debian:bookworm", "bash", "-c", "ls /usr/share/man | wc -l")
    assert int(full.stdout) > 0, "the full image keeps its manual pages"
