"""``Idempotency-Key`` on POST /api/sessions (SPEC §3, issue 2 "Must show" 6)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller, make_caller
from tests.support.rows import row_counts, sql


def _key(caller: Caller, key: str) -> dict[str, str]:
    return {**caller.headers, "Idempotency-Key": key}


def test_same_key_same_body_replays_the_first_response(client: TestClient, caller: Caller) -> None:
    first = client.post("/api/sessions", headers=_key(caller, "k-1"), json={"title": "Once"})
    assert first.status_code == 200, first.text
    after_first = row_counts()
    second = client.post("/api/sessions", headers=_key(caller, "k-1"), json={"title": "Once"})
    assert second.status_code == 200, second.text
    assert second.json() == first.json()
    assert row_counts() == after_first
    assert (after_first["sessions"], after_first["chats"], after_first["outbox"]) == (1, 1, 1)


def test_same_key_without_body_replays(client: TestClient, caller: Caller) -> None:
    first = create(client, caller, headers={"Idempotency-Key": "empty"})
    second = create(client, caller, headers={"Idempotency-Key": "empty"})
    assert second == first  # even the generated title is the same
    assert row_counts()["sessions"] == 1


def test_same_key_different_body_is_409(client: TestClient, caller: Caller) -> None:
    create(client, caller, {"title": "A"}, headers={"Idempotency-Key": "k-2"})
    before = row_counts()
    r = client.post("/api/sessions", headers=_key(caller, "k-2"), json={"title": "B"})
    assert_error(r, 409)
    r = client.post("/api/sessions", headers=_key(caller, "k-2"))
    assert_error(r, 409)
    assert row_counts() == before
    assert [row.title for row in sql("SELECT title FROM sessions")] == ["A"]


def test_different_keys_create_different_sessions(client: TestClient, caller: Caller) -> None:
    a = create(client, caller, {"title": "T"}, headers={"Idempotency-Key": "one"})
    b = create(client, caller, {"title": "T"}, headers={"Idempotency-Key": "two"})
    assert a["session"]["id"] != b["session"]["id"]
    assert row_counts()["sessions"] == 2


def test_keys_are_per_account(client: TestClient, caller: Caller) -> None:
    other = make_caller("Grace")
    mine = create(client, caller, {"title": "Shared key"}, headers={"Idempotency-Key": "shared"})
    theirs = create(client, other, {"title": "Shared key"}, headers={"Idempotency-Key": "shared"})
    assert mine["session"]["id"] != theirs["session"]["id"]
    assert mine["session"]["userId"] == str(caller.account_id)
    assert theirs["session"]["userId"] == str(other.account_id)
    # each account's replay returns its own first response
    again = create(client, other, {"title": "Shared key"}, headers={"Idempotency-Key": "shared"})
    assert again == theirs
    assert row_counts()["sessions"] == 2


def test_without_a_key_every_request_creates(client: TestClient, caller: Caller) -> None:
    create(client, caller, {"title": "x"})
    create(client, caller, {"title": "x"})
    assert row_counts()["sessions"] == 2


def test_a_refused_request_does_not_burn_the_key(client: TestClient, caller: Caller) -> None:
    from tests.support.factories import make_account

    org = make_account("Closed", org=True)
    body = {"organizationId": str(org)}
    r = client.post("/api/sessions", headers=_key(caller, "k-3"), json=body)
    assert_error(r, 403, "Access denied to specified organization_id")
    assert row_counts()["idempotency_keys"] == 0
    # after being granted access, the same request with the same key goes through
    from tests.support.factories import add_member

    add_member(org, caller.account_id)
    created = create(client, caller, body, headers={"Idempotency-Key": "k-3"})
    assert created["session"]["repoName"] == str(org)


def test_concurrent_duplicates_create_one_session(client: TestClient, caller: Caller) -> None:
    headers = _key(caller, "race")

    def post(_: int) -> tuple[int, dict[str, object]]:
        r = client.post("/api/sessions", headers=headers, json={"title": "Race"})
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(post, range(24)))
    assert [status for status, _ in results] == [200] * 24
    bodies = [body for _, body in results]
    assert all(body == bodies[0] for body in bodies)
    counts = row_counts()
    assert (counts["sessions"], counts["chats"], counts["outbox"], counts["lifecycle_runs"]) == (
        1,
        1,
        1,
        1,
    )
