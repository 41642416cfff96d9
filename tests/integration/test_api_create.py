"""POST /api/sessions: the seed's contract on the happy paths (SPEC §3, issue 2 "Must show" 2)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Any

from fastapi.testclient import TestClient

from tests.support.api import SEED_CHAT_FIELDS, SEED_SESSION_FIELDS, create, new_uuid
from tests.support.factories import Caller, add_member, make_account, make_caller
from tests.support.rows import row_counts, sql
from worker.config import get_settings

GENERATED_TITLE = re.compile(r"^[A-Z][a-z]+ [A-Z][a-z]+ \d{4}$")


def _is_tz_timestamp(value: Any) -> bool:
    return isinstance(value, str) and datetime.fromisoformat(value).tzinfo is not None


def assert_new_session(
    body: dict[str, Any],
    *,
    caller: Caller,
    repo_name: str,
    organization_id: str | None = None,
    artist_id: str | None = None,
) -> None:
    """Every seed field of Session and Chat is present, with a brand-new session's values."""
    assert set(body) == {"session", "chat"}
    s, c = body["session"], body["chat"]
    missing = [f for f in (*SEED_SESSION_FIELDS, "status", "lifecycleState") if f not in s]
    assert missing == [], f"session lacks {missing}"
    missing = [f for f in SEED_CHAT_FIELDS if f not in c]
    assert missing == [], f"chat lacks {missing}"

    uuid.UUID(s["id"])
    assert s["userId"] == str(caller.account_id)
    assert isinstance(s["title"], str) and s["title"]
    assert s["isNewBranch"] is True
    assert s["globalSkillRefs"] == []
    assert s["lifecycleVersion"] == 0
    assert _is_tz_timestamp(s["createdAt"]) and _is_tz_timestamp(s["updatedAt"])
    assert s["artistId"] == artist_id
    assert s.get("organizationId") == organization_id
    assert s["repoOwner"] == "recoupable"
    assert s["repoName"] == repo_name
    assert isinstance(s["branch"], str) and s["branch"]
    assert isinstance(s["cloneUrl"], str) and repo_name in s["cloneUrl"]
    assert s["sandboxState"] == {"type": "local"}
    for unknown in (
        "lastActivityAt",
        "sandboxExpiresAt",
        "hibernateAfter",
        "lifecycleRunId",
        "lifecycleError",
        "snapshotUrl",
        "snapshotCreatedAt",
        "snapshotSizeBytes",
        "cachedDiff",
        "cachedDiffUpdatedAt",
    ):
        assert s[unknown] is None, unknown
    assert s["linesAdded"] == 0 and s["linesRemoved"] == 0
    assert s["status"] == "running"
    assert s["lifecycleState"] == "provisioning"

    uuid.UUID(c["id"])
    assert c["sessionId"] == s["id"]
    assert c["title"] == "New chat"
    assert c["modelId"] == get_settings().default_model_id
    assert _is_tz_timestamp(c["createdAt"]) and _is_tz_timestamp(c["updatedAt"])
    assert c["activeStreamId"] is None
    assert c["lastAssistantMessageAt"] is None


def assert_recorded(body: dict[str, Any]) -> None:
    """The session, its chat, a queued provision run and its outbox job are in the database."""
    sid = body["session"]["id"]
    row = sql(
        "SELECT user_id, title, status, lifecycle_state, lifecycle_version, repo_owner, repo_name"
        " FROM sessions WHERE id = :id",
        id=sid,
    )
    assert len(row) == 1
    assert str(row[0].user_id) == body["session"]["userId"]
    assert row[0].title == body["session"]["title"]
    assert (row[0].status, row[0].lifecycle_state, row[0].lifecycle_version) == (
        "running",
        "provisioning",
        0,
    )
    assert (row[0].repo_owner, row[0].repo_name) == (
        body["session"]["repoOwner"],
        body["session"]["repoName"],
    )
    chats = sql("SELECT id, title FROM chats WHERE session_id = :id", id=sid)
    assert [(str(c.id), c.title) for c in chats] == [(body["chat"]["id"], "New chat")]
    run_rows = sql(
        "SELECT id, kind, trigger, state, issued_version FROM lifecycle_runs WHERE session_id = :id",
        id=sid,
    )
    assert [(r.kind, r.trigger, r.state, r.issued_version) for r in run_rows] == [
        ("provision", "create", "queued", 0)
    ]
    jobs = sql(
        "SELECT task_name, payload FROM outbox WHERE payload->'kwargs'->>'session_id' = :id",
        id=sid,
    )
    assert len(jobs) == 1
    assert jobs[0].task_name == "lifecycle.provision"
    assert jobs[0].payload["kwargs"] == {
        "session_id": sid,
        "run_id": str(run_rows[0].id),
        "version": 0,
    }


def test_no_body_creates_a_personal_session(client: TestClient, caller: Caller) -> None:
    body = create(client, caller)
    assert_new_session(body, caller=caller, repo_name=str(caller.account_id))
    assert GENERATED_TITLE.match(body["session"]["title"]), body["session"]["title"]
    assert_recorded(body)


