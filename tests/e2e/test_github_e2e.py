"""LIFECYCLE_REPO_HOST=github end to end: the API and a real worker process drive
PyGithub against the local GitHub-compatible server (real HTTP, real git over HTTP)."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from tests.github_fake import FakeGitHubServer, start_fake_github
from tests.support.factories import Caller, add_member, make_account, make_caller
from tests.support.servers import redis_db_url
from tests.support.stack import Stack, create, get, history, kick, make_stack, running, wait_state

pytestmark = pytest.mark.e2e

TOKEN = "ghp_" + secrets.token_hex(18)


@pytest.fixture(scope="module")
def fake_github(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGitHubServer]:
    with start_fake_github(tmp_path_factory.mktemp("github"), TOKEN) as server:
        yield server


@pytest.fixture(scope="module")
def gh_stack(
    server_urls: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
    fake_github: FakeGitHubServer,
) -> Iterator[Stack]:
    s = make_stack(
        server_urls,
        tmp_path_factory.mktemp("e2e-github"),
        redis_db_url(server_urls["broker_url"], 2),
        fake_github.settings_env(),
    )
    with running(s, concurrency=4):
        yield s


@pytest.fixture
def gh(fake_github: FakeGitHubServer, db_clean: dict[str, str]) -> FakeGitHubServer:
    fake_github.reset()
    return fake_github


def _assert_no_token(*texts: str) -> None:
    basic = base64.b64encode(f"x-access-token:{TOKEN}".encode()).decode()
    for text in texts:
        assert TOKEN not in text
        assert basic not in text


def test_personal_and_org_sessions_reach_active(gh_stack: Stack, gh: FakeGitHubServer) -> None:
    caller = make_caller("gh-person")
    org = make_account("gh-org", org=True)
    add_member(org, caller.account_id)
    with gh_stack.client(caller) as client:
        personal = create(client)["id"]
        org_session = create(client, organizationId=str(org))["id"]
        again = create(client)["id"]
        sessions = {
            sid: wait_state(client, sid, "active") for sid in (personal, org_session, again)
        }
        responses = [json.dumps(s) for s in sessions.values()]
        responses += [json.dumps(history(client, sid)) for sid in sessions]
    stats = gh.stats()
    mine, theirs = f"recoupable/{caller.account_id}", f"recoupable/{org}"
    assert stats["repos_created_by_name"] == {mine: 1, theirs: 1}
    for full_name in (mine, theirs):
        repo = gh.repo(full_name)
        assert repo is not None and repo["private"] is True and repo["auto_init"] is True
    branches = gh.repo(mine)["branches"]  # type: ignore[index]
    assert sessions[personal]["branch"] in branches and sessions[again]["branch"] in branches
    assert sessions[personal]["branch"] != sessions[again]["branch"]
    assert sessions[org_session]["branch"] in gh.repo(theirs)["branches"]  # type: ignore[index]
    assert sessions[org_session]["repoName"] == str(org)
    for s in sessions.values():
        assert s["cloneUrl"] == f"{gh.git_url}/{s['repoOwner']}/{s['repoName']}.git"
        git_dir = Path(s["sandboxState"]["workdir"]) / ".git"
        files = [p.read_bytes().decode(errors="replace") for p in git_dir.rglob("*") if p.is_file()]
        _assert_no_token(*files)
    _assert_no_token(*responses, gh_stack.logs_text())


def test_twenty_concurrent_first_sessions_create_the_repo_once(
    gh_stack: Stack, gh: FakeGitHubServer
) -> None:
    caller = make_caller("gh-crowd")
    with gh_stack.client(caller) as client, ThreadPoolExecutor(max_workers=10) as pool:
        ids = list(pool.map(lambda _: create(client)["id"], range(20)))
        finals = [wait_state(client, sid, "active", timeout=180) for sid in ids]
    full_name = f"recoupable/{caller.account_id}"
    assert gh.stats()["repos_created_by_name"] == {full_name: 1}
    branches = gh.repo(full_name)["branches"]  # type: ignore[index]
    assert {s["branch"] for s in finals} <= set(branches)
    assert len({s["branch"] for s in finals}) == 20


def _parse(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def test_secondary_rate_limit_waits_as_told_then_succeeds(
    gh_stack: Stack, gh: FakeGitHubServer
) -> None:
    caller = make_caller("gh-limited")
    gh.inject_secondary_rate_limit(retry_after=2, path_regex=r"/orgs/recoupable/repos$", status=403)
    with gh_stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        provision = next(r for r in history(client, sid) if r["kind"] == "provision")
    assert provision["attempts"] == 2 and provision["state"] == "succeeded"
    assert "rate limit" in (provision["error"] or "").lower() or provision["error"] is None
    waited = (_parse(provision["finishedAt"]) - _parse(provision["startedAt"])).total_seconds()
    assert waited >= 2.0  # the retry came no sooner than Retry-After said
    assert gh.stats()["repos_created_by_name"] == {f"recoupable/{caller.account_id}": 1}


def test_bad_credentials_fail_with_a_clear_message(gh_stack: Stack, gh: FakeGitHubServer) -> None:
    caller: Caller = make_caller("gh-denied")
    gh.inject(
        r"/repos/recoupable/",
        method="GET",
        status=401,
        times=None,
        body={"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest"},
    )
    with gh_stack.client(caller) as client:
        sid = create(client)["id"]
        s = wait_state(client, sid, "failed")
        error = s["lifecycleError"]
        assert "401" in error and "credentials" in error.lower(), error
        _assert_no_token(error, json.dumps(history(client, sid)))
        gh.reset()
        kick(client, sid, "sandbox")
        assert wait_state(client, sid, "active")["lifecycleError"] is None
        _assert_no_token(json.dumps(get(client, sid)), gh_stack.logs_text())


def test_repo_the_token_cannot_read_fails_at_once(gh_stack: Stack, gh: FakeGitHubServer) -> None:
    """GitHub: 404 on the read, 422 "name already exists" on the create. Retrying cannot
    help, so the provision run fails on its first attempt and says what to check."""
    caller = make_caller("gh-hidden")
    full_name = f"recoupable/{caller.account_id}"
    gh.add_repo("recoupable", str(caller.account_id), visible=False)
    with gh_stack.client(caller) as client:
        sid = create(client)["id"]
        error = wait_state(client, sid, "failed")["lifecycleError"]
        runs = history(client, sid)
    assert full_name in error and "check the token's access" in error, error
    provision = [r for r in runs if r["kind"] == "provision"]
    assert [(r["state"], r["attempts"]) for r in provision] == [("failed", 1)]
    assert provision[0]["error"] == error
    assert gh.stats()["repos_created"] == 0
    _assert_no_token(error, json.dumps(runs), gh_stack.logs_text())
