"""GET / PATCH /api/sessions/{id}: ETag, If-None-Match, If-Match, validation, archiving
(SPEC §3 "Other session endpoints")."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller
from tests.support.rows import row_counts, sql, sql_exec


@pytest.fixture
def session(client: TestClient, caller: Caller) -> dict[str, Any]:
    return create(client, caller, {"title": "Original"})["session"]  # type: ignore[no-any-return]


def _get(client: TestClient, caller: Caller, sid: str, **headers: str) -> Any:
    return client.get(f"/api/sessions/{sid}", headers={**caller.headers, **headers})


def _patch(client: TestClient, caller: Caller, sid: str, body: Any = None, **headers: str) -> Any:
    h = {**caller.headers, **headers}
    if body is None:
        return client.patch(f"/api/sessions/{sid}", headers=h)
    return client.patch(f"/api/sessions/{sid}", headers=h, json=body)


def _runs(client: TestClient, caller: Caller, sid: str) -> list[dict[str, Any]]:
    r = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers)
    assert r.status_code == 200, r.text
    return r.json()["runs"]  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- GET


def test_get_returns_the_created_session_with_an_etag(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    r = _get(client, caller, session["id"])
    assert r.status_code == 200, r.text
    assert r.json() == {"session": session}
    etag = r.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and len(etag) > 2
    assert _get(client, caller, session["id"]).headers["etag"] == etag  # stable


def test_if_none_match_with_the_current_etag_is_304(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    etag = _get(client, caller, session["id"]).headers["etag"]
    r = _get(client, caller, session["id"], **{"If-None-Match": etag})
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == etag
    r = _get(client, caller, session["id"], **{"If-None-Match": f'"other", {etag}'})
    assert r.status_code == 304


def test_if_none_match_with_a_stale_etag_returns_the_session(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    stale = _get(client, caller, session["id"]).headers["etag"]
    assert _patch(client, caller, session["id"], {"title": "Changed"}).status_code == 200
    r = _get(client, caller, session["id"], **{"If-None-Match": stale})
    assert r.status_code == 200
    assert r.json()["session"]["title"] == "Changed"
    assert r.headers["etag"] != stale


# --------------------------------------------------------------------------- PATCH


def test_patch_title_status_and_line_counts(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    r = _patch(
        client,
        caller,
        session["id"],
        {"title": "  Renamed  ", "status": "completed", "linesAdded": 12, "linesRemoved": 3},
    )
    assert r.status_code == 200, r.text
    s = r.json()["session"]
    assert (s["title"], s["status"], s["linesAdded"], s["linesRemoved"]) == (
        "Renamed",
        "completed",
        12,
        3,
    )
    assert s["id"] == session["id"] and s["createdAt"] == session["createdAt"]
    assert s["updatedAt"] >= session["updatedAt"]
    assert r.headers["etag"] == _get(client, caller, session["id"]).headers["etag"]
    row = sql(
        "SELECT title, status, lines_added, lines_removed FROM sessions WHERE id = :id",
        id=session["id"],
    )[0]
    assert tuple(row) == ("Renamed", "completed", 12, 3)
    assert _get(client, caller, session["id"]).json()["session"] == s


def test_patch_each_status(client: TestClient, caller: Caller, session: dict[str, Any]) -> None:
    for status in ["completed", "failed", "archived", "running"]:
        r = _patch(client, caller, session["id"], {"status": status})
        assert r.status_code == 200, (status, r.text)
        assert r.json()["session"]["status"] == status
        assert sql("SELECT status FROM sessions")[0].status == status


def test_patch_zero_line_counts(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _patch(client, caller, session["id"], {"linesAdded": 5, "linesRemoved": 5})
    s = _patch(client, caller, session["id"], {"linesAdded": 0, "linesRemoved": 0}).json()[
        "session"
    ]
    assert (s["linesAdded"], s["linesRemoved"]) == (0, 0)


def _assert_refused(
    client: TestClient, caller: Caller, session: dict[str, Any], bodies: list[Any]
) -> None:
    """Each PATCH body is refused with 400 and leaves the session and every table as they were."""
    before_counts = row_counts()
    for body in bodies:
        if isinstance(body, bytes):
            headers = {**caller.headers, "content-type": "application/json"}
            r = client.patch(f"/api/sessions/{session['id']}", headers=headers, content=body)
        else:
            r = _patch(client, caller, session["id"], body)
        assert_error(r, 400, case=body)
        assert _get(client, caller, session["id"]).json()["session"] == session, body
    assert row_counts() == before_counts


def test_invalid_line_counts_are_400_and_change_nothing(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _assert_refused(
        client,
        caller,
        session,
        [
            {"linesAdded": -1},
            {"linesRemoved": -5},
            {"linesAdded": True},
            {"linesRemoved": False},
            {"linesAdded": "10"},
            {"linesAdded": 1.5},
            {"linesAdded": 2**31},
            {"linesRemoved": [1]},
            b'{"linesAdded": 1e400}',
            b'{"linesAdded": ' + b"9" * 5000 + b"}",
        ],
    )


def test_invalid_status_is_400_and_changes_nothing(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _assert_refused(
        client,
        caller,
        session,
        [{"status": "deleted"}, {"status": "ARCHIVED"}, {"status": 1}, {"status": ""}],
    )


def test_invalid_title_is_400_and_changes_nothing(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _assert_refused(
        client,
        caller,
        session,
        [
            {"title": ""},
            {"title": "   "},
            {"title": 7},
            {"title": "x" * 10_000},
            # text PostgreSQL cannot store: a 400, never a 500
            b'{"title": "a\\u0000b"}',
            b'{"title": "a\\ud800b"}',
        ],
    )


def test_one_bad_field_spoils_the_whole_patch(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _assert_refused(
        client,
        caller,
        session,
        [
            {"title": "Fine", "linesAdded": -1},
            {"title": "Fine", "status": "nope"},
            {"status": "archived", "linesRemoved": "x"},
        ],
    )


def test_malformed_patch_body_is_400(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _assert_refused(
        client, caller, session, [b"{", b"[]", b'"x"', b"42", b"[" * 30_000 + b"]" * 30_000]
    )


def test_empty_patch_changes_nothing(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    etag = _get(client, caller, session["id"]).headers["etag"]
    for body in [None, {}, {"unknown": 1}, {"title": None, "status": None}]:
        r = _patch(client, caller, session["id"], body)
        assert r.status_code == 200, (body, r.text)
        assert r.json()["session"] == session, body  # updatedAt included
        assert r.headers["etag"] == etag
    assert _get(client, caller, session["id"]).json()["session"] == session


def test_if_match_with_a_stale_etag_is_412_and_changes_nothing(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    stale = _get(client, caller, session["id"]).headers["etag"]
    assert _patch(client, caller, session["id"], {"title": "Someone else"}).status_code == 200
    current = _get(client, caller, session["id"]).json()["session"]
    r = _patch(client, caller, session["id"], {"title": "Mine"}, **{"If-Match": stale})
    assert_error(r, 412)
    assert _get(client, caller, session["id"]).json()["session"] == current
    assert current["title"] == "Someone else"


def test_if_match_with_a_made_up_etag_is_412(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    r = _patch(client, caller, session["id"], {"status": "archived"}, **{"If-Match": '"nope"'})
    assert_error(r, 412)
    assert _get(client, caller, session["id"]).json()["session"] == session
    assert [run["kind"] for run in _runs(client, caller, session["id"])] == ["provision"]


def test_if_match_with_the_current_etag_applies(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    etag = _get(client, caller, session["id"]).headers["etag"]
    r = _patch(client, caller, session["id"], {"title": "Guarded"}, **{"If-Match": etag})
    assert r.status_code == 200, r.text
    assert r.json()["session"]["title"] == "Guarded"
    new_etag = r.headers["etag"]
    assert new_etag != etag
    # the old tag no longer matches; the new one does
    assert_error(_patch(client, caller, session["id"], {"title": "x"}, **{"If-Match": etag}), 412)
    r = _patch(client, caller, session["id"], {"title": "Again"}, **{"If-Match": new_etag})
    assert r.status_code == 200


def test_if_match_star_applies(client: TestClient, caller: Caller, session: dict[str, Any]) -> None:
    r = _patch(client, caller, session["id"], {"title": "Any"}, **{"If-Match": "*"})
    assert r.status_code == 200
    assert r.json()["session"]["title"] == "Any"


# --------------------------------------------------------------------------- archiving


def test_archiving_records_an_archive_run(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    runs = _runs(client, caller, session["id"])
    assert [(r["kind"], r["trigger"], r["state"]) for r in runs] == [
        ("provision", "create", "queued")
    ]
    assert runs[0]["issuedVersion"] == 0

    r = _patch(client, caller, session["id"], {"status": "archived"})
    assert r.status_code == 200, r.text
    assert r.json()["session"]["status"] == "archived"
    runs = _runs(client, caller, session["id"])
    assert [r["kind"] for r in runs] == ["provision", "archive"]
    archive = runs[1]
    assert archive["trigger"] == "api"
    # the provision run still holds the session, so the archive waits its turn
    assert archive["state"] in ("pending", "queued")
    for field in ("id", "sessionId", "attempts", "createdAt", "startedAt", "finishedAt", "error"):
        assert field in archive
    assert archive["sessionId"] == session["id"]

    # archiving twice does not record a second archive run
    assert _patch(client, caller, session["id"], {"status": "archived"}).status_code == 200
    assert [r["kind"] for r in _runs(client, caller, session["id"])] == ["provision", "archive"]


def test_archived_session_refuses_kicks_until_unarchived(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    _patch(client, caller, session["id"], {"status": "archived"})
    before = row_counts()
    r = client.post(f"/api/sessions/{session['id']}/sandbox", headers=caller.headers)
    assert_error(r, 409)
    assert row_counts() == before
    r = _patch(client, caller, session["id"], {"status": "running"})
    assert r.status_code == 200
    assert r.json()["session"]["status"] == "running"
    r = client.post(f"/api/sessions/{session['id']}/sandbox", headers=caller.headers)
    assert r.status_code == 202, r.text


def test_unarchiving_an_archived_session_makes_it_hibernated(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    """archived -> running: the lifecycle moves archived -> hibernated (one transition)."""
    # The worker would have archived it; put the row where the archive run leaves it.
    sql_exec(
        "UPDATE sessions SET status = 'archived', lifecycle_state = 'archived',"
        " lifecycle_version = 4, archived_at = now() WHERE id = :id",
        id=session["id"],
    )
    sql_exec(
        "UPDATE lifecycle_runs SET state = 'succeeded' WHERE session_id = :id", id=session["id"]
    )
    r = _patch(client, caller, session["id"], {"status": "running"})
    assert r.status_code == 200, r.text
    s = r.json()["session"]
    assert (s["status"], s["lifecycleState"], s["lifecycleVersion"]) == ("running", "hibernated", 5)
    row = sql("SELECT archived_at FROM sessions WHERE id = :id", id=session["id"])[0]
    assert row.archived_at is None


def test_unarchiving_before_the_archive_ran_withdraws_it(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    """archived -> running while the archive run is still waiting: the archive must not
    happen later (it would leave a running session archived, refusing every kick)."""
    _patch(client, caller, session["id"], {"status": "archived"})
    r = _patch(client, caller, session["id"], {"status": "running"})
    assert r.status_code == 200, r.text
    runs = {run["kind"]: run for run in _runs(client, caller, session["id"])}
    assert runs["archive"]["state"] not in ("pending", "queued", "running")
    assert runs["provision"]["state"] == "queued"  # the provision itself is untouched
    assert not sql("SELECT id FROM outbox WHERE task_name = 'lifecycle.archive'")


def test_unarchiving_withdraws_an_archive_run_already_queued(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    """The archive run is next in line (queued, its job published): un-archiving still
    withdraws it (the worker skips a run that is no longer queued), and nothing is left
    holding the session's line."""
    # The provision run finished (the worker would have recorded this).
    sql_exec(
        "UPDATE lifecycle_runs SET state = 'succeeded', finished_at = now() WHERE session_id = :id",
        id=session["id"],
    )
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', lifecycle_version = 2,"
        " provisioned_at = now() WHERE id = :id",
        id=session["id"],
    )
    _patch(client, caller, session["id"], {"status": "archived"})
    archive = next(r for r in _runs(client, caller, session["id"]) if r["kind"] == "archive")
    assert archive["state"] == "queued"
    r = _patch(client, caller, session["id"], {"status": "running"})
    assert r.status_code == 200, r.text
    archive = next(r for r in _runs(client, caller, session["id"]) if r["kind"] == "archive")
    assert archive["state"] == "skipped"
    # kicks work again and queue at once (nothing is left holding the line)
    r = client.post(f"/api/sessions/{session['id']}/snapshots", headers=caller.headers)
    assert r.status_code == 202, r.text
    assert r.json()["run"]["state"] == "queued"
