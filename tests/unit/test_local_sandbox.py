"""LocalSandboxProvider against real git, real bare repos and real snapshots (no mocks)."""

from __future__ import annotations

import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from worker.providers.base import (
    BranchInfo,
    PermanentProviderError,
    RepoInfo,
    SandboxInfo,
    SandboxProvider,
)
from worker.providers.file_snapshots import FileSnapshotStore
from worker.providers.local_git import LocalGitRepoHost
from worker.providers.local_sandbox import LocalSandboxProvider

TOKEN = "ghs_s3cr3tT0kenValue"


def git(*args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
    return subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


@pytest.fixture
def host(tmp_path: Path) -> LocalGitRepoHost:
    return LocalGitRepoHost(tmp_path / "repos")


@pytest.fixture
def repo(host: LocalGitRepoHost) -> RepoInfo:
    return host.ensure_repo("recoupable", "account-1")


@pytest.fixture
def branch(host: LocalGitRepoHost, repo: RepoInfo) -> BranchInfo:
    return host.ensure_branch(repo, "session/s1")


@pytest.fixture
def sandboxes(tmp_path: Path) -> LocalSandboxProvider:
    return LocalSandboxProvider(tmp_path / "sandboxes")


def leftovers(provider: LocalSandboxProvider) -> list[str]:
    return sorted(p.name for p in provider.root.iterdir() if p.name.startswith((".tmp", ".trash")))


def test_implements_protocol(sandboxes: LocalSandboxProvider) -> None:
    assert isinstance(sandboxes, SandboxProvider)
    assert sandboxes.kind == "local"


def test_start_from_clone_checks_out_the_branch(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo, tmp_path: Path
) -> None:
    info = sandboxes.start_from_clone("sess-1", repo.clone_url, branch.name)
    assert info.name == "sess-1"
    assert info.reused is False
    assert info.workdir == sandboxes.root / "sess-1"
    assert info.started_at.tzinfo is not None
    work = sandboxes.workdir("sess-1")
    assert sandboxes.exists("sess-1")
    assert sandboxes.state("sess-1") == {"workdir": str(work)}
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=work) == "session/s1"
    assert git("rev-parse", "HEAD", cwd=work) == branch.sha
    assert git("remote", "get-url", "origin", cwd=work) == repo.clone_url
    # The default branch is there for merge-base diffs.
    assert git("merge-base", "HEAD", "origin/main", cwd=work) == branch.sha
    assert leftovers(sandboxes) == []

    # Agents can commit with no identity of their own (none global, none in env).
    (work / "new.txt").write_text("agent work\n")
    clean_env = {"GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(tmp_path)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_AUTHOR", "GIT_COMMITTER"))}
    subprocess.run(["git", "add", "new.txt"], cwd=work, env={**env, **clean_env}, check=True)
    subprocess.run(
        ["git", "commit", "-qm", "agent"], cwd=work, env={**env, **clean_env}, check=True
    )
    assert git("log", "-1", "--format=%ae", cwd=work) == "agent@sandbox.local"


