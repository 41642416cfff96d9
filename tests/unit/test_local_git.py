"""LocalGitRepoHost against real git and real files (no mocks)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from worker.providers.base import (
    PermanentProviderError,
    RepoHost,
    RepoInfo,
    TransientProviderError,
)
from worker.providers.git import redact, strip_url_credentials
from worker.providers.local_git import LocalGitRepoHost

OWNER = "recoupable"
NAME = "0b7f3c1e-5d4a-4c1b-9a55-2f6a7c8d9e10"


def git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def host(tmp_path: Path) -> LocalGitRepoHost:
    return LocalGitRepoHost(tmp_path / "repos")


def test_implements_protocol(host: LocalGitRepoHost) -> None:
    assert isinstance(host, RepoHost)
    assert host.kind == "local"


def test_clone_url_is_a_pure_file_url(tmp_path: Path) -> None:
    host = LocalGitRepoHost(tmp_path / "not-yet")
    url = host.clone_url(OWNER, NAME)
    assert url == (tmp_path / "not-yet" / OWNER / f"{NAME}.git").as_uri()
    assert url.startswith("file:///")
    assert not (tmp_path / "not-yet").exists()
    assert host.clone_source(url) == (url, {})


def test_ensure_repo_creates_bare_repo_with_initial_commit(host: LocalGitRepoHost) -> None:
    info = host.ensure_repo(OWNER, NAME)
    assert info == RepoInfo(
        owner=OWNER,
        name=NAME,
        clone_url=host.clone_url(OWNER, NAME),
        default_branch="main",
        created=True,
    )
    git_dir = host.repo_path(OWNER, NAME)
    assert git("--git-dir", str(git_dir), "rev-parse", "--is-bare-repository") == "true"
    assert git("--git-dir", str(git_dir), "symbolic-ref", "HEAD") == "refs/heads/main"
    assert git("--git-dir", str(git_dir), "show", "main:README.md") == f"# {NAME}"
    assert git("--git-dir", str(git_dir), "rev-list", "--count", "main") == "1"
    assert host.list_branches(OWNER, NAME) == ["main"]

    again = host.ensure_repo(OWNER, NAME)
    assert again.created is False
    assert again.clone_url == info.clone_url
    assert host.count_repos() == 1


def test_ensure_repo_works_without_git_identity(tmp_path: Path, monkeypatch: Any) -> None:
    # No global/system config at all: the host's own fixed identity must be used.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("GIT_AUTHOR_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_NAME", "GIT_COMMITTER_EMAIL"):
        monkeypatch.delenv(var, raising=False)
    host = LocalGitRepoHost(tmp_path / "repos")
    assert host.ensure_repo(OWNER, NAME).created is True


def test_ensure_repo_created_once_under_20_threads(host: LocalGitRepoHost) -> None:
    barrier = threading.Barrier(20)

    def create(_: int) -> RepoInfo:
        barrier.wait()
        return host.ensure_repo(OWNER, NAME)

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(create, range(20)))

    assert sum(r.created for r in results) == 1
    assert {r.clone_url for r in results} == {host.clone_url(OWNER, NAME)}
    assert host.count_repos() == 1
    assert host.list_branches(OWNER, NAME) == ["main"]
    # No temporary builds left behind by the losers.
    assert sorted(p.name for p in (host.root / OWNER).iterdir()) == [f"{NAME}.git"]


def _create_in_process(root: str, start: Any, results: Any) -> None:
    host = LocalGitRepoHost(Path(root))
    start.wait()
    repo = host.ensure_repo(OWNER, NAME)
    branch = host.ensure_branch(repo, "session/proc")
    results.put((repo.created, branch.created, branch.sha))


def test_repo_and_branch_created_once_across_processes(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    results = ctx.Queue()
    root = str(tmp_path / "repos")
    procs = [ctx.Process(target=_create_in_process, args=(root, start, results)) for _ in range(3)]
    for proc in procs:
        proc.start()
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0

    assert sum(repo_created for repo_created, _, _ in outcomes) == 1
    assert sum(branch_created for _, branch_created, _ in outcomes) == 1
    assert len({sha for _, _, sha in outcomes}) == 1
    host = LocalGitRepoHost(tmp_path / "repos")
    assert host.count_repos() == 1
    assert host.list_branches(OWNER, NAME) == ["main", "session/proc"]


def test_ensure_branch_cuts_from_main_once(host: LocalGitRepoHost) -> None:
    repo = host.ensure_repo(OWNER, NAME)
    main_sha = git("--git-dir", str(host.repo_path(OWNER, NAME)), "rev-parse", "main")
    first = host.ensure_branch(repo, "session/abc")
    assert first.created is True
    assert first.name == "session/abc"
    assert first.sha == main_sha
    second = host.ensure_branch(repo, "session/abc")
    assert second.created is False
    assert second.sha == main_sha
    assert host.list_branches(OWNER, NAME) == ["main", "session/abc"]


def test_existing_branch_is_left_where_it_is(host: LocalGitRepoHost, tmp_path: Path) -> None:
    repo = host.ensure_repo(OWNER, NAME)
    first = host.ensure_branch(repo, "work")
    # Advance main: the existing branch must not move.
    wt = tmp_path / "wt"
    git("clone", "-q", repo.clone_url, str(wt))
    (wt / "x.txt").write_text("x\n")
    git("add", "x.txt", cwd=wt)
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x", cwd=wt)
    git("push", "-q", "origin", "main", cwd=wt)
    again = host.ensure_branch(repo, "work")
    assert again.created is False
    assert again.sha == first.sha
    assert host.ensure_branch(repo, "later").sha != first.sha


def test_ensure_branch_created_once_under_20_threads(host: LocalGitRepoHost) -> None:
    repo = host.ensure_repo(OWNER, NAME)
    barrier = threading.Barrier(20)

    def create(_: int) -> tuple[bool, str]:
        barrier.wait()
        info = host.ensure_branch(repo, "session/concurrent")
        return info.created, info.sha

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(create, range(20)))

    assert sum(created for created, _ in results) == 1
    assert len({sha for _, sha in results}) == 1
    assert host.list_branches(OWNER, NAME) == ["main", "session/concurrent"]


def test_clone_checks_out_the_branch(host: LocalGitRepoHost, tmp_path: Path) -> None:
    repo = host.ensure_repo(OWNER, NAME)
    branch = host.ensure_branch(repo, "session/clone")
    url, env = host.clone_source(repo.clone_url)
    assert env == {}
    dest = tmp_path / "checkout"
    git("clone", "-q", "--branch", branch.name, url, str(dest))
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=dest) == "session/clone"
    assert git("rev-parse", "HEAD", cwd=dest) == branch.sha
    assert (dest / "README.md").read_text() == f"# {NAME}\n"


def test_repo_path_with_spaces_in_root(tmp_path: Path) -> None:
    host = LocalGitRepoHost(tmp_path / "data dir")
    repo = host.ensure_repo(OWNER, NAME)
    assert "%20" in repo.clone_url
    dest = tmp_path / "c"
    git("clone", "-q", repo.clone_url, str(dest))
    assert (dest / "README.md").is_file()


def test_hand_made_empty_repo_gets_a_default_branch(host: LocalGitRepoHost) -> None:
    path = host.repo_path(OWNER, NAME)
    path.parent.mkdir(parents=True)
    git("init", "-q", "--bare", str(path))
    info = host.ensure_repo(OWNER, NAME)
    assert info.created is False
    assert host.list_branches(OWNER, NAME) == ["main"]


def test_directory_that_is_not_a_repo_is_refused(host: LocalGitRepoHost) -> None:
    path = host.repo_path(OWNER, NAME)
    path.mkdir(parents=True)
    (path / "junk").write_text("x")
    with pytest.raises(PermanentProviderError, match="not a git repository"):
        host.ensure_repo(OWNER, NAME)


@pytest.mark.parametrize(
    ("owner", "name"),
    [
        ("", NAME),
        (OWNER, ""),
        ("..", NAME),
        (OWNER, ".."),
        ("a/b", NAME),
        (OWNER, "x/y"),
        (OWNER, "../escape"),
        (".hidden", NAME),
        (OWNER, "-option"),
        (OWNER, "has space"),
        (OWNER, "a..b"),
        (OWNER, "x" * 101),
    ],
)
def test_unsafe_owner_or_name_is_refused(host: LocalGitRepoHost, owner: str, name: str) -> None:
    with pytest.raises(PermanentProviderError):
        host.clone_url(owner, name)
    with pytest.raises(PermanentProviderError):
        host.ensure_repo(owner, name)
    assert not host.root.exists() or host.count_repos() == 0


@pytest.mark.parametrize(
    "branch",
    ["", "-rf", "a..b", "has space", "x~1", "x^", "x:y", "end.lock", "/abs", "trail/", "HEAD",
     "a\x00b", "a\nb", "@{x}", "x" * 201],
)  # fmt: skip
def test_invalid_branch_is_refused(host: LocalGitRepoHost, branch: str) -> None:
    repo = host.ensure_repo(OWNER, NAME)
    with pytest.raises(PermanentProviderError, match="invalid branch name"):
        host.ensure_branch(repo, branch)
    assert host.list_branches(OWNER, NAME) == ["main"]


def test_branch_on_missing_repo_is_permanent(host: LocalGitRepoHost) -> None:
    missing = RepoInfo(OWNER, "nope", host.clone_url(OWNER, "nope"), "main", False)
    with pytest.raises(PermanentProviderError, match="does not exist"):
        host.ensure_branch(missing, "b")


def test_branch_conflicting_with_existing_ref_is_permanent(host: LocalGitRepoHost) -> None:
    repo = host.ensure_repo(OWNER, NAME)
    host.ensure_branch(repo, "session")
    with pytest.raises(PermanentProviderError, match="update-ref"):
        host.ensure_branch(repo, "session/child")


def test_stale_ref_lock_is_transient(tmp_path: Path) -> None:
    host = LocalGitRepoHost(tmp_path / "repos", lock_retries=2)
    repo = host.ensure_repo(OWNER, NAME)
    lock = host.repo_path(OWNER, NAME) / "refs" / "heads" / "locked.lock"
    lock.write_text("")
    with pytest.raises(TransientProviderError, match="update-ref"):
        host.ensure_branch(repo, "locked")
    lock.unlink()
    assert host.ensure_branch(repo, "locked").created is True


def test_count_repos_ignores_temporary_builds(host: LocalGitRepoHost) -> None:
    host.ensure_repo(OWNER, "one")
    host.ensure_repo("other", "two")
    (host.root / OWNER / ".three.git.tmp-abc").mkdir()
    assert host.count_repos() == 2


def test_messages_never_carry_credentials() -> None:
    url = "https://x-access-token:ghs_SECRET123@github.com/o/r.git"
    assert strip_url_credentials(url) == "https://github.com/o/r.git"
    assert strip_url_credentials("file:///tmp/r.git") == "file:///tmp/r.git"
    text = f"fatal: unable to access '{url}': Authorization: Bearer ghs_SECRET123 / tok-XYZ9"
    cleaned = redact(text, ["tok-XYZ9"])
    assert "SECRET" not in cleaned
    assert "tok-XYZ9" not in cleaned
    assert "github.com/o/r.git" in cleaned


def test_abandoned_builds_are_swept(host: LocalGitRepoHost) -> None:
    owner_dir = host.root / OWNER
    owner_dir.mkdir(parents=True)
    old = owner_dir / f".{NAME}.git.tmp-killed"
    fresh = owner_dir / f".{NAME}.git.tmp-running"
    old.mkdir()
    fresh.mkdir()
    os.utime(old, (1_000_000_000, 1_000_000_000))
    host.ensure_repo(OWNER, NAME)
    assert not old.exists()
    assert fresh.exists()
