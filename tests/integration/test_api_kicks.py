"""The kick endpoints answer with what is true (docs/architecture.md, "Kicks"): a new
or joined run (202, ``reason`` says which was joined), nothing to do (200, ``run``
null, ``reason``), or a refusal that says where the session is and how to get there
(409 with ``lifecycleState`` and ``resume``). Nothing is recorded unless a run will act.

Each test puts the session where the worker would have left it (these tests run no
worker), then kicks it through the API."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller
from tests.support.rows import row_counts, sql, sql_exec

KICKS = {"start": "sandbox", "hibernate": "hibernate", "snapshot": "snapshots", "diff": "diff"}


@pytest.fixture
def sid(client: TestClient, caller: Caller) -> str:
    return str(create(client, caller)["session"]["id"])


def _at_rest(sid: str, state: str, *, snapshot: bool = True) -> None:
    """The session's runs finished and it rests in ``state`` (as the worker leaves it)."""
    sql_exec(
        "UPDATE lifecycle_runs SET state = 'succeeded', finished_at = now() WHERE session_id = :id",
        id=sid,
    )
    sql_exec(
        "UPDATE sessions SET lifecycle_state = :state, lifecycle_version = 3,"
        " provisioned_at = now(), lifecycle_run_id = NULL, lease_expires_at = NULL,"
        " snapshot_url = :url WHERE id = :id",
        id=sid,
        state=state,
        url=f"file:///snapshots/{sid}.tar.zst" if snapshot else None,
    )
    sql_exec("UPDATE outbox SET published_at = now()")


def _kick(client: TestClient, caller: Caller, sid: str, kind: str, **params: str) -> Any:
    return client.post(f"/api/sessions/{sid}/{KICKS[kind]}", headers=caller.headers, params=params)


def _runs(client: TestClient, caller: Caller, sid: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers)
    assert r.status_code == 200, r.text
    return r.json()["runs"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- already there


@pytest.mark.parametrize(
    ("kind", "state", "reason"),
    [
        ("start", "active", "the sandbox is already running"),
        ("hibernate", "hibernated", "the session is already hibernated"),
    ],
)
def test_a_kick_the_session_already_satisfies_answers_200_and_records_nothing(
    client: TestClient, caller: Caller, sid: str, kind: str, state: str, reason: str
) -> None:
    _at_rest(sid, state)
    before = row_counts()
    r = _kick(client, caller, sid, kind)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["run"] is None  # not an old, unrelated run
    assert body["reason"] == reason
    assert body["session"]["id"] == sid and body["session"]["lifecycleState"] == state
    assert row_counts() == before
    # The kick is still an event, saying there was nothing to do.
    (event,) = sql(
        "SELECT run_id, reason, data FROM events WHERE type = 'session.kicked'"
        " AND session_id = :id",
        id=sid,
    )
    assert event.run_id is None and event.reason.endswith(f"(nothing to do: {reason})")
    assert event.data == {"kind": kind, "coalesced": False, "satisfied": True, "force": False}


# --------------------------------------------------------------------------- cannot act


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "snapshot",
            "Session is hibernated: its sandbox is stopped and its work is in the snapshot "
            "taken when it hibernated (snapshotUrl); to take a new one: start the sandbox "
            "first: POST /api/sessions/{sid}/sandbox",
        ),
        (
            "diff",
            "Session is hibernated: its cached diff (GET /api/sessions/{sid}/diff) was "
            "computed when it hibernated; to recompute it: start the sandbox first: "
            "POST /api/sessions/{sid}/sandbox",
        ),
    ],
)
def test_snapshot_and_diff_on_a_hibernated_session_are_refused_with_how_to_get_there(
    client: TestClient, caller: Caller, sid: str, kind: str, message: str
) -> None:
    """Before: 202 with a run the worker then skipped ("no live sandbox")."""
    _at_rest(sid, "hibernated")
    before = row_counts()
    body = assert_error(_kick(client, caller, sid, kind), 409, message.format(sid=sid))
    assert body["lifecycleState"] == "hibernated"
    assert body["resume"] == f"/api/sessions/{sid}/sandbox"
    assert row_counts() == before


