"""GitHubRepoHost (PyGithub, real HTTP) against the local GitHub-compatible server process."""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from tests.github_fake import FakeGitHubServer, start_fake_github
from tests.support.drains import drain
from tests.support.lifecycle import make_service, service_settings
from tests.support.sessions import load_session, new_session, run_history
from worker.config import Settings
from worker.providers.base import (
    PermanentProviderError,
    ProviderError,
    RepoHost,
    RepoInfo,
    TransientProviderError,
)
from worker.providers.git import run_git
from worker.providers.github import GitHubRepoHost, derive_git_base_url
from worker.providers.registry import build_repo_host

TOKEN = "fake-token-" + uuid.uuid4().hex  # matches none of the log redaction patterns
ORG = "acme"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGitHubServer]:
    with start_fake_github(tmp_path_factory.mktemp("fake-github"), TOKEN) as gh:
        yield gh


@pytest.fixture
def fake(server: FakeGitHubServer) -> FakeGitHubServer:
    server.reset()  # rules and counters; repositories stay (every test uses its own)
    return server


@pytest.fixture
def host(fake: FakeGitHubServer) -> GitHubRepoHost:
    return GitHubRepoHost(TOKEN, api_url=fake.api_url, timeout=5)


def _name() -> str:
    return f"ws-{uuid.uuid4().hex[:12]}"


def _secret_forms(token: str) -> list[str]:
    return [token, base64.b64encode(f"x-access-token:{token}".encode()).decode()]


# ------------------------------------------------------------------------ clone URLs


@pytest.mark.parametrize(
    ("api_url", "git_base"),
    [
        ("https://api.github.com", "https://github.com"),
        ("https://api.github.com/", "https://github.com"),
        ("https://ghe.example.com/api/v3", "https://ghe.example.com"),
        ("https://ghe.example.com/api/v3/", "https://ghe.example.com"),
        ("https://api.acme.ghe.com", "https://acme.ghe.com"),
        ("http://127.0.0.1:8123/api/v3", "http://127.0.0.1:8123"),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("https://user:pw@ghe.example.com:8443/api/v3", "https://ghe.example.com:8443"),
    ],
)
def test_git_base_is_derived_from_the_api_url(api_url: str, git_base: str) -> None:
    assert derive_git_base_url(api_url) == git_base


def test_clone_url_is_pure_and_honours_the_override() -> None:
    host = GitHubRepoHost(TOKEN)
    assert host.clone_url("recoupable", "abc") == "https://github.com/recoupable/abc.git"
    override = GitHubRepoHost(
        TOKEN, api_url="https://ghe.example.com/api/v3", git_url="https://git.example.com/"
    )
    assert override.clone_url("o", "r") == "https://git.example.com/o/r.git"
    assert TOKEN not in repr(host)


def test_from_settings_and_registry(fake: FakeGitHubServer) -> None:
    settings = Settings(
        repo_host="github", github_token=TOKEN, github_api_url=fake.api_url, github_git_url=None
    )
    host = build_repo_host(settings)
    assert isinstance(host, GitHubRepoHost)
    assert isinstance(host, RepoHost)
    assert host.kind == "github"
    assert host.clone_url(ORG, "r") == f"{fake.git_url}/{ORG}/r.git"
    with pytest.raises(PermanentProviderError, match="LIFECYCLE_GITHUB_TOKEN"):
        GitHubRepoHost.from_settings(Settings(repo_host="github", github_token=None))


# -------------------------------------------------------------------- repositories


