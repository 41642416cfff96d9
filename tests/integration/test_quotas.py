"""Per-account quotas of active sandboxes and sessions: held under concurrent start
kicks and creates (exactly the cap succeeds), 429 with the limit, the count and
Retry-After, counted against the organization for org sessions."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller, add_member, make_account, make_caller
from tests.support.rows import sql, sql_exec
from worker.db.engine import get_sessionmaker
from worker.services import quotas


def _limit(
    account: uuid.UUID, *, sandboxes: int | None = None, sessions: int | None = None
) -> None:
    with get_sessionmaker().begin() as db:
        quotas.set_limits(db, account, active_sandboxes=sandboxes, sessions=sessions)


def _hibernated(ids: list[str]) -> None:
    """As if each session had provisioned, run and hibernated (no sandbox held)."""
    sql_exec(
        "UPDATE lifecycle_runs SET state = 'succeeded', finished_at = now()"
        " WHERE session_id = ANY(CAST(:ids AS uuid[]))",
        ids=ids,
    )
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'hibernated', provisioned_at = now()"
        " WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=ids,
    )


def _holding(account: uuid.UUID) -> int:
    return int(
        sql(
            "SELECT count(*) FROM sessions AS s WHERE s.user_id = :a AND ("
            " s.lifecycle_state IN ('provisioning', 'active', 'restoring', 'hibernating')"
            " OR EXISTS (SELECT 1 FROM lifecycle_runs r WHERE r.session_id = s.id"
            "  AND r.kind IN ('provision', 'start') AND r.state IN ('pending', 'queued', 'running')))",
            a=account,
        )[0][0]
    )


def test_20_concurrent_starts_with_a_cap_of_2(live_api: str) -> None:
    caller = make_caller("Ada")
    with httpx.Client(base_url=live_api, headers=caller.headers, timeout=60) as http:
        ids = [http.post("/api/sessions").json()["session"]["id"] for _ in range(20)]
        _hibernated(ids)
        _limit(caller.account_id, sandboxes=2)

        def start(sid: str) -> httpx.Response:
            with httpx.Client(base_url=live_api, headers=caller.headers, timeout=60) as c:
                return c.post(f"/api/sessions/{sid}/sandbox")

        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(start, ids))
    codes = sorted(r.status_code for r in answers)
    assert codes == [202] * 2 + [429] * 18, codes
    for refused in (r for r in answers if r.status_code == 429):
        body = refused.json()
        assert body["status"] == "error" and body["limit"] == 2 and body["current"] == 2
        assert body["error"] == "Active sandbox limit reached (2 of 2); hibernate one first"
    assert _holding(caller.account_id) == 2
    started = sql("SELECT count(*) FROM lifecycle_runs WHERE kind = 'start'")[0][0]
    assert started == 2


def test_concurrent_creates_stop_at_the_session_cap(live_api: str) -> None:
    caller = make_caller("Ada")
    _limit(caller.account_id, sessions=3)

    def create_one(_: int) -> int:
        with httpx.Client(base_url=live_api, headers=caller.headers, timeout=60) as c:
            return c.post("/api/sessions").status_code

    with ThreadPoolExecutor(max_workers=12) as pool:
        codes = sorted(pool.map(create_one, range(12)))
    assert codes == [200] * 3 + [429] * 9, codes
    assert sql("SELECT count(*) FROM sessions")[0][0] == 3
    # Refused creates wrote nothing: no chat, run, job or event of theirs.
    assert sql("SELECT count(*) FROM chats")[0][0] == 3
    assert sql("SELECT count(*) FROM outbox")[0][0] == 3
    assert sql("SELECT count(*) FROM events WHERE type = 'session.created'")[0][0] == 3


def test_refusals_say_why_and_when_to_retry(client: TestClient, caller: Caller) -> None:
    first = create(client, caller)["session"]["id"]
    _limit(caller.account_id, sandboxes=1)
    # The first session provisions: it holds the one sandbox, so a second create is refused.
    r = client.post("/api/sessions", headers=caller.headers)
    body = assert_error(r, 429, "Active sandbox limit reached (1 of 1); hibernate one first")
    assert body["limit"] == 1 and body["current"] == 1 and "Retry-After" not in r.headers
    # Once it is active and due to hibernate in ~600 s, Retry-After says so.
    sql_exec("UPDATE lifecycle_runs SET state = 'succeeded' WHERE session_id = :id", id=first)
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', provisioned_at = now(),"
        " hibernate_after = now() + interval '600 s',"
        " sandbox_expires_at = now() + interval '1 hour' WHERE id = :id",
        id=first,
    )
    r = client.post("/api/sessions", headers=caller.headers)
    assert r.status_code == 429 and 590 <= int(r.headers["Retry-After"]) <= 600
    assert r.json()["retryAfterSeconds"] == int(r.headers["Retry-After"])
    # A start kick of the session that already holds the sandbox is not refused: it is
    # already running (200, run null), not over the cap.
    r = client.post(f"/api/sessions/{first}/sandbox", headers=caller.headers)
    assert r.status_code == 200, r.text
    assert r.json()["run"] is None and r.json()["reason"] == "the sandbox is already running"
    # Without a limit of its own the operator's default applies (none here).
    _limit(caller.account_id)
    assert client.post("/api/sessions", headers=caller.headers).status_code == 200


def test_org_sessions_count_against_the_org(client: TestClient, caller: Caller) -> None:
    org = make_account("Acme", org=True)
    add_member(org, caller.account_id)
    other = make_caller("Bob")
    add_member(org, other.account_id)
    _limit(org, sessions=1)
    create(client, caller, {"organizationId": str(org)})
    r = client.post("/api/sessions", json={"organizationId": str(org)}, headers=other.headers)
    assert_error(r, 429, "Session limit reached (1 of 1); archive one first")
    # Personal sessions of the members are their own.
    create(client, other)
    # A foreign org is refused (403) before any quota is looked at.
    stranger = make_caller("Eve")
    r = client.post("/api/sessions", json={"organizationId": str(org)}, headers=stranger.headers)
    assert_error(r, 403, "Access denied to specified organization_id")


def test_the_cli_sets_and_clears_an_accounts_limits(caller: Caller) -> None:
    from typer.testing import CliRunner

    from worker.ops.cli import app

    runner = CliRunner()
    account = str(caller.account_id)
    result = runner.invoke(
        app, ["accounts", "limits", "--account", account, "--max-active-sandboxes", "2"]
    )
    assert result.exit_code == 0, result.output
    assert sql("SELECT max_active_sandboxes, max_sessions FROM accounts WHERE id = :a", a=account)[
        0
    ] == (2, None)
    assert runner.invoke(app, ["accounts", "limits", "--account", account]).exit_code == 0
    assert sql("SELECT max_active_sandboxes FROM accounts WHERE id = :a", a=account)[0][0] is None
    missing = runner.invoke(app, ["accounts", "limits", "--account", str(uuid.uuid4())])
    assert missing.exit_code != 0
