"""Chats, transcripts, read markers, stream claims and per-session timeouts over HTTP
(in-process API on real PostgreSQL and Redis)."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from tests.support.api import assert_error, create
from tests.support.factories import Caller, make_caller
from tests.support.rows import sql, sql_exec
from worker.db.engine import get_sessionmaker
from worker.db.models import SessionRecord


@pytest.fixture
def session(client: TestClient, caller: Caller) -> dict[str, Any]:
    return create(client, caller, {"title": "chatty"})


def _chats(sid: str) -> str:
    return f"/api/sessions/{sid}/chats"


def _first_chat(client: TestClient, caller: Caller, sid: str) -> dict[str, Any]:
    r = client.get(_chats(sid), headers=caller.headers)
    assert r.status_code == 200, r.text
    return r.json()["chats"][0]  # type: ignore[no-any-return]


# ----------------------------------------------------------------- chats


def test_chat_crud_with_etags(client: TestClient, caller: Caller, session: dict[str, Any]) -> None:
    sid = session["session"]["id"]
    first = session["chat"]
    assert _first_chat(client, caller, sid)["id"] == first["id"]

    r = client.post(_chats(sid), headers=caller.headers, json={"title": "  Second  "})
    assert r.status_code == 201, r.text
    second = r.json()["chat"]
    assert second["title"] == "Second" and second["sessionId"] == sid
    assert second["modelId"]  # the configured default

    r = client.get(f"{_chats(sid)}/{second['id']}", headers=caller.headers)
    etag = r.headers["ETag"]
    assert (
        client.get(
            f"{_chats(sid)}/{second['id']}", headers={**caller.headers, "If-None-Match": etag}
        ).status_code
        == 304
    )

    r = client.patch(
        f"{_chats(sid)}/{second['id']}",
        headers={**caller.headers, "If-Match": '"stale"'},
        json={"title": "nope"},
    )
    assert_error(r, 412)
    r = client.patch(
        f"{_chats(sid)}/{second['id']}",
        headers={**caller.headers, "If-Match": etag},
        json={"title": "Renamed", "modelId": "openai/gpt-5"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["chat"]["title"] == "Renamed" and r.json()["chat"]["modelId"] == "openai/gpt-5"
    assert r.headers["ETag"] != etag

    page = client.get(_chats(sid), headers=caller.headers, params={"limit": "1"}).json()
    assert [c["id"] for c in page["chats"]] == [second["id"]]  # newest first
    rest = client.get(
        _chats(sid), headers=caller.headers, params={"cursor": page["nextCursor"]}
    ).json()
    assert [c["id"] for c in rest["chats"]] == [first["id"]] and rest["nextCursor"] is None

    assert client.delete(f"{_chats(sid)}/{second['id']}", headers=caller.headers).status_code == 204
    assert_error(
        client.get(f"{_chats(sid)}/{second['id']}", headers=caller.headers), 404, "Chat not found"
    )
    # The last chat may go too: the session stays, with no chat.
    assert client.delete(f"{_chats(sid)}/{first['id']}", headers=caller.headers).status_code == 204
    assert client.get(_chats(sid), headers=caller.headers).json()["chats"] == []
    assert client.get(f"/api/sessions/{sid}", headers=caller.headers).status_code == 200


def test_chat_errors(client: TestClient, caller: Caller, session: dict[str, Any]) -> None:
    sid, cid = session["session"]["id"], session["chat"]["id"]
    assert_error(client.get(_chats(sid)), 401)
    stranger = make_caller("Eve")
    for method, path in (
        ("GET", _chats(sid)),
        ("POST", _chats(sid)),
        ("GET", f"{_chats(sid)}/{cid}"),
        ("PATCH", f"{_chats(sid)}/{cid}"),
        ("DELETE", f"{_chats(sid)}/{cid}"),
        ("GET", f"{_chats(sid)}/{cid}/messages"),
        ("POST", f"{_chats(sid)}/{cid}/stream"),
    ):
        assert_error(client.request(method, path, headers=stranger.headers, json={}), 403)
    assert_error(
        client.get(_chats(str(uuid.uuid4())), headers=caller.headers), 404, "Session not found"
    )
    assert_error(
        client.get(f"{_chats(sid)}/not-a-uuid", headers=caller.headers), 404, "Chat not found"
    )
    # A chat of another session is not found through this one.
    other = create(client, caller)
    assert_error(client.get(f"{_chats(sid)}/{other['chat']['id']}", headers=caller.headers), 404)
    body = assert_error(client.post(_chats(sid), headers=caller.headers, json={"title": 5}), 400)
    assert body["missing_fields"] == ["title"]
    body = assert_error(
        client.post(_chats(sid), headers=caller.headers, json={"title": "x" * 1000}), 400
    )
    assert body["missing_fields"] == ["title"]
    assert_error(client.get(_chats(sid), headers=caller.headers, params={"limit": "0"}), 400)
    assert_error(client.get(_chats(sid), headers=caller.headers, params={"cursor": "!!"}), 400)


# ----------------------------------------------------------------- messages and reads


def test_messages_append_page_and_read_markers(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    sid, cid = session["session"]["id"], session["chat"]["id"]
    url = f"{_chats(sid)}/{cid}/messages"
    assert _first_chat(client, caller, sid)["unread"] is False
    ids = []
    for i in range(5):
        role = "assistant" if i % 2 else "user"
        r = client.post(
            url,
            headers=caller.headers,
            json={"role": role, "parts": [{"type": "text", "text": f"m{i}"}]},
        )
        assert r.status_code == 201, r.text
        ids.append(r.json()["message"]["id"])
    assert ids == sorted(ids)
    chat = client.get(f"{_chats(sid)}/{cid}", headers=caller.headers).json()["chat"]
    assert chat["lastAssistantMessageAt"] is not None
    assert _first_chat(client, caller, sid)["unread"] is True

    page = client.get(url, headers=caller.headers, params={"limit": "2"}).json()
    assert [m["id"] for m in page["messages"]] == ids[:2]
    seen = [m["id"] for m in page["messages"]]
    while page["nextAfter"] is not None:
        page = client.get(
            url, headers=caller.headers, params={"limit": "2", "after": str(page["nextAfter"])}
        ).json()
        seen += [m["id"] for m in page["messages"]]
    assert seen == ids
    assert page["messages"][-1]["parts"] == [{"type": "text", "text": "m4"}]

    r = client.post(f"{_chats(sid)}/{cid}/read", headers=caller.headers, json={"messageId": ids[1]})
    assert r.json()["lastReadMessageId"] == ids[1]
    assert _first_chat(client, caller, sid)["unread"] is True
    r = client.post(f"{_chats(sid)}/{cid}/read", headers=caller.headers)
    assert r.json()["lastReadMessageId"] == ids[-1]
    assert _first_chat(client, caller, sid)["unread"] is False
    # A marker never moves back.
    client.post(f"{_chats(sid)}/{cid}/read", headers=caller.headers, json={"messageId": ids[0]})
    assert _first_chat(client, caller, sid)["unread"] is False


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"parts": [{"type": "text"}]}, 400, "role"),
        ({"role": "robot", "parts": [{"type": "text"}]}, 400, "role"),
        ({"role": "user"}, 400, "parts"),
        ({"role": "user", "parts": []}, 400, "parts"),
        ({"role": "user", "parts": ["text"]}, 400, "parts"),
        ({"role": "user", "parts": [{"t": "x"}] * 201}, 400, "parts"),
        ({"role": "user", "parts": [{"text": "x" * 62_000}]}, 413, "parts"),
        ({"role": "user", "parts": [{"text": "nul\u0000"}]}, 400, "parts"),
    ],
)
def test_bad_messages_are_refused_and_change_nothing(
    client: TestClient, caller: Caller, session: dict[str, Any], body: Any, status: int, field: str
) -> None:
    sid, cid = session["session"]["id"], session["chat"]["id"]
    r = client.post(f"{_chats(sid)}/{cid}/messages", headers=caller.headers, json=body)
    err = assert_error(r, status)
    assert err.get("missing_fields") == [field]
    assert sql("SELECT count(*) FROM chat_messages")[0][0] == 0


# ----------------------------------------------------------------- stream claims


def test_stream_claim_lifecycle(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    sid, cid = session["session"]["id"], session["chat"]["id"]
    url = f"{_chats(sid)}/{cid}/stream"
    assert client.get(url, headers=caller.headers).status_code == 204
    r = client.post(url, headers=caller.headers, json={"streamId": "turn-1", "ttlSeconds": 30})
    assert r.status_code == 200, r.text
    claimed = r.json()
    assert claimed["streamId"] == "turn-1" and claimed["expiresAt"]
    # The same stream again renews (heartbeat), keeping the claim time.
    again = client.post(url, headers=caller.headers, json={"streamId": "turn-1"}).json()
    assert again["claimedAt"] == claimed["claimedAt"]
    body = assert_error(client.post(url, headers=caller.headers, json={"streamId": "turn-2"}), 409)
    assert "turn-1" in body["error"] and body["activeStreamId"] == "turn-1"
    assert client.get(url, headers=caller.headers).json()["streamId"] == "turn-1"
    # Only the holder releases; a live claim blocks deleting the chat and hibernating.
    assert_error(
        client.request("DELETE", url, headers=caller.headers, json={"streamId": "turn-2"}), 409
    )
    assert_error(client.delete(f"{_chats(sid)}/{cid}", headers=caller.headers), 409)
    assert_error(client.post(f"/api/sessions/{sid}/hibernate", headers=caller.headers), 409)
    r = client.post(
        f"/api/sessions/{sid}/hibernate", headers=caller.headers, params={"force": "true"}
    )
    assert r.status_code == 202, r.text
    assert r.json()["run"]["trigger"] == "force"
    assert (
        client.delete(url, headers=caller.headers, params={"streamId": "turn-1"}).status_code == 204
    )
    assert client.get(url, headers=caller.headers).status_code == 204
    assert (
        client.delete(url, headers=caller.headers, params={"streamId": "turn-1"}).status_code == 204
    )
    for bad in ({}, {"streamId": ""}, {"streamId": 7}, {"streamId": "x" * 201}):
        err = assert_error(client.post(url, headers=caller.headers, json=bad), 400)
        assert err["missing_fields"] == ["streamId"]
    for ttl in (0, -1, "5", 10**9):
        err = assert_error(
            client.post(url, headers=caller.headers, json={"streamId": "t", "ttlSeconds": ttl}), 400
        )
        assert err["missing_fields"] == ["ttlSeconds"]


def test_an_expired_claim_can_be_taken_over(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    sid, cid = session["session"]["id"], session["chat"]["id"]
    url = f"{_chats(sid)}/{cid}/stream"
    client.post(url, headers=caller.headers, json={"streamId": "crashed"})
    sql_exec(
        "UPDATE chats SET stream_expires_at = now() - interval '1 second' WHERE id = :id", id=cid
    )
    assert client.get(url, headers=caller.headers).status_code == 204
    r = client.post(url, headers=caller.headers, json={"streamId": "next"})
    assert r.status_code == 200 and r.json()["streamId"] == "next"


def _claim(
    client: TestClient,
    caller: Caller,
    url: str,
    name: str,
    barrier: threading.Barrier,
    codes: dict[str, int],
) -> None:
    barrier.wait()
    codes[name] = client.post(url, headers=caller.headers, json={"streamId": name}).status_code


def test_racing_claims_have_exactly_one_winner(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    sid, cid = session["session"]["id"], session["chat"]["id"]
    url = f"{_chats(sid)}/{cid}/stream"
    for round_ in range(100):
        barrier = threading.Barrier(2)
        codes: dict[str, int] = {}
        names = (f"a{round_}", f"b{round_}")
        threads = [
            threading.Thread(target=_claim, args=(client, caller, url, n, barrier, codes))
            for n in names
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes.values()) == [200, 409], (round_, codes)
        winner = next(n for n, c in codes.items() if c == 200)
        assert client.get(url, headers=caller.headers).json()["streamId"] == winner
        assert (
            client.delete(url, headers=caller.headers, params={"streamId": winner}).status_code
            == 204
        )


# ----------------------------------------------------------------- timeouts and extend


def test_per_session_timeouts_on_create_and_patch(client: TestClient, caller: Caller) -> None:
    s = create(client, caller, {"idleTimeoutSeconds": 5, "maxLifetimeSeconds": 600})["session"]
    assert s["idleTimeoutSeconds"] == 5 and s["maxLifetimeSeconds"] == 600
    for body, field in (
        ({"idleTimeoutSeconds": 0}, "idleTimeoutSeconds"),
        ({"idleTimeoutSeconds": 10**7}, "idleTimeoutSeconds"),
        ({"maxLifetimeSeconds": "60"}, "maxLifetimeSeconds"),
        ({"maxLifetimeSeconds": 10**7}, "maxLifetimeSeconds"),
    ):
        err = assert_error(client.post("/api/sessions", headers=caller.headers, json=body), 400)
        assert err["missing_fields"] == [field]
        err = assert_error(
            client.patch(f"/api/sessions/{s['id']}", headers=caller.headers, json=body), 400
        )
        assert err["missing_fields"] == [field]
    r = client.patch(
        f"/api/sessions/{s['id']}", headers=caller.headers, json={"idleTimeoutSeconds": 90}
    )
    assert r.status_code == 200 and r.json()["session"]["idleTimeoutSeconds"] == 90


def _make_active(sid: str, started: datetime, expires: datetime) -> None:
    with get_sessionmaker().begin() as db:
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == uuid.UUID(sid))
            .values(
                lifecycle_state="active",
                sandbox_state={"type": "local", "startedAt": started.isoformat()},
                sandbox_expires_at=expires,
                last_activity_at=started,
                hibernate_after=started + timedelta(minutes=30),
            )
        )


def test_extend_moves_the_expiry_within_the_maximum(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    sid = session["session"]["id"]
    url = f"/api/sessions/{sid}/extend"
    assert_error(client.post(url, headers=caller.headers, json={"seconds": 60}), 409)
    started = datetime.now(UTC) - timedelta(hours=1)
    expires = started + timedelta(hours=5)
    _make_active(sid, started, expires)
    r = client.post(url, headers=caller.headers, json={"seconds": 3600})
    assert r.status_code == 200, r.text
    assert r.json()["extendedBy"] == 3600
    new = datetime.fromisoformat(r.json()["session"]["sandboxExpiresAt"])
    assert new == expires + timedelta(hours=1)
    # Capped at start + the operator maximum (24 h by default), then 409.
    r = client.post(url, headers=caller.headers, json={"seconds": 10**6})
    assert datetime.fromisoformat(r.json()["session"]["sandboxExpiresAt"]) == started + timedelta(
        hours=24
    )
    assert_error(client.post(url, headers=caller.headers, json={"seconds": 1}), 409)
    for bad in ({}, {"seconds": 0}, {"seconds": "1"}, {"seconds": -5}):
        err = assert_error(client.post(url, headers=caller.headers, json=bad), 400)
        assert err["missing_fields"] == ["seconds"]


def test_patching_the_idle_timeout_moves_hibernate_after_at_once(
    client: TestClient, caller: Caller, session: dict[str, Any]
) -> None:
    sid = session["session"]["id"]
    started = datetime.now(UTC) - timedelta(minutes=1)
    _make_active(sid, started, started + timedelta(hours=5))
    r = client.patch(f"/api/sessions/{sid}", headers=caller.headers, json={"idleTimeoutSeconds": 5})
    assert datetime.fromisoformat(r.json()["session"]["hibernateAfter"]) == started + timedelta(
        seconds=5
    )
    r = client.post(f"/api/sessions/{sid}/activity", headers=caller.headers)
    after = datetime.fromisoformat(r.json()["session"]["hibernateAfter"])
    last = datetime.fromisoformat(r.json()["session"]["lastActivityAt"])
    assert after - last == timedelta(seconds=5)