def test_creates_private_auto_init_repo_once_then_reuses_it(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    first = host.ensure_repo(ORG, name)
    assert first == RepoInfo(
        owner=ORG,
        name=name,
        clone_url=f"{fake.git_url}/{ORG}/{name}.git",
        default_branch="main",
        created=True,
    )
    second = host.ensure_repo(ORG, name)
    assert second.created is False
    assert second.default_branch == "main"
    assert second.clone_url == first.clone_url

    stats = fake.stats()
    assert stats["repos_created_by_name"] == {f"{ORG}/{name}": 1}
    repo = fake.repo(f"{ORG}/{name}")
    assert repo is not None
    assert repo["private"] is True
    assert repo["auto_init"] is True
    assert set(repo["branches"]) == {"main"}  # auto_init: the default branch exists
    assert TOKEN not in first.clone_url


def test_twenty_concurrent_ensure_repo_create_exactly_one(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    barrier = threading.Barrier(20)
    results: list[RepoInfo] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(own_host: bool) -> None:
        h = GitHubRepoHost(TOKEN, api_url=fake.api_url, timeout=10) if own_host else host
        barrier.wait()
        try:
            info = h.ensure_repo(ORG, name)
        except BaseException as exc:
            with lock:
                errors.append(exc)
            return
        with lock:
            results.append(info)

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert len(results) == 20
    assert sum(info.created for info in results) == 1
    assert {info.clone_url for info in results} == {f"{fake.git_url}/{ORG}/{name}.git"}
    stats = fake.stats()
    assert stats["repos_created_by_name"] == {f"{ORG}/{name}": 1}
    assert stats["responses"]["POST /orgs/{org}/repos 201"] == 1
    # every other POST that reached the server lost the race with a 422
    losers = stats["responses"].get("POST /orgs/{org}/repos 422", 0)
    assert losers == stats["requests"]["POST /orgs/{org}/repos"] - 1


def test_a_concurrent_creator_winning_the_race_is_success(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    fake.inject(rf"/orgs/{ORG}/repos$", method="POST", action="race")
    info = host.ensure_repo(ORG, name)
    assert info.created is False  # the other client created it; we got 422 and reused it
    stats = fake.stats()
    assert stats["repos_created_by_name"] == {f"{ORG}/{name}": 1}
    assert stats["responses"]["POST /orgs/{org}/repos 422"] == 1


def test_owner_that_is_the_token_user_gets_a_user_repo(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    info = host.ensure_repo(fake.user, name)
    assert info.created is True
    stats = fake.stats()
    assert stats["requests"]["POST /user/repos"] == 1
    repo = fake.repo(f"{fake.user}/{name}")
    assert repo is not None and repo["private"] is True


def test_second_read_of_an_unchanged_repo_is_a_free_304(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    host.ensure_repo(ORG, name)
    host.ensure_repo(ORG, name)  # 200, ETag cached
    before = fake.stats()
    again = host.ensure_repo(ORG, name)
    after = fake.stats()
    assert again.created is False and again.default_branch == "main"
    assert after["not_modified_by_route"]["GET /repos/{owner}/{repo}"] >= 1
    assert after["not_modified"] == before["not_modified"] + 1
    assert after["rate_limit"]["remaining"] == before["rate_limit"]["remaining"]


# -------------------------------------------------------------------------- branches


def test_branch_is_cut_from_the_default_head_and_reused(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    repo = host.ensure_repo(ORG, name)
    main_sha = fake.repo(f"{ORG}/{name}")["branches"]["main"]  # type: ignore[index]

    first = host.ensure_branch(repo, "session/one")
    assert (first.name, first.sha, first.created) == ("session/one", main_sha, True)
    again = host.ensure_branch(repo, "session/one")
    assert (again.sha, again.created) == (main_sha, False)
    other = host.ensure_branch(repo, "session/two")
    assert other.created is True

    branches = fake.repo(f"{ORG}/{name}")["branches"]  # type: ignore[index]
    assert branches == {"main": main_sha, "session/one": main_sha, "session/two": main_sha}
    assert fake.stats()["refs_created"] == 2


def test_branch_created_concurrently_by_someone_else_is_success(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    repo = host.ensure_repo(ORG, _name())
    fake.inject(r"/git/refs$", method="POST", action="race")
    info = host.ensure_branch(repo, "raced")
    assert info.created is False
    stats = fake.stats()
    assert stats["responses"]["POST /repos/{owner}/{repo}/git/refs 422"] == 1
    assert stats["refs_created"] == 1


def test_invalid_branch_name_is_permanent(host: GitHubRepoHost) -> None:
    repo = RepoInfo(ORG, "r", "x", "main", False)
    with pytest.raises(PermanentProviderError, match="invalid branch name"):
        host.ensure_branch(repo, "bad..name")


# ----------------------------------------------------------------------------- clone


def test_git_clone_over_http_with_the_token_only_in_the_environment(
    fake: FakeGitHubServer, host: GitHubRepoHost, tmp_path: Path
) -> None:
    repo = host.ensure_repo(ORG, _name())
    host.ensure_branch(repo, "session/clone")
    url, env = host.clone_source(repo.clone_url)
    assert url == repo.clone_url
    for secret in _secret_forms(TOKEN):
        assert secret not in url

    # Without the credentials the server refuses.
    with pytest.raises(PermanentProviderError):
        run_git(["clone", "--quiet", url, str(tmp_path / "anon")], action="clone")

    dest = tmp_path / "checkout"
    run_git(
        ["clone", "--quiet", "--branch", "session/clone", url, str(dest)],
        action="clone",
        extra_env=env,
    )
    assert (dest / "README.md").is_file()
    head = run_git(["rev-parse", "--abbrev-ref", "HEAD"], action="rev-parse", cwd=dest)
    assert head.stdout.strip() == "session/clone"
    config = (dest / ".git" / "config").read_text()
    assert url in config
    for path in (dest / ".git").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in _secret_forms(TOKEN):
                assert secret.encode() not in data, path

    # A later fetch in the clone works again with the same environment.
    run_git(["fetch", "--quiet", "origin"], action="fetch", cwd=dest, extra_env=env)


def test_clone_source_never_sends_the_token_to_another_host(host: GitHubRepoHost) -> None:
    url, env = host.clone_source("https://elsewhere.example.com/o/r.git")
    assert url == "https://elsewhere.example.com/o/r.git"
    assert all(TOKEN not in value for value in env.values())
    assert "GIT_CONFIG_COUNT" not in env


# ---------------------------------------------------------------------------- faults


def test_injected_502_is_transient_then_recovers(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    name = _name()
    fake.inject(rf"/repos/{ORG}/{name}$", method="GET", status=502)
    with pytest.raises(TransientProviderError, match="502") as caught:
        host.ensure_repo(ORG, name)
    assert caught.value.retry_after is None
    assert host.ensure_repo(ORG, name).created is True


def test_injected_502_on_ref_creation_is_transient(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    repo = host.ensure_repo(ORG, _name())
    fake.inject(r"/git/refs$", method="POST", status=503)
    with pytest.raises(TransientProviderError, match="503"):
        host.ensure_branch(repo, "b")
    assert host.ensure_branch(repo, "b").created is True


@pytest.mark.parametrize("status", [403, 429])
def test_secondary_rate_limit_is_transient_with_retry_after(
    fake: FakeGitHubServer, host: GitHubRepoHost, status: int
) -> None:
    name = _name()
    fake.inject_secondary_rate_limit(
        retry_after=2, path_regex=rf"/orgs/{ORG}/repos$", method="POST", status=status
    )
    with pytest.raises(TransientProviderError, match="secondary rate limit") as caught:
        host.ensure_repo(ORG, name)
    assert caught.value.retry_after == 2
    assert host.ensure_repo(ORG, name).created is True


def test_primary_rate_limit_waits_until_the_reset(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    fake.inject_primary_rate_limit(reset_in=120, path_regex=r"/repos/")
    started = time.time()
    with pytest.raises(TransientProviderError, match="rate limit") as caught:
        host.ensure_repo(ORG, _name())
    retry_after = caught.value.retry_after
    assert retry_after is not None
    expected = 120 - (time.time() - started)
    assert expected - 2 <= retry_after <= 121


def test_server_enforced_rate_limit_is_transient(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    fake.set_rate_limit(remaining=0, reset_in=30)
    try:
        with pytest.raises(TransientProviderError) as caught:
            host.ensure_repo(ORG, _name())
        assert caught.value.retry_after is not None
        assert 1 <= caught.value.retry_after <= 31
    finally:
        fake.reset()


def test_bad_credentials_are_permanent_and_never_leak_the_token(
    fake: FakeGitHubServer,
) -> None:
    wrong = "wrong-token-" + uuid.uuid4().hex
    host = GitHubRepoHost(wrong, api_url=fake.api_url, timeout=5)
    with pytest.raises(PermanentProviderError) as caught:
        host.ensure_repo(ORG, _name())
    message = str(caught.value)
    assert "401" in message and "Bad credentials" in message
    assert "credentials" in message.lower()
    for secret in [*_secret_forms(wrong), *_secret_forms(TOKEN)]:
        assert secret not in message
    assert fake.stats()["auth_failures"] >= 1


def test_forbidden_without_rate_limit_signals_is_permanent(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    fake.inject(rf"/orgs/{ORG}/repos$", method="POST", status=403)
    with pytest.raises(PermanentProviderError, match="denied access") as caught:
        host.ensure_repo(ORG, _name())
    assert TOKEN not in str(caught.value)


def test_missing_org_that_is_not_the_user_is_permanent(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    fake.inject(r"/orgs/nowhere/repos$", method="POST", status=404)
    with pytest.raises(PermanentProviderError, match="no organization 'nowhere'"):
        host.ensure_repo("nowhere", _name())


def test_validation_failure_on_create_is_permanent(
    fake: FakeGitHubServer, host: GitHubRepoHost
) -> None:
    fake.inject(
        rf"/orgs/{ORG}/repos$",
        method="POST",
        status=422,
        body={
            "message": "Validation Failed",
            "errors": [
                {
                    "resource": "Repository",
                    "code": "custom",
                    "field": "name",
                    "message": "name is too long",
                }
            ],
        },
    )
    with pytest.raises(PermanentProviderError, match="name is too long"):
        host.ensure_repo(ORG, _name())


def _assert_asks_to_check_access(message: str, full_name: str) -> None:
    assert full_name in message
    assert "check the token's access" in message
    assert "LIFECYCLE_GITHUB_TOKEN" in message
    for secret in _secret_forms(TOKEN):
        assert secret not in message


@pytest.mark.parametrize("owner_kind", ["org", "token-user"])
def test_repo_that_exists_but_the_token_cannot_read_is_permanent(
    fake: FakeGitHubServer, host: GitHubRepoHost, owner_kind: str
) -> None:
    owner, name = (ORG if owner_kind == "org" else fake.user), _name()
    fake.add_repo(owner, name, visible=False)
    with pytest.raises(PermanentProviderError) as caught:
        host.ensure_repo(owner, name)
    _assert_asks_to_check_access(str(caught.value), f"{owner}/{name}")

    stats = fake.stats()
    assert stats["repos_created"] == 0
    # read (404), create (422 name already exists), read again (404); no retry loop
    assert stats["responses"]["GET /repos/{owner}/{repo} 404"] == 2
    create = "POST /orgs/{org}/repos" if owner_kind == "org" else "POST /user/repos"
    assert stats["responses"][f"{create} 422"] == 1
    repo = fake.repo(f"{owner}/{name}")
    assert repo is not None and repo["visible"] is False  # untouched, still hidden
    assert set(repo["branches"]) == {"main"}


def test_hidden_repo_is_invisible_everywhere_until_access_is_granted(
    fake: FakeGitHubServer, host: GitHubRepoHost, tmp_path: Path
) -> None:
    name = _name()
    fake.add_repo(ORG, name, visible=False)
    repo = RepoInfo(ORG, name, host.clone_url(ORG, name), "main", False)
    with pytest.raises(ProviderError, match="404"):
        host.ensure_branch(repo, "session/x")
    assert fake.stats()["responses"] == {"GET /repos/{owner}/{repo}/git/ref/{ref} 404": 1}
    url, env = host.clone_source(repo.clone_url)
    with pytest.raises(PermanentProviderError):
        run_git(["clone", "--quiet", url, str(tmp_path / "hidden")], action="clone", extra_env=env)

    fake.add_repo(ORG, name, visible=True)  # the token is granted access
    info = host.ensure_repo(ORG, name)
    assert info.created is False
    assert host.ensure_branch(info, "session/x").created is True
    assert fake.stats()["repos_created"] == 0  # created by "someone else", never by us


def test_unreadable_existing_repo_fails_the_provision_run_at_once(
    fake: FakeGitHubServer, db_clean: dict[str, str], redis_client: Any, tmp_path: Path
) -> None:
    """The whole service: the provision run fails on its first attempt, not after the
    retries, and the session's lifecycleError says what to fix."""
    settings = service_settings(
        tmp_path,
        fault_plan=None,
        repo_host="github",
        github_token=SecretStr(TOKEN),
        github_api_url=fake.api_url,
        github_git_url=None,
    )
    svc = make_service(settings)
    sid = new_session(svc)
    s = load_session(svc, sid)
    assert s.repo_owner and s.repo_name
    full_name = f"{s.repo_owner}/{s.repo_name}"
    fake.add_repo(s.repo_owner, s.repo_name, visible=False)

    assert drain(svc, sid) == ["failed"]
    s = load_session(svc, sid)
    assert s.lifecycle_state == "failed"
    assert s.lifecycle_error is not None
    _assert_asks_to_check_access(s.lifecycle_error, full_name)
    assert not s.lifecycle_error.startswith("gave up")
    (provision,) = run_history(svc, sid)
    assert (provision.kind, provision.state, provision.attempts) == ("provision", "failed", 1)
    assert provision.error == s.lifecycle_error
    assert fake.stats()["repos_created"] == 0


def test_timeout_is_transient(fake: FakeGitHubServer) -> None:
    host = GitHubRepoHost(TOKEN, api_url=fake.api_url, timeout=1)
    fake.inject(r"/repos/", method="GET", action="delay", delay=3)
    with pytest.raises(TransientProviderError, match="did not answer in time"):
        host.ensure_repo(ORG, _name())


def test_unreachable_server_is_transient() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    host = GitHubRepoHost(TOKEN, api_url=f"http://127.0.0.1:{port}/api/v3", timeout=2)
    with pytest.raises(TransientProviderError, match="could not be reached"):
        host.ensure_repo(ORG, _name())
