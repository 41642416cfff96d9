"""Hostile sandbox content: hooks and repository config planted by an agent never run.

Every dangerous git mechanism is planted in a live sandbox (and carried inside a snapshot)
with a command that would write a marker file outside the sandbox. The worker's git work
(diff, snapshot, hibernate, restore, archive) must leave no marker.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.hostile import CONFIG_KEYS, plant_config, plant_hooks
from worker.providers.base import PermanentProviderError
from worker.providers.git import git_env, sandbox_git_dir, subprocess_env
from worker.providers.git_diff import compute_diff
from worker.providers.local_git import LocalGitRepoHost
from worker.providers.local_sandbox import LocalSandboxProvider


@pytest.fixture(autouse=True)
def _secret_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's own environment carries secrets, as in production."""
    monkeypatch.setenv("LIFECYCLE_GITHUB_TOKEN", "ghp_worker_secret_token_value")
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", "postgresql://u:dbpassword@db/x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-value")
    # Would make GNU tar follow links out of a sandbox when it snapshots it.
    monkeypatch.setenv("TAR_OPTIONS", "--dereference")


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A live sandbox cut from a workspace repo the way the worker makes them."""
    host = LocalGitRepoHost(tmp_path / "repos")
    repo = host.ensure_repo("recoupable", "acct")
    host.ensure_branch(repo, "session/s1")
    provider = LocalSandboxProvider(tmp_path / "sandboxes")
    info = provider.start_from_clone("s1", repo.clone_url, "session/s1")
    work = info.workdir
    assert work is not None
    (work / "notes.txt").write_text("agent work\n")
    (work / "README.md").write_text("changed\n")
    return work


def no_marker(marker: Path) -> None:
    assert not marker.exists(), marker.read_text()[:2000]


def test_planted_hooks_never_run_during_a_diff(sandbox: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    plant_hooks(sandbox / ".git", marker)
    diff = compute_diff(sandbox)
    assert {f["path"] for f in diff["files"]} == {"notes.txt", "README.md"}
    no_marker(marker)


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_planted_config_never_runs_during_a_diff(sandbox: Path, tmp_path: Path, key: str) -> None:
    marker = tmp_path / "marker"
    plant_config(sandbox, marker, key)
    diff = compute_diff(sandbox)
    paths = {f["path"] for f in diff["files"]}
    assert {"notes.txt", "README.md"} <= paths
    no_marker(marker)


def test_the_planting_is_real(sandbox: Path, tmp_path: Path) -> None:
    """The same plants DO run under plain git: the tests above can fail."""
    marker = tmp_path / "marker"
    plant_hooks(sandbox / ".git", marker)
    plant_config(sandbox, marker, "core.fsmonitor")
    subprocess.run(["git", "add", "-A", "-N"], cwd=sandbox, check=True, capture_output=True)
    text = marker.read_text()
    assert "hook:post-index-change" in text and "core.fsmonitor" in text
    assert "ghp_worker_secret_token_value" in text  # what the issue saw leak


def test_subprocess_environment_is_allow_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_CONFIG_PARAMETERS", "'core.hooksPath'='/tmp'")
    for env in (subprocess_env(), git_env()):
        assert not [k for k in env if k.startswith(("LIFECYCLE_", "AWS_", "TAR_"))]
        assert "GIT_CONFIG_PARAMETERS" not in env
        joined = "\n".join(f"{k}={v}" for k, v in env.items())
        for secret in ("ghp_worker_secret_token_value", "dbpassword", "aws-secret-value"):
            assert secret not in joined
        assert env["HOME"] != os.environ.get("HOME")
        assert os.listdir(env["HOME"]) == []


def _spy_path(tmp_path: Path, log: Path) -> str:
    """A PATH whose git, tar and zstd record their environment, then run the real one."""
    bindir = tmp_path / "spybin"
    bindir.mkdir()
    real_path = os.environ["PATH"]
    for tool in ("git", "tar", "zstd"):
        script = bindir / tool
        script.write_text(
            f"#!/bin/sh\n{{ echo '== {tool}'; env; }} >> {log}\n"
            f'PATH={real_path} exec {tool} "$@"\n'
        )
        script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return f"{bindir}:{real_path}"


def test_every_subprocess_gets_the_allow_listed_environment(
    sandbox: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.providers.file_snapshots import FileSnapshotStore

    log = tmp_path / "spy.log"
    monkeypatch.setenv("PATH", _spy_path(tmp_path, log))
    compute_diff(sandbox)
    store = FileSnapshotStore(tmp_path / "snapshots")
    saved = store.save("session-1/run-1", sandbox)
    store.restore(saved.url, tmp_path / "restored")
    text = log.read_text()
    assert "== git" in text
    assert "LIFECYCLE_" not in text and "AWS_" not in text
    for secret in ("ghp_worker_secret_token_value", "dbpassword", "aws-secret-value"):
        assert secret not in text


def _refuse(sandbox: Path, mutate: Callable[[Path], None], match: str) -> None:
    mutate(sandbox / ".git")
    with pytest.raises(PermanentProviderError, match=match):
        compute_diff(sandbox)


def test_links_inside_git_are_never_followed(sandbox: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-index"
    outside.write_bytes(b"secret")

    def index_link(git: Path) -> None:
        (git / "index").unlink()
        (git / "index").symlink_to(outside)

    _refuse(sandbox, index_link, "index")


def test_alternates_are_refused(sandbox: Path, tmp_path: Path) -> None:
    def alternates(git: Path) -> None:
        (git / "objects" / "info").mkdir(exist_ok=True)
        (git / "objects" / "info" / "alternates").write_text(str(tmp_path / "repos") + "\n")

    _refuse(sandbox, alternates, "alternates")


def test_git_dir_link_is_refused(sandbox: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.git"
    (sandbox / ".git").rename(real)
    (sandbox / ".git").symlink_to(real)
    with pytest.raises(PermanentProviderError, match=r"\.git"):
        compute_diff(sandbox)


def test_shadow_git_dir_leaves_the_sandbox_untouched(sandbox: Path) -> None:
    index = sandbox / ".git" / "index"
    before = index.read_bytes()
    with sandbox_git_dir(sandbox) as env:
        assert not env["GIT_DIR"].startswith(str(sandbox))
    compute_diff(sandbox)
    assert index.read_bytes() == before