@pytest.mark.parametrize("kind", ["hibernate", "snapshot", "diff"])
def test_kicks_that_need_the_sandbox_are_refused_on_a_failed_session(
    client: TestClient, caller: Caller, sid: str, kind: str
) -> None:
    _at_rest(sid, "failed", snapshot=False)
    before = row_counts()
    body = assert_error(
        _kick(client, caller, sid, kind),
        409,
        f"Session has no live sandbox to {kind} (lifecycleState failed): start the sandbox "
        f"first: POST /api/sessions/{sid}/sandbox",
    )
    assert body["lifecycleState"] == "failed"
    assert row_counts() == before
    # ... and the way out it names works: a start retries from failed.
    r = _kick(client, caller, sid, "start")
    assert r.status_code == 202, r.text
    assert r.json()["run"]["kind"] == "start" and r.json()["run"]["state"] == "queued"


def test_a_hibernate_on_a_hibernated_session_is_satisfied_even_with_old_skipped_runs(
    client: TestClient, caller: Caller, sid: str
) -> None:
    """The issue's case: the answer used to be the session's last run, a skipped snapshot."""
    _at_rest(sid, "hibernated")
    sql_exec(
        "INSERT INTO lifecycle_runs (id, session_id, kind, trigger, state, attempts,"
        " created_at, updated_at, finished_at) VALUES (gen_random_uuid(), :id, 'snapshot',"
        " 'api', 'skipped', 1, now(), now(), now())",
        id=sid,
    )
    r = _kick(client, caller, sid, "hibernate")
    assert r.status_code == 200, r.text
    assert r.json()["run"] is None


# --------------------------------------------------------------------------- runs that act


@pytest.mark.parametrize("kind", ["hibernate", "snapshot", "diff"])
def test_a_kick_on_an_active_session_queues_a_new_run(
    client: TestClient, caller: Caller, sid: str, kind: str
) -> None:
    _at_rest(sid, "active")
    r = _kick(client, caller, sid, kind)
    assert r.status_code == 202, r.text
    body = r.json()
    assert (body["run"]["kind"], body["run"]["state"], body["reason"]) == (kind, "queued", None)
    job = sql(
        "SELECT task_name FROM outbox WHERE strpos(payload::text, :run) > 0",
        run=body["run"]["id"],
    )
    assert [j.task_name for j in job] == [f"lifecycle.{kind}"]


def test_the_same_kick_again_joins_the_run_in_flight(
    client: TestClient, caller: Caller, sid: str
) -> None:
    _at_rest(sid, "active")
    first = _kick(client, caller, sid, "diff").json()["run"]
    before = row_counts()
    r = _kick(client, caller, sid, "diff")
    assert r.status_code == 202, r.text
    assert r.json()["run"]["id"] == first["id"]
    assert r.json()["reason"] == "a diff run is already queued; the kick joins it"
    assert row_counts() == before


def test_a_start_while_provisioning_joins_the_provision(
    client: TestClient, caller: Caller, sid: str
) -> None:
    before = row_counts()
    r = _kick(client, caller, sid, "start")
    assert r.status_code == 202, r.text
    assert r.json()["run"]["kind"] == "provision"
    assert r.json()["reason"] == "a provision run is already queued; the kick joins it"
    assert row_counts() == before


@pytest.mark.parametrize("kind", ["snapshot", "diff"])
def test_a_snapshot_or_diff_while_hibernating_joins_the_hibernate(
    client: TestClient, caller: Caller, sid: str, kind: str
) -> None:
    """The hibernate takes a snapshot and recomputes the diff; a run queued after it would
    find no sandbox and be skipped."""
    _at_rest(sid, "active")
    hibernate = _kick(client, caller, sid, "hibernate").json()["run"]
    before = row_counts()
    r = _kick(client, caller, sid, kind)
    assert r.status_code == 202, r.text
    assert r.json()["run"]["id"] == hibernate["id"]
    assert r.json()["reason"] == (
        "the hibernate run already queued takes a snapshot and recomputes the diff"
    )
    assert row_counts() == before
    assert [run["kind"] for run in _runs(client, caller, sid)][-1] == "hibernate"


def test_a_hibernate_while_a_start_runs_waits_for_it(
    client: TestClient, caller: Caller, sid: str
) -> None:
    """Not refused: the start in flight gives the hibernate a sandbox to act on."""
    _at_rest(sid, "hibernated")
    start = _kick(client, caller, sid, "start").json()["run"]
    r = _kick(client, caller, sid, "hibernate")
    assert r.status_code == 202, r.text
    assert r.json()["run"]["kind"] == "hibernate" and r.json()["run"]["state"] == "pending"
    assert r.json()["run"]["id"] != start["id"] and r.json()["reason"] is None