def test_second_start_reuses_untouched(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    first = sandboxes.start_from_clone("sess-1", repo.clone_url, branch.name)
    marker = sandboxes.workdir("sess-1") / "uncommitted.txt"
    marker.write_text("keep me")
    second = sandboxes.start_from_clone("sess-1", repo.clone_url, branch.name)
    assert second.reused is True
    assert second.workdir == first.workdir
    assert second.started_at == first.started_at
    assert marker.read_text() == "keep me"


def test_concurrent_starts_make_one_sandbox(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    barrier = threading.Barrier(6)

    def start(_: int) -> SandboxInfo:
        barrier.wait()
        return sandboxes.start_from_clone("sess-c", repo.clone_url, branch.name)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(start, range(6)))
    assert sum(not r.reused for r in results) == 1
    assert {r.workdir for r in results} == {sandboxes.workdir("sess-c")}
    assert leftovers(sandboxes) == []
    assert (sandboxes.workdir("sess-c") / "README.md").is_file()


def test_stop_removes_a_tree_deeper_than_the_recursion_limit(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    """An agent's ``mkdir -p a/a/a/…`` 1,500 levels down (shutil.rmtree and os.walk
    recurse, and raised RecursionError: the sandbox could never be stopped)."""
    sandboxes.start_from_clone("deep", repo.clone_url, branch.name)
    work = sandboxes.workdir("deep")
    deep = work
    for _ in range(1500):
        deep = deep / "a"
        deep.mkdir()  # one level at a time: os.makedirs recurses too
    (deep / "f").write_text("x")
    sandboxes.stop("deep")
    assert not sandboxes.exists("deep")
    assert leftovers(sandboxes) == []


def test_stop_removes_and_is_idempotent(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    sandboxes.start_from_clone("sess-1", repo.clone_url, branch.name)
    sandboxes.start_from_clone("sess-1-b", repo.clone_url, branch.name)
    work = sandboxes.workdir("sess-1")
    # An agent left a read-only directory behind.
    (work / "ro").mkdir()
    (work / "ro" / "f").write_text("x")
    (work / "ro").chmod(0o500)
    # A crashed start left its temporary build; another sandbox has one too.
    (sandboxes.root / ".tmp+sess-1+crashed").mkdir()
    (sandboxes.root / ".tmp+sess-1+crashed" / "half").write_text("x")
    (sandboxes.root / ".tmp+sess-1-b+busy").mkdir()

    sandboxes.stop("sess-1")
    assert not sandboxes.exists("sess-1")
    assert not work.exists()
    assert leftovers(sandboxes) == [".tmp+sess-1-b+busy"]
    assert sandboxes.exists("sess-1-b")
    sandboxes.stop("sess-1")  # idempotent
    sandboxes.stop("never-started")

    again = sandboxes.start_from_clone("sess-1", repo.clone_url, branch.name)
    assert again.reused is False


def test_missing_branch_is_permanent_and_leaves_nothing(
    sandboxes: LocalSandboxProvider, repo: RepoInfo
) -> None:
    with pytest.raises(PermanentProviderError, match="clone"):
        sandboxes.start_from_clone("sess-x", repo.clone_url, "no-such-branch")
    assert not sandboxes.exists("sess-x")
    assert leftovers(sandboxes) == []


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", ".hidden", "a b", "x\x00", "a..b"])
def test_unsafe_sandbox_names_are_refused(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, name: str
) -> None:
    with pytest.raises(PermanentProviderError, match="invalid sandbox name"):
        sandboxes.start_from_clone(name, repo.clone_url, "main")
    with pytest.raises(PermanentProviderError):
        sandboxes.stop(name)
    with pytest.raises(PermanentProviderError):
        sandboxes.workdir(name)


def test_unsafe_branch_is_refused(sandboxes: LocalSandboxProvider, repo: RepoInfo) -> None:
    with pytest.raises(PermanentProviderError, match="invalid branch name"):
        sandboxes.start_from_clone("sess-1", repo.clone_url, "--upload-pack=touch /tmp/x")


def test_credentials_travel_only_in_the_environment(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    env = {
        "GIT_CONFIG_COUNT": "1",
        "GIT_CONFIG_KEY_0": "http.extraHeader",
        "GIT_CONFIG_VALUE_0": f"Authorization: Bearer {TOKEN}",
    }
    sandboxes.start_from_clone("sess-t", repo.clone_url, branch.name, env=env)
    git_dir = sandboxes.workdir("sess-t") / ".git"
    for path in git_dir.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path
    assert git("remote", "get-url", "origin", cwd=git_dir.parent) == repo.clone_url


def test_clone_environment_reaches_git_and_errors_hide_it(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    # The env is really used: a URL rewrite passed through it sends the clone nowhere.
    env = {
        "GIT_CONFIG_COUNT": "2",
        "GIT_CONFIG_KEY_0": "url.file:///nonexistent/.insteadOf",
        "GIT_CONFIG_VALUE_0": "file:///",
        "GIT_CONFIG_KEY_1": "http.extraHeader",
        "GIT_CONFIG_VALUE_1": f"Authorization: Bearer {TOKEN}",
    }
    with pytest.raises(PermanentProviderError) as err:
        sandboxes.start_from_clone("sess-e", repo.clone_url, branch.name, env=env)
    assert TOKEN not in str(err.value)
    assert not sandboxes.exists("sess-e")
    assert leftovers(sandboxes) == []


def test_the_clone_is_configured_for_its_branch_and_nothing_else(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo
) -> None:
    """The settings start_from_clone writes into the new repository's config (one write,
    not a git process each): exactly these, as git reads them back."""
    sandboxes.start_from_clone("sess-c", repo.clone_url, branch.name)
    work = sandboxes.workdir("sess-c")
    listed = git(
        "config", "--local", "--list", cwd=work, env={"GIT_CONFIG_NOSYSTEM": "1"}
    ).splitlines()
    ours = [line for line in listed if not line.startswith("core.")]
    assert ours == [
        "user.name=Sandbox Agent",
        "user.email=agent@sandbox.local",
        f"remote.origin.url={repo.clone_url}",
        "remote.origin.tagopt=--no-tags",
        "remote.origin.fetch=+refs/heads/session/s1:refs/remotes/origin/session/s1",
        "remote.origin.fetch=+refs/heads/main:refs/remotes/origin/main",
        "branch.session/s1.remote=origin",
        "branch.session/s1.merge=refs/heads/session/s1",
    ]
    # The fetched objects stay one pack (no loose object per file).
    objects = work / ".git" / "objects"
    assert list(objects.glob("pack/*.pack"))
    assert not [p for p in objects.glob("??/*")]


@pytest.mark.parametrize(
    "value",
    ['say "hi"', "back\\slash\\", "semi;colon #hash", " spaces ", "[section]", "a\\n"],
)
def test_git_config_text_reads_back_as_written(tmp_path: Path, value: str) -> None:
    from worker.providers.git import git_config_text

    path = tmp_path / "config"
    path.write_text(git_config_text({("remote", value): [("url", value)], ("user", None): []}))
    listed = git("config", "--file", str(path), "--null", "--list", cwd=tmp_path)
    assert listed.split("\0")[0] == f"remote.{value}.url\n{value}"


@pytest.mark.parametrize("value", ["line\nbreak", "nul\x00", "cr\r", "tab\there"])
def test_git_config_text_refuses_control_characters(value: str) -> None:
    from worker.providers.git import git_config_text

    with pytest.raises(PermanentProviderError, match="control character"):
        git_config_text({("remote", "origin"): [("url", value)]})


def test_start_from_snapshot_restores_and_reuses(
    sandboxes: LocalSandboxProvider, repo: RepoInfo, branch: BranchInfo, tmp_path: Path
) -> None:
    store = FileSnapshotStore(tmp_path / "snapshots")
    sandboxes.start_from_clone("sess-1", repo.clone_url, branch.name)
    work = sandboxes.workdir("sess-1")
    (work / "README.md").write_text("changed\n")
    (work / "untracked.txt").write_text("new\n")
    status = git("status", "--porcelain", cwd=work)
    snap = store.save("sess-1/1", work)
    sandboxes.stop("sess-1")

    restored = sandboxes.start_from_snapshot("sess-1", store, snap.url)
    assert restored.reused is False
    assert git("status", "--porcelain", cwd=work) == status
    assert (work / "untracked.txt").read_text() == "new\n"
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=work) == "session/s1"

    again = sandboxes.start_from_snapshot("sess-1", store, snap.url)
    assert again.reused is True
    assert leftovers(sandboxes) == []


def test_bad_snapshot_leaves_no_sandbox(sandboxes: LocalSandboxProvider, tmp_path: Path) -> None:
    store = FileSnapshotStore(tmp_path / "snapshots")
    store.root.mkdir()
    store.path_for("broken").write_bytes(b"not a snapshot")
    with pytest.raises(PermanentProviderError, match="corrupt"):
        sandboxes.start_from_snapshot("sess-b", store, store.url_for("broken"))
    with pytest.raises(PermanentProviderError, match="not found"):
        sandboxes.start_from_snapshot("sess-b", store, store.url_for("missing"))
    assert not sandboxes.exists("sess-b")
    assert leftovers(sandboxes) == []