def test_empty_object_creates_a_personal_session(client: TestClient, caller: Caller) -> None:
    body = create(client, caller, {})
    assert_new_session(body, caller=caller, repo_name=str(caller.account_id))
    assert GENERATED_TITLE.match(body["session"]["title"])
    assert_recorded(body)


def test_title_is_kept_and_trimmed(client: TestClient, caller: Caller) -> None:
    body = create(client, caller, {"title": "  Fix the login flow \n"})
    assert_new_session(body, caller=caller, repo_name=str(caller.account_id))
    assert body["session"]["title"] == "Fix the login flow"
    assert_recorded(body)


def test_title_padded_past_the_limit_is_measured_after_trimming(
    client: TestClient, caller: Caller
) -> None:
    limit = get_settings().max_title_length
    title = "x" * limit
    body = create(client, caller, {"title": "   " + title + "   "})
    assert body["session"]["title"] == title


def test_blank_or_null_title_gets_a_generated_one(client: TestClient, caller: Caller) -> None:
    titles = []
    for blank in ["", "   ", "\t\n", None]:
        title = create(client, caller, {"title": blank})["session"]["title"]
        assert GENERATED_TITLE.match(title), (blank, title)
        titles.append(title)
    assert len(set(titles)) == len(titles)


def test_unknown_keys_are_ignored(client: TestClient, caller: Caller) -> None:
    body = create(client, caller, {"title": "t", "userId": new_uuid(), "status": "archived"})
    assert body["session"]["userId"] == str(caller.account_id)
    assert body["session"]["status"] == "running"


def test_org_session_for_a_member(client: TestClient, caller: Caller) -> None:
    org = make_account("Acme", org=True)
    add_member(org, caller.account_id)
    body = create(client, caller, {"organizationId": str(org)})
    assert_new_session(body, caller=caller, repo_name=str(org), organization_id=str(org))
    assert_recorded(body)


def test_org_session_when_the_caller_is_the_org(client: TestClient, db_clean: object) -> None:
    from worker.db.engine import get_sessionmaker
    from worker.services import accounts

    org = make_account("Acme", org=True)
    with get_sessionmaker().begin() as db:
        key = accounts.create_key(db, org)
    org_caller = Caller(org, key.key, key.id)
    body = create(client, org_caller, {"organizationId": str(org)})
    assert_new_session(body, caller=org_caller, repo_name=str(org), organization_id=str(org))
    assert_recorded(body)


def test_artist_id_is_recorded(client: TestClient, caller: Caller) -> None:
    artist = new_uuid()
    body = create(client, caller, {"artistId": artist, "title": "With artist"})
    assert_new_session(body, caller=caller, repo_name=str(caller.account_id), artist_id=artist)
    assert [str(r.artist_id) for r in sql("SELECT artist_id FROM sessions")] == [artist]


def test_bearer_authorization_works(client: TestClient, caller: Caller) -> None:
    r = client.post("/api/sessions", headers={"Authorization": f"Bearer {caller.key}"}, json={})
    assert r.status_code == 200, r.text
    assert_new_session(r.json(), caller=caller, repo_name=str(caller.account_id))


def test_bearer_scheme_is_case_insensitive(client: TestClient, caller: Caller) -> None:
    r = client.post("/api/sessions", headers={"Authorization": f"bearer {caller.key}"})
    assert r.status_code == 200, r.text


def test_key_with_future_expiry_works(client: TestClient, db_clean: object) -> None:
    caller = make_caller("Later", expires_in=3600)
    assert create(client, caller)["session"]["userId"] == str(caller.account_id)


def test_each_create_is_a_new_session_with_one_chat(client: TestClient, caller: Caller) -> None:
    first = create(client, caller, {"title": "Same"})
    second = create(client, caller, {"title": "Same"})
    assert first["session"]["id"] != second["session"]["id"]
    assert first["chat"]["id"] != second["chat"]["id"]
    counts = row_counts()
    assert (counts["sessions"], counts["chats"], counts["outbox"], counts["lifecycle_runs"]) == (
        2,
        2,
        2,
        2,
    )


def test_the_provision_job_is_published_after_commit(client: TestClient, caller: Caller) -> None:
    body = create(client, caller)
    # The request returns after its commit; the process's publisher thread publishes.
    assert client.app.state.background_publisher.flush(timeout=30)  # type: ignore[attr-defined]
    rows = sql(
        "SELECT published_at FROM outbox WHERE payload->'kwargs'->>'session_id' = :id",
        id=body["session"]["id"],
    )
    assert len(rows) == 1 and rows[0].published_at is not None


def test_create_app_settings_apply_to_requests(db_clean: object, redis_client: object) -> None:
    """Settings passed to ``create_app`` (not only the environment's) shape the response."""
    from api_stub.main import create_app
    from worker.config import Settings

    settings = Settings(workspace_owner="acme-labs", default_model_id="test/model-1")
    caller = make_caller()
    with TestClient(create_app(settings)) as c:
        body = create(c, caller)
    assert body["session"]["repoOwner"] == "acme-labs"
    assert body["chat"]["modelId"] == "test/model-1"
