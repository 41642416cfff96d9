"""Who may use a session (SPEC §3, issue 11): a personal session is its creator's; an
org session belongs to the org, so the org's own key and every current member use it,
and nobody else, not even a member who created it and has since left.

Every session-scoped route of the app is tried (the list is read from the app, so a new
route is covered or this test says it is missing), for every kind of caller."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller, add_member, make_account, make_caller
from tests.support.rows import sql
from worker.db.engine import get_sessionmaker
from worker.services import accounts

# A body for every session-scoped route that takes one, valid enough that the route
# reaches its access check (a route missing here fails the test that lists them).
BODIES: dict[tuple[str, str], Any] = {
    ("PATCH", "/api/sessions/{session_id}"): {"title": "renamed", "linesAdded": 3},
    ("POST", "/api/sessions/{session_id}/extend"): {"seconds": 60},
    ("POST", "/api/sessions/{session_id}/chats"): {"title": "second"},
    ("PATCH", "/api/sessions/{session_id}/chats/{chat_id}"): {"title": "renamed chat"},
    ("POST", "/api/sessions/{session_id}/chats/{chat_id}/read"): {},
    ("POST", "/api/sessions/{session_id}/chats/{chat_id}/messages"): {
        "role": "user",
        "parts": [{"type": "text", "text": "hello"}],
    },
    ("POST", "/api/sessions/{session_id}/chats/{chat_id}/stream"): {"streamId": "turn-1"},
    ("DELETE", "/api/sessions/{session_id}/chats/{chat_id}/stream"): {"streamId": "turn-1"},
    ("POST", "/api/sessions/{session_id}/commands"): {"argv": ["true"]},
    # Raw bytes (the file), sent here as a JSON string.
    ("PUT", "/api/sessions/{session_id}/files/content"): "a file's content",
}
NO_BODY = {"GET", "DELETE"}


def session_routes() -> list[tuple[str, str]]:
    """(method, path template) of every operation of the API that names a session (read
    from the app's OpenAPI document, so a route added later is in the list)."""
    from api_stub.main import create_app

    paths = create_app().openapi()["paths"]
    found = [
        (method.upper(), path)
        for path, operations in paths.items()
        if "{session_id}" in path
        for method in operations
    ]
    # Deleting the chat last, so the routes before it still find the chat.
    return sorted(found, key=lambda r: (r[0] == "DELETE" and r[1].endswith("{chat_id}"), r))


def _body(method: str, template: str) -> Any:
    if (method, template) in BODIES:
        return BODIES[(method, template)]
    return None


def _request(
    client: TestClient, caller: Caller, method: str, template: str, sid: str, chat: str
) -> Any:
    path = template.format(session_id=sid, chat_id=chat, command_id=uuid.uuid4())
    body = _body(method, template)
    if body is None:
        return client.request(method, path, headers=caller.headers)
    return client.request(method, path, headers=caller.headers, json=body)


def _state(sid: str) -> list[Any]:
    """Everything a request about the session could change, as text."""
    return [
        sql("SELECT s::text FROM sessions s WHERE id = :sid", sid=sid),
        sql("SELECT c::text FROM chats c WHERE session_id = :sid ORDER BY id", sid=sid),
        sql(
            "SELECT m::text FROM chat_messages m JOIN chats c ON c.id = m.chat_id"
            " WHERE c.session_id = :sid ORDER BY m.id",
            sid=sid,
        ),
        sql(
            "SELECT r::text FROM chat_reads r JOIN chats c ON c.id = r.chat_id"
            " WHERE c.session_id = :sid ORDER BY r.chat_id, r.account_id",
            sid=sid,
        ),
        sql("SELECT r::text FROM lifecycle_runs r WHERE session_id = :sid ORDER BY id", sid=sid),
        sql("SELECT count(*) FROM outbox"),
    ]


def _key_of(account: uuid.UUID) -> Caller:
    with get_sessionmaker().begin() as db:
        key = accounts.create_key(db, account)
    return Caller(account, key.key, key.id)


def _remove_member(org: uuid.UUID, account: uuid.UUID) -> None:
    with get_sessionmaker().begin() as db:
        accounts.remove_member(db, org, account)


@dataclass
class Org:
    id: uuid.UUID
    key: Caller  # the org's own key
    creator: Caller  # a member who creates the org's sessions
    member: Caller  # another member
    outsider: Caller  # a person with no tie to the org
    other_org_member: Caller  # a member of another org
    ex_member: Caller  # a member removed from the org


@pytest.fixture
def org(client: TestClient) -> Iterator[Org]:
    org_id, other_org = make_account("Acme", org=True), make_account("Globex", org=True)
    people = {n: make_caller(n) for n in ("Ada", "Bob", "Eve", "Gus", "Ex")}
    for name in ("Ada", "Bob", "Ex"):
        add_member(org_id, people[name].account_id)
    add_member(other_org, people["Gus"].account_id)
    _remove_member(org_id, people["Ex"].account_id)
    yield Org(
        org_id,
        _key_of(org_id),
        people["Ada"],
        people["Bob"],
        people["Eve"],
        people["Gus"],
        people["Ex"],
    )


def _org_session(client: TestClient, org: Org, title: str) -> tuple[str, str]:
    created = create(client, org.creator, {"title": title, "organizationId": str(org.id)})
    return created["session"]["id"], created["chat"]["id"]


def test_every_session_route_has_a_body_here_when_it_takes_one() -> None:
    routes = session_routes()
    assert len(routes) >= 20, routes  # the sessions and chats routers are both there
    for method, template in routes:
        if method not in NO_BODY and (method, template) not in BODIES:
            # A route without a body is fine; say so here when one is added.
            assert template.endswith(
                ("/sandbox", "/hibernate", "/snapshots", "/diff", "/activity", "/kill")
            ), f"add a body for {method} {template} to BODIES"


@pytest.mark.parametrize("who", ["creator", "member", "key"])
def test_the_org_and_its_members_use_every_route_of_an_org_session(
    client: TestClient, org: Org, who: str
) -> None:
    caller: Caller = getattr(org, who)
    sid, chat = _org_session(client, org, f"for {who}")
    for method, template in session_routes():
        r = _request(client, caller, method, template, sid, chat)
        assert r.status_code not in (401, 403), (method, template, r.status_code, r.text)
        if r.status_code == 404:  # only "no cached diff yet" / nothing of the kind yet
            assert r.json()["error"] != "Session not found", (method, template)


@pytest.mark.parametrize("who", ["member", "key"])
def test_an_org_member_and_the_org_key_read_and_kick_an_org_session(
    client: TestClient, org: Org, who: str
) -> None:
    caller: Caller = getattr(org, who)
    sid, _ = _org_session(client, org, "shared")
    r = client.get(f"/api/sessions/{sid}", headers=caller.headers)
    assert r.status_code == 200, r.text
    assert r.json()["session"]["id"] == sid
    kick = client.post(f"/api/sessions/{sid}/sandbox", headers=caller.headers)
    assert kick.status_code == 202, kick.text
    # Still provisioning: the start coalesces onto the provision run, which starts it.
    assert kick.json()["run"]["kind"] in ("provision", "start")
    # Any member may change and archive it too: the session is the org's.
    r = client.patch(f"/api/sessions/{sid}", headers=caller.headers, json={"status": "archived"})
    assert r.status_code == 200, r.text
    assert r.json()["session"]["status"] == "archived"


@pytest.mark.parametrize("who", ["outsider", "other_org_member", "ex_member"])
def test_no_one_else_uses_any_route_of_an_org_session(
    client: TestClient, org: Org, who: str
) -> None:
    caller: Caller = getattr(org, who)
    sid, chat = _org_session(client, org, f"not for {who}")
    before = _state(sid)
    for method, template in session_routes():
        r = _request(client, caller, method, template, sid, chat)
        assert_error(r, 403, "Forbidden", case=(method, template))
    assert _state(sid) == before


def test_a_member_who_leaves_loses_the_org_sessions_at_once(client: TestClient, org: Org) -> None:
    sid, chat = _org_session(client, org, "left behind")
    mine = create(client, org.member, {"title": "by Bob", "organizationId": str(org.id)})
    assert client.get(f"/api/sessions/{sid}", headers=org.member.headers).status_code == 200
    _remove_member(org.id, org.member.account_id)
    _remove_member(org.id, org.creator.account_id)
    # Neither the member nor the creator itself: the sessions stay with the org.
    for gone, session_id in (
        (org.member, sid),
        (org.creator, sid),
        (org.member, mine["session"]["id"]),
    ):
        before = _state(session_id)
        for method, template in session_routes():
            r = _request(client, gone, method, template, session_id, chat)
            assert_error(r, 403, "Forbidden", case=(method, template))
        assert _state(session_id) == before
    r = client.get(f"/api/sessions?organizationId={org.id}", headers=org.member.headers)
    assert_error(r, 403, "Access denied to specified organization_id")
    # The org keeps them.
    assert client.get(f"/api/sessions/{sid}", headers=org.key.headers).status_code == 200


@pytest.mark.parametrize("who", ["member", "key"])
def test_a_personal_session_is_its_creators_alone(client: TestClient, org: Org, who: str) -> None:
    """Being in the same org opens none of a member's personal sessions."""
    created = create(client, org.creator, {"title": "private"})
    sid, chat = created["session"]["id"], created["chat"]["id"]
    before = _state(sid)
    for method, template in session_routes():
        r = _request(client, getattr(org, who), method, template, sid, chat)
        assert_error(r, 403, "Forbidden", case=(method, template))
    assert _state(sid) == before


def test_listing_by_org(client: TestClient, org: Org) -> None:
    first, _ = _org_session(client, org, "one")
    second = create(client, org.member, {"title": "two", "organizationId": str(org.id)})
    by_key = create(client, org.key, {"title": "three", "organizationId": str(org.id)})
    create(client, org.creator, {"title": "personal"})
    expected = [by_key["session"]["id"], second["session"]["id"], first]
    for caller in (org.creator, org.member, org.key):
        r = client.get(f"/api/sessions?organizationId={org.id}", headers=caller.headers)
        assert r.status_code == 200, r.text
        assert [s["id"] for s in r.json()["sessions"]] == expected
        # Paged, newest first, like the caller's own listing.
        page = client.get(
            f"/api/sessions?organizationId={org.id}&limit=2", headers=caller.headers
        ).json()
        assert [s["id"] for s in page["sessions"]] == expected[:2]
        rest = client.get(
            f"/api/sessions?organizationId={org.id}&limit=2&cursor={page['nextCursor']}",
            headers=caller.headers,
        ).json()
        assert [s["id"] for s in rest["sessions"]] == expected[2:]
    # Without the filter a caller lists the sessions it created, as before.
    mine = client.get("/api/sessions", headers=org.member.headers).json()["sessions"]
    assert [s["id"] for s in mine] == [second["session"]["id"]]
    for caller in (org.outsider, org.other_org_member, org.ex_member):
        r = client.get(f"/api/sessions?organizationId={org.id}", headers=caller.headers)
        assert_error(r, 403, "Access denied to specified organization_id")
    r = client.get("/api/sessions?organizationId=not-a-uuid", headers=org.member.headers)
    assert_error(r, 400, "organizationId must be a valid UUID")


def test_another_accounts_personal_session_is_403_on_every_route(
    client: TestClient, caller: Caller
) -> None:
    created = create(client, caller, {"title": "mine"})
    sid, chat = created["session"]["id"], created["chat"]["id"]
    intruder = make_caller("Eve")
    before = _state(sid)
    for method, template in session_routes():
        r = _request(client, intruder, method, template, sid, chat)
        assert_error(r, 403, "Forbidden", case=(method, template))
    assert _state(sid) == before


def test_unknown_session_is_404_on_every_route(client: TestClient, caller: Caller) -> None:
    for sid in (str(uuid.uuid4()), "not-a-uuid"):
        for method, template in session_routes():
            r = _request(client, caller, method, template, sid, str(uuid.uuid4()))
            assert_error(r, 404, "Session not found", case=(method, template))
