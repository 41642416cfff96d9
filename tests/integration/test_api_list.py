"""GET /api/sessions: the caller's sessions, newest first, keyset pagination (SPEC §3)."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller, make_caller
from tests.support.rows import row_counts


def _list(client: TestClient, caller: Caller, **params: str) -> Any:
    return client.get("/api/sessions", headers=caller.headers, params=params)


def _page(client: TestClient, caller: Caller, **params: str) -> dict[str, Any]:
    r = _list(client, caller, **params)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _all_pages(client: TestClient, caller: Caller, **params: str) -> list[list[dict[str, Any]]]:
    pages, cursor = [], None
    while True:
        page = _page(client, caller, **params, **({"cursor": cursor} if cursor else {}))
        pages.append(page["sessions"])
        cursor = page["nextCursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not end"


def _bulk_create(caller: Caller, n: int) -> list[dict[str, Any]]:
    """``n`` sessions created one after another through the service the endpoint uses
    (one transaction: the listing, not the create path, is under test here)."""
    from worker.config import get_settings
    from worker.db.engine import get_sessionmaker
    from worker.services import sessions
    from worker.services.views import session_dict

    with get_sessionmaker().begin() as db:
        made = [
            sessions.create_session(
                db,
                get_settings(),
                caller.account_id,
                sessions.CreateSession(title=f"S{i:02d}"),
                clone_url="file:///repos/x.git",
                sandbox_type="local",
            ).session
            for i in range(n)
        ]
        return [session_dict(s) for s in made]


@pytest.fixture
def made(client: TestClient, caller: Caller) -> list[dict[str, Any]]:
    """25 sessions, oldest first."""
    return _bulk_create(caller, 25)


def test_sessions_created_through_the_api_are_listed_newest_first(
    client: TestClient, caller: Caller
) -> None:
    created = [create(client, caller, {"title": f"A{i}"})["session"] for i in range(12)]
    pages = _all_pages(client, caller, limit="5")
    assert [len(p) for p in pages] == [5, 5, 2]
    assert [s for p in pages for s in p] == list(reversed(created))


def test_pages_of_ten_are_10_10_5_newest_first(
    client: TestClient, caller: Caller, made: list[dict[str, Any]]
) -> None:
    pages = _all_pages(client, caller, limit="10")
    assert [len(p) for p in pages] == [10, 10, 5]
    ids = [s["id"] for p in pages for s in p]
    assert len(set(ids)) == 25  # no duplicates
    assert ids == [s["id"] for s in reversed(made)]  # exactly newest first, none missing
    stamps = [datetime.fromisoformat(s["createdAt"]) for p in pages for s in p]
    assert stamps == sorted(stamps, reverse=True)
    # every listed session carries the full resource
    assert [s for p in pages for s in p] == list(reversed(made))


def test_next_cursor_only_while_more_remain(
    client: TestClient, caller: Caller, made: list[dict[str, Any]]
) -> None:
    first = _page(client, caller, limit="10")
    assert isinstance(first["nextCursor"], str) and first["nextCursor"]
    assert _page(client, caller, limit="25")["nextCursor"] is None
    assert len(_page(client, caller, limit="25")["sessions"]) == 25


def test_default_limit_is_20(
    client: TestClient, caller: Caller, made: list[dict[str, Any]]
) -> None:
    page = _page(client, caller)
    assert len(page["sessions"]) == 20 and page["nextCursor"] is not None


def test_a_page_is_stable_when_new_sessions_arrive(
    client: TestClient, caller: Caller, made: list[dict[str, Any]]
) -> None:
    first = _page(client, caller, limit="10")
    newcomer = create(client, caller, {"title": "late"})["session"]
    second = _page(client, caller, limit="10", cursor=first["nextCursor"])
    assert [s["id"] for s in second["sessions"]] == [s["id"] for s in reversed(made)][10:20]
    assert newcomer["id"] not in {s["id"] for s in second["sessions"]}


def test_status_filter(client: TestClient, caller: Caller, made: list[dict[str, Any]]) -> None:
    archived = {made[i]["id"] for i in (1, 5, 7)}
    completed = {made[i]["id"] for i in (2, 3)}
    for sid in archived:
        r = client.patch(
            f"/api/sessions/{sid}", headers=caller.headers, json={"status": "archived"}
        )
        assert r.status_code == 200
    for sid in completed:
        r = client.patch(
            f"/api/sessions/{sid}", headers=caller.headers, json={"status": "completed"}
        )
        assert r.status_code == 200
    got = [s for p in _all_pages(client, caller, status="archived", limit="2") for s in p]
    assert {s["id"] for s in got} == archived and len(got) == 3
    assert {s["status"] for s in got} == {"archived"}
    assert {s["id"] for p in _all_pages(client, caller, status="completed") for s in p} == completed
    running = [s for p in _all_pages(client, caller, status="running", limit="7") for s in p]
    assert len(running) == 20 and {s["status"] for s in running} == {"running"}
    assert _page(client, caller, status="failed") == {"sessions": [], "nextCursor": None}


def test_only_the_callers_sessions(client: TestClient, caller: Caller) -> None:
    other = make_caller("Someone else")
    mine = {create(client, caller)["session"]["id"] for _ in range(3)}
    theirs = {create(client, other)["session"]["id"] for _ in range(2)}
    assert {s["id"] for s in _page(client, caller)["sessions"]} == mine
    assert {s["id"] for s in _page(client, other)["sessions"]} == theirs
    newcomer = make_caller("New")
    assert _page(client, newcomer) == {"sessions": [], "nextCursor": None}


def test_a_cursor_does_not_reveal_other_accounts_sessions(
    client: TestClient, caller: Caller, made: list[dict[str, Any]]
) -> None:
    other = make_caller("Mallory")
    cursor = _page(client, caller, limit="5")["nextCursor"]
    assert _page(client, other, cursor=cursor) == {"sessions": [], "nextCursor": None}


def test_bad_limit_is_400(client: TestClient, caller: Caller) -> None:
    for limit in ["0", "101", "-1", "abc", "", "1.5", "10 ", "1e2"]:
        body = assert_error(_list(client, caller, limit=limit), 400, case=limit)
        assert body.get("missing_fields") == ["limit"]


def test_limit_bounds_are_accepted(client: TestClient, caller: Caller) -> None:
    create(client, caller)
    create(client, caller)
    assert len(_page(client, caller, limit="1")["sessions"]) == 1
    assert len(_page(client, caller, limit="100")["sessions"]) == 2


def test_bad_status_is_400(client: TestClient, caller: Caller) -> None:
    for status in ["deleted", "ARCHIVED", "", "running,archived", "a\x00"]:
        body = assert_error(_list(client, caller, status=status), 400, case=status)
        assert body.get("missing_fields") == ["status"]


def test_bad_cursor_is_400(client: TestClient, caller: Caller) -> None:
    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode()

    before = row_counts()
    for cursor in [
        "garbage!!",
        b64(b"not-a-cursor"),
        b64(b"2024-01-01T00:00:00|not-a-uuid"),
        b64(b"2024-01-01T00:00:00|3c90c3cc-0d44-4b50-8888-8dd25736052a"),  # no timezone
        b64(b"yesterday|3c90c3cc-0d44-4b50-8888-8dd25736052a"),
        b64(b"\xff\xfe|x"),
        "%00",
        "x" * 5000,
    ]:
        body = assert_error(_list(client, caller, cursor=cursor), 400, case=cursor)
        assert body.get("missing_fields") == ["cursor"]
    assert row_counts() == before
