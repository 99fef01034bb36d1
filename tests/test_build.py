"""The build script: the series applies, failures name the patch and hunk,
the cache key follows the patches, and chan_websocket.c passes dev mode."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import need

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "asterisk-build.sh"

BAD_PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Test <test@example.com>
Date: Mon, 1 Jan 2024 00:00:00 +0000
Subject: [PATCH] chan_websocket: A patch that cannot apply.

---
 channels/chan_websocket.c | 2 +-
 1 file changed, 1 insertion(+), 1 deletion(-)

diff --git a/channels/chan_websocket.c b/channels/chan_websocket.c
--- a/channels/chan_websocket.c
+++ b/channels/chan_websocket.c
@@ -40,3 +40,3 @@
 #include "this line is not in the file"
-#include "nor this one"
+#include "so the hunk fails"
 #include "at all"
--
2.39.5
"""


def run_build(*args: str, patch_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    need(
        shutil.which("dpkg-source") is not None and shutil.which("git") is not None,
        "dpkg-source and git are needed: make setup",
    )
    env = dict(os.environ)
    if patch_dir is not None:
        env["ASTERISK_PATCH_DIR"] = str(patch_dir)
    return subprocess.run(
        ["bash", str(BUILD), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )


def copy_series(tmp_path: Path) -> Path:
    dest = tmp_path / "patches"
    shutil.copytree(ROOT / "asterisk-patch" / "22.10", dest)
    return dest


def test_series_applies() -> None:
    result = run_build("check-patches")
    assert result.returncode == 0, result.stderr
    assert "applies cleanly" in result.stderr


def test_patch_that_does_not_apply_is_named_with_its_hunk(tmp_path: Path) -> None:
    patches = copy_series(tmp_path)
    (patches / "9999-bad.patch").write_text(BAD_PATCH)
    with (patches / "series").open("a") as f:
        f.write("9999-bad.patch\n")
    result = run_build("check-patches", patch_dir=patches)
    assert result.returncode != 0
    assert "9999-bad.patch" in result.stderr
    assert "channels/chan_websocket.c:40" in result.stderr, result.stderr


def test_missing_patch_file_is_named(tmp_path: Path) -> None:
    patches = copy_series(tmp_path)
    (patches / "series").write_text("0042-not-here.patch\n")
    result = run_build("check-patches", patch_dir=patches)
    assert result.returncode != 0
    assert "0042-not-here.patch" in result.stderr


def test_cache_key_follows_the_patches(tmp_path: Path) -> None:
    patches = copy_series(tmp_path)
    before = run_build("key", patch_dir=patches).stdout.strip()
    upstream = run_build("key", "upstream", patch_dir=patches).stdout.strip()
    (patches / "0001-extra.patch").write_text(BAD_PATCH)
    with (patches / "series").open("a") as f:
        f.write("0001-extra.patch\n")
    after = run_build("key", patch_dir=patches).stdout.strip()
    upstream_after = run_build("key", "upstream", patch_dir=patches).stdout.strip()
    assert len(before) == 16
    assert before != after, "a changed series rebuilds"
    assert upstream == upstream_after, "the upstream build ignores the series"
    assert before == run_build("key", patch_dir=copy_series(tmp_path / "again")).stdout.strip()


def test_second_build_is_cached() -> None:
    result = run_build("build")
    assert result.returncode == 0, result.stderr
    assert "is cached" in result.stderr, "make test must not rebuild Asterisk"


@pytest.mark.integration
def test_the_patched_files_compile_in_dev_mode() -> None:
    result = run_build("devcheck")
    assert result.returncode == 0, result.stderr
    assert "chan_websocket.c res/res_http_websocket.c compile cleanly" in result.stderr


def run_in_cache(env: dict[str, str], cache: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``asterisk-build.sh ARGS`` with *env*, in the private cache *cache*."""
    return subprocess.run(
        ["bash", str(BUILD), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "ASTERISK_MARKS_CACHE": str(cache), **env},
        timeout=60,
        check=False,
    )


def run_source(env: dict[str, str], cache: Path) -> subprocess.CompletedProcess[str]:
    """``asterisk-build.sh fetch`` with the source chosen by *env*, in a private cache."""
    return run_in_cache(env, cache, "fetch")


def tarball_env(tarball: Path, sha256: str) -> dict[str, str]:
    """Build release 23.0.0 from *tarball* (a file:// URL), expecting *sha256*."""
    return {
        "ASTERISK_SOURCE": "tarball",
        "ASTERISK_VERSION": "23.0.0",
        "ASTERISK_TARBALL_URL": tarball.as_uri(),
        "ASTERISK_TARBALL_SHA256": sha256,
    }


@pytest.fixture
def release(tmp_path: Path) -> tuple[Path, str]:
    """A stand-in release tarball on disk (file:// URL) and its sha256."""
    src = tmp_path / "asterisk-23.0.0" / "channels"
    src.mkdir(parents=True)
    (src / "chan_websocket.c").write_text("/* stand-in */\n")
    tarball = tmp_path / "asterisk-23.0.0.tar.gz"
    subprocess.run(
        ["tar", "-czf", str(tarball), "-C", str(tmp_path), "asterisk-23.0.0"], check=True
    )
    digest = subprocess.run(
        ["sha256sum", str(tarball)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    return tarball, digest


def test_a_version_debian_does_not_have_points_at_the_tarball(tmp_path: Path) -> None:
    done = run_source({"ASTERISK_VERSION": "21.0.0"}, tmp_path / "cache")
    assert done.returncode == 1
    assert "pinned here is 22.10.1" in done.stderr
    assert "ASTERISK_SOURCE=tarball ASTERISK_VERSION=21.0.0" in done.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ASTERISK_VERSION": "23.0.0"}, "needs ASTERISK_TARBALL_SHA256"),
        ({"ASTERISK_VERSION": "23.0.0", "ASTERISK_TARBALL_SHA256": "abc"}, "64 hex digits"),
        ({"ASTERISK_VERSION": "latest", "ASTERISK_TARBALL_SHA256": "a" * 64}, "release number"),
    ],
)
def test_tarball_settings_are_checked_before_anything_is_fetched(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    cache = tmp_path / "cache"
    done = run_source({"ASTERISK_SOURCE": "tarball", **env}, cache)
    assert done.returncode == 1
    assert message in done.stderr
    assert not (cache / "source").exists()


def test_unknown_source_kind(tmp_path: Path) -> None:
    done = run_source({"ASTERISK_SOURCE": "git"}, tmp_path / "cache")
    assert done.returncode == 1
    assert "expected 'debian', 'tarball', 'snapshot' or 'tree'" in done.stderr


def test_tarball_checksum_mismatch_stops_and_keeps_nothing(
    tmp_path: Path, release: tuple[Path, str]
) -> None:
    tarball, _ = release
    cache = tmp_path / "cache"
    env = tarball_env(tarball, "0" * 64)
    done = run_source(env, cache)
    assert done.returncode == 1
    assert "checksum mismatch for asterisk-23.0.0.tar.gz" in done.stderr
    assert "Nothing was built" in done.stderr
    assert not list((cache / "source").glob("*/.complete"))


def test_missing_release_is_reported(tmp_path: Path) -> None:
    env = tarball_env(tmp_path / "nowhere.tar.gz", "0" * 64)
    done = run_source(env, tmp_path / "cache")
    assert done.returncode == 1
    assert "cannot download Asterisk 23.0.0" in done.stderr


def test_verified_tarball_is_cached(tmp_path: Path, release: tuple[Path, str]) -> None:
    tarball, digest = release
    cache = tmp_path / "cache"
    env = tarball_env(tarball, digest)
    first = run_source(env, cache)
    assert first.returncode == 0, first.stderr
    tarball.unlink()  # the second run must not need it
    second = run_source(env, cache)
    assert second.returncode == 0, second.stderr
    assert "downloading" not in second.stderr


# --- a snapshot tarball or a tree of the user's ----------------------------------


def fake_tree(top: Path) -> Path:
    """A stand-in Asterisk tree: what the script checks for, as a git clone."""
    (top / "channels").mkdir(parents=True)
    (top / "channels" / "chan_websocket.c").write_text("/* stand-in */\nint x;\n")
    (top / "configure").write_text("#!/bin/sh\n")
    git = ["git", "-C", str(top), "-c", "user.name=t", "-c", "user.email=t@localhost"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "stand-in"], check=True)
    return top


def one_patch_series(tmp_path: Path, patch: str) -> Path:
    series = tmp_path / "series-dir"
    series.mkdir()
    (series / "0001-x.patch").write_text(patch)
    (series / "series").write_text("0001-x.patch\n")
    return series


GOOD_PATCH = """\
From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001
From: Test <test@example.com>
Subject: [PATCH] chan_websocket: A patch that applies to the stand-in.

---
diff --git a/channels/chan_websocket.c b/channels/chan_websocket.c
--- a/channels/chan_websocket.c
+++ b/channels/chan_websocket.c
@@ -1,2 +1,2 @@
 /* stand-in */
-int x;
+int y;
--
2.39.5
"""


def run_check(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return run_in_cache(env, tmp_path / "cache", "check-patches")


def test_check_patches_against_a_tree_of_yours(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "asterisk")
    env = {"ASTERISK_SOURCE": "tree", "ASTERISK_TREE": str(tree)}
    good = run_check(
        {**env, "ASTERISK_PATCH_DIR": str(one_patch_series(tmp_path, GOOD_PATCH))}, tmp_path
    )
    assert good.returncode == 0, good.stderr
    assert f"applies cleanly to tree {tree}" in good.stderr
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    bad = run_check(
        {**env, "ASTERISK_PATCH_DIR": str(one_patch_series(bad_dir, BAD_PATCH))}, tmp_path
    )
    assert bad.returncode == 1
    assert "patch 1 (0001-x.patch) does not apply: hunk at channels/chan_websocket.c:40" in (
        bad.stderr
    )
    assert "while searching for" not in bad.stderr, "the error, not the whole hunk"


def test_the_tree_key_follows_uncommitted_changes(tmp_path: Path) -> None:
    tree = fake_tree(tmp_path / "asterisk")
    env = {
        **os.environ,
        "ASTERISK_SOURCE": "tree",
        "ASTERISK_TREE": str(tree),
        "ASTERISK_MARKS_CACHE": str(tmp_path / "cache"),
    }

    def key() -> str:
        done = subprocess.run(
            ["bash", str(BUILD), "key", "upstream"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    before = key()
    assert key() == before
    (tree / "channels" / "chan_websocket.c").write_text("/* changed */\n")
    assert key() != before


def make_snapshot(tmp_path: Path) -> tuple[Path, str]:
    """A ``git archive`` tarball of the stand-in tree, and its sha256."""
    tree = fake_tree(tmp_path / "src")
    snapshot = tmp_path / "asterisk-master-0000000000.tar.gz"
    subprocess.run(
        [
            "git",
            "-C",
            str(tree),
            "archive",
            "--prefix=asterisk-master/",
            "-o",
            str(snapshot),
            "HEAD",
        ],
        check=True,
    )
    digest = subprocess.run(
        ["sha256sum", str(snapshot)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    return snapshot, digest


def test_a_snapshot_is_verified_by_the_sha256_file_beside_it(tmp_path: Path) -> None:
    snapshot, digest = make_snapshot(tmp_path)
    series = one_patch_series(tmp_path, GOOD_PATCH)
    env = {
        "ASTERISK_SOURCE": "snapshot",
        "ASTERISK_SNAPSHOT": str(snapshot),
        "ASTERISK_PATCH_DIR": str(series),
    }
    missing = run_check(env, tmp_path)
    assert missing.returncode == 1
    assert "no sha256" in missing.stderr and "never built unverified" in missing.stderr
    Path(f"{snapshot}.sha256").write_text(f"{digest}  {snapshot.name}\n")
    good = run_check(env, tmp_path)
    assert good.returncode == 0, good.stderr
    wrong = run_check({**env, "ASTERISK_SNAPSHOT_SHA256": "0" * 64}, tmp_path)
    assert wrong.returncode == 1
    assert f"expected sha256 {'0' * 64}, got {digest}" in wrong.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"ASTERISK_SOURCE": "tree"}, "needs ASTERISK_TREE"),
        ({"ASTERISK_SOURCE": "tree", "ASTERISK_TREE": "/nonexistent"}, "no such directory"),
        ({"ASTERISK_SOURCE": "tree", "ASTERISK_TREE": "/tmp"}, "is not an Asterisk source tree"),
        ({"ASTERISK_SOURCE": "snapshot"}, "needs ASTERISK_SNAPSHOT"),
        (
            {"ASTERISK_SOURCE": "snapshot", "ASTERISK_SNAPSHOT": "/nonexistent.tar.xz"},
            "no such file",
        ),
    ],
)
def test_bad_tree_and_snapshot_settings_are_named(
    tmp_path: Path, env: dict[str, str], message: str
) -> None:
    done = run_check(env, tmp_path)
    assert done.returncode == 1
    assert message in done.stderr


def test_the_main_series_applies_to_the_pinned_master_snapshot(tmp_path: Path) -> None:
    """make check-patches SNAPSHOT=...: the default series for a snapshot is asterisk-patch/."""
    snapshots = sorted((ROOT.parent / "shared" / "upstream").glob("asterisk-master-*.tar.xz"))
    need(bool(snapshots), "the upstream master snapshot in ../shared/upstream/")
    env = {"ASTERISK_SOURCE": "snapshot", "ASTERISK_SNAPSHOT": str(snapshots[-1])}
    result = run_check(env, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = (ROOT / "asterisk-patch" / "series").read_text().splitlines()
    count = sum(1 for line in lines if line.strip() and not line.startswith("#"))
    series = ROOT / "asterisk-patch"
    assert f"the series in {series} ({count} patches) applies cleanly" in result.stderr


def _snapshot_env() -> dict[str, str]:
    snapshots = sorted((ROOT.parent / "shared" / "upstream").glob("asterisk-master-*.tar.xz"))
    need(bool(snapshots), "the upstream master snapshot in ../shared/upstream/")
    return {"ASTERISK_SOURCE": "snapshot", "ASTERISK_SNAPSHOT": str(snapshots[-1])}


def test_each_bug_fix_pull_request_applies_alone_to_master(tmp_path: Path) -> None:
    """asterisk-patch/pull-requests: every pull request without "after" is
    applied alone to the pristine snapshot, and the others on what they name."""
    result = run_check(_snapshot_env(), tmp_path)
    assert result.returncode == 0, result.stderr
    manifest = (ROOT / "asterisk-patch" / "pull-requests").read_text().splitlines()
    entries = [line.split("#")[0].strip() for line in manifest]
    pulls = [e.split(":", 1) for e in entries if e]
    alone = [name for name, patches in pulls if "after" not in patches]
    assert len(alone) >= 7
    for name in alone:
        assert re.search(
            rf"pull request {re.escape(name)} \([^)]+\) applies alone", result.stderr
        ), (
            name,
            result.stderr,
        )


def test_a_pull_request_that_needs_another_is_named(tmp_path: Path) -> None:
    """A pull request that claims to apply alone but needs a patch below it fails
    the check, naming it."""
    patches = tmp_path / "patches"
    shutil.copytree(ROOT / "asterisk-patch", patches, ignore=shutil.ignore_patterns("22.10"))
    (patches / "pull-requests").write_text("fragmented-text-dropped-whole: 0007\n")
    result = run_check({**_snapshot_env(), "ASTERISK_PATCH_DIR": str(patches)}, tmp_path)
    assert result.returncode != 0
    assert "pull request fragmented-text-dropped-whole" in result.stderr, result.stderr
    assert "0007-" in result.stderr


def test_the_feature_stack_is_a_series_without_8_10_and_11(tmp_path: Path) -> None:
    """``pr-series mark-played`` (make asterisk-pr) gives the feature with what
    it needs below it: the bug fixes, never patch 8 (upstream has #2141) nor
    10/11; the series applies to master; an unknown name is refused by name."""
    out = tmp_path / "stack"
    made = run_in_cache(_snapshot_env(), tmp_path / "cache", "pr-series", "mark-played", str(out))
    assert made.returncode == 0, made.stderr
    numbers = [name.split("-", 1)[0] for name in (out / "series").read_text().split()]
    assert numbers[-1] == "0016"
    assert {"0001", "0003", "0009", "0012", "0013", "0014", "0015"} <= set(numbers)
    assert not {"0008", "0010", "0011"} & set(numbers), numbers
    applied = run_check({**_snapshot_env(), "ASTERISK_PATCH_DIR": str(out)}, tmp_path)
    assert applied.returncode == 0, applied.stderr
    unknown = run_in_cache(
        _snapshot_env(), tmp_path / "cache", "pr-series", "no-such-pr", str(tmp_path / "x")
    )
    assert unknown.returncode != 0
    assert "no pull request named 'no-such-pr'" in unknown.stderr
    assert "mark-played" in unknown.stderr, "the names to choose from"
