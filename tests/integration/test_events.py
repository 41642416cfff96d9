"""Events: appended in the transaction of every change, with a reason a person
understands, read per session or as the caller's feed (keyset, long-poll), and paged
without gaps or repeats while other transactions commit out of id order."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from tests.support.api import assert_error, create
from tests.support.drains import drain
from tests.support.events import events_of, session_for
from tests.support.factories import Caller, add_member, make_account, make_caller
from tests.support.rows import sql, sql_exec
from worker.db.engine import get_sessionmaker
from worker.services import events, hosts, sweeps
from worker.services.lifecycle import LifecycleService


def _types(found: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in found]


def test_a_whole_life_is_told_with_reasons(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = session_for(client, caller, svc)
    drain(svc, sid=uuid.UUID(sid))  # provision, start
    r = client.post(f"/api/sessions/{sid}/hibernate", headers=caller.headers)
    assert r.status_code == 202
    drain(svc, sid=uuid.UUID(sid))
    found = events_of(client, caller, sid)
    prefix = caller.key[:10]
    # In commit order; within one statement in the order its parts ran.
    assert _types(found) == [
        "session.created",
        "run.queued",  # provision
        "run.started",
        "run.queued",  # the chained start, recorded with ...
        "run.succeeded",  # ... the provision's outcome
        "run.started",
        "session.active",
        "run.succeeded",
        "run.queued",  # hibernate, with ...
        "session.kicked",  # ... the kick that asked for it
        "session.hibernating",  # the claim
        "run.started",
        "session.hibernated",  # the record
        "run.succeeded",
    ]
    by_type = {e["type"]: e for e in found}
    assert by_type["session.created"]["reason"] == f"created by key {prefix}\u2026"
    hibernated = by_type["session.hibernated"]
    assert hibernated["reason"] == f"hibernate requested by key {prefix}\u2026"
    assert hibernated["version"] == 3 and hibernated["data"]["from"] == "hibernating"
    assert by_type["session.kicked"]["data"] == {
        "kind": "hibernate",
        "coalesced": False,
        "satisfied": False,
        "force": False,
    }
    assert by_type["session.active"]["reason"] == "start after provisioning"
    # Every event names the session, its owner and (run events) the run.
    assert {e["sessionId"] for e in found} == {sid}
    assert {e["userId"] for e in found} == {str(caller.account_id)}
    assert all(e["runId"] for e in found if e["type"].startswith("run."))
    # Ids are unique and the page order is final: reading again gives the same list.
    assert len({e["id"] for e in found}) == len(found)
    assert events_of(client, caller, sid) == found
    # The key itself is never in an event.
    assert caller.key not in str(found)


def test_sweep_hibernations_say_idle_or_lifetime(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    idle, old = (session_for(client, caller, svc) for _ in range(2))
    for sid in (idle, old):
        drain(svc, uuid.UUID(sid))
    now = datetime.now(UTC)
    # One was last active 1800 s before its hibernateAfter, now passed; the other's
    # lifetime ends now (and it is not idle).
    sql_exec(
        "UPDATE sessions SET last_activity_at = :a, hibernate_after = :h WHERE id = :id",
        a=now - timedelta(seconds=1805),
        h=now - timedelta(seconds=5),
        id=idle,
    )
    sql_exec(
        "UPDATE sessions SET hibernate_after = :h, sandbox_expires_at = :e WHERE id = :id",
        h=now + timedelta(hours=1),
        e=now,
        id=old,
    )
    assert sweeps.hibernate_idle(svc) == {"queued": 2}
    for sid in (idle, old):
        drain(svc, uuid.UUID(sid))
    for sid, reason in ((idle, "idle for 1800 s"), (old, "lifetime reached")):
        found = events_of(client, caller, sid)
        queued = [e for e in found if e["type"] == "sweep.hibernate"]
        hibernated = [e for e in found if e["type"] == "session.hibernated"]
        assert len(queued) == 1 and queued[0]["reason"] == reason
        assert len(hibernated) == 1 and hibernated[0]["reason"] == reason


def test_failures_carry_the_lifecycle_error_and_a_lost_host_says_so(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    assert svc.settings.fault_plan is not None
    svc.settings.fault_plan.write_text(
        '{"repo_host.ensure_repo": [{"error": "permanent", "message": "404 no such owner"}]}'
    )
    failed = session_for(client, caller, svc)
    drain(svc, uuid.UUID(failed))
    found = events_of(client, caller, failed)
    fail = next(e for e in found if e["type"] == "session.failed")
    assert fail["reason"] == "404 no such owner"
    assert next(e for e in found if e["type"] == "run.failed")["reason"] == "404 no such owner"

    lost = session_for(client, caller, svc)
    drain(svc, uuid.UUID(lost))
    with get_sessionmaker().begin() as db:
        hosts.beat(db, "h-gone", svc.queue)
    sql_exec("UPDATE worker_hosts SET last_beat_at = now() - interval '1 hour'")
    assert hosts.recover_lost_hosts(svc)["sessions"] == 1
    found = events_of(client, caller, lost)
    reasons = {e["type"]: e["reason"] for e in found}
    # No snapshot in a shared store: the session fails, and says which host was lost.
    assert reasons["session.failed"].startswith("host lost: host h-gone was lost")
    assert reasons["sweep.host_lost"].startswith("host h-gone was lost")


def test_kicks_that_coalesce_and_stream_claims_areevents_of(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = session_for(client, caller, svc)
    for _ in range(2):
        assert client.post(f"/api/sessions/{sid}/sandbox", headers=caller.headers).status_code
    chat = client.get(f"/api/sessions/{sid}/chats", headers=caller.headers).json()["chats"][0]
    url = f"/api/sessions/{sid}/chats/{chat['id']}/stream"
    assert client.post(url, json={"streamId": "turn-1"}, headers=caller.headers).status_code == 200
    assert client.post(url, json={"streamId": "turn-1"}, headers=caller.headers).status_code == 200
    r = client.request("DELETE", url, json={"streamId": "turn-1"}, headers=caller.headers)
    assert r.status_code == 204
    found = events_of(client, caller, sid)
    kicks = [e for e in found if e["type"] == "session.kicked"]
    assert [k["data"]["coalesced"] for k in kicks] == [True, True]  # onto the provision
    assert kicks[0]["reason"].endswith("(joined the open provision run)")
    streams = [e for e in found if e["type"].startswith("chat.")]
    # The renewal changed no claim: two events, not three.
    assert _types(streams) == ["chat.stream_claimed", "chat.stream_released"]
    assert streams[0]["reason"] == f"stream turn-1 claimed by key {caller.key[:10]}\u2026"
    assert streams[0]["data"]["chatId"] == chat["id"]


def test_access_session_events_and_the_feed(client: TestClient, caller: Caller) -> None:
    org = make_account("Acme", org=True)
    add_member(org, caller.account_id)
    mine = create(client, caller)["session"]["id"]
    org_session = create(client, caller, {"organizationId": str(org)})["session"]["id"]
    other = make_caller("Eve")
    member = make_caller("Bob")
    add_member(org, member.account_id)
    theirs = create(client, other)["session"]["id"]
    assert_error(
        client.get(f"/api/sessions/{theirs}/events", headers=caller.headers), 403, "Forbidden"
    )
    assert_error(
        client.get(f"/api/sessions/{uuid.uuid4()}/events", headers=caller.headers),
        404,
        "Session not found",
    )
    assert_error(client.get(f"/api/sessions/{mine}/events"), 401)
    assert_error(client.get("/api/events"), 401)
    for bad in ({"after": "-1"}, {"after": "x"}, {"limit": "0"}, {"limit": "501"}, {"wait": "31"}):
        assert_error(client.get("/api/events", params=bad, headers=caller.headers), 400)
    assert_error(
        client.get("/api/events", params={"after": 10**12}, headers=caller.headers),
        400,
        "after is not an event id",
    )

    def feed(who: Caller) -> set[str]:
        r = client.get("/api/events", params={"limit": 500}, headers=who.headers)
        assert r.status_code == 200, r.text
        return {e["sessionId"] for e in r.json()["events"]}

    assert feed(caller) == {mine, org_session}
    assert feed(other) == {theirs}
    # A member of the org sees the org's sessions, not the creator's personal ones.
    assert feed(member) == {org_session}


def test_the_feed_long_polls(client: TestClient, caller: Caller) -> None:
    create(client, caller)
    r = client.get("/api/events", params={"limit": 500}, headers=caller.headers)
    last = r.json()["nextAfter"]
    # Nothing new and no wait: an empty page that keeps the cursor.
    r = client.get("/api/events", params={"after": last}, headers=caller.headers)
    assert r.json() == {"events": [], "nextAfter": last}
    got: dict[str, Any] = {}

    def follow() -> None:
        got["page"] = client.get(
            "/api/events", params={"after": last, "wait": 30}, headers=caller.headers
        ).json()

    follower = threading.Thread(target=follow)
    follower.start()
    time.sleep(0.3)  # let it wait (the test holds either way)
    sid = create(client, caller)["session"]["id"]
    follower.join()
    assert got["page"]["events"][0]["type"] == "session.created"
    assert got["page"]["events"][0]["sessionId"] == sid


def test_paging_10000_events_has_no_gap_and_no_repeat_while_writers_race(
    client: TestClient, caller: Caller
) -> None:
    """Writers take event ids and commit out of id order (some hold their transaction
    a moment after taking an id); a reader pages the feed all along. Every event arrives
    exactly once."""
    writers, transactions, per_tx = 8, 50, 25  # 10,000 events
    written: list[int] = []
    lock = threading.Lock()

    def write(n: int) -> None:
        for i in range(transactions):
            with get_sessionmaker().begin() as db:
                ids = [
                    events.append(
                        db,
                        "test.tick",
                        reason="tick",
                        account_id=caller.account_id,
                        data={"writer": n, "tx": i},
                    )
                    for _ in range(per_tx)
                ]
                if (n + i) % 3 == 0:
                    time.sleep(0.005)  # commit after others that took later ids
            with lock:
                written.extend(ids)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(writers)]
    for t in threads:
        t.start()
    seen: list[int] = []
    after = 0

    def read_page() -> int:
        nonlocal after
        r = client.get("/api/events", params={"after": after, "limit": 200}, headers=caller.headers)
        assert r.status_code == 200, r.text
        page = r.json()
        seen.extend(e["id"] for e in page["events"])
        after = page["nextAfter"]
        return len(page["events"])

    while any(t.is_alive() for t in threads):
        read_page()
    for t in threads:
        t.join()
    while read_page():
        pass
    assert len(written) == writers * transactions * per_tx
    assert len(seen) == len(set(seen)), "an event was delivered twice"
    assert set(seen) == set(written), f"missed {len(set(written) - set(seen))} events"
    # The same feed read again in one go is the same sequence.
    assert sql("SELECT count(*) FROM events WHERE type = 'test.tick'")[0][0] == len(written)


def test_an_event_committed_after_a_later_one_is_not_skipped(
    client: TestClient, caller: Caller, server_urls: dict[str, str]
) -> None:
    """The case paging by id alone gets wrong: event A takes its id first, event B a
    later id but commits first. A reader must not move past A while A can still commit."""

    def feed(after: int) -> list[int]:
        r = client.get("/api/events", params={"after": after}, headers=caller.headers)
        return [e["id"] for e in r.json()["events"]]

    slow = get_sessionmaker()()
    slow.begin()
    a = events.append(slow, "test.slow", reason="A", account_id=caller.account_id)
    with get_sessionmaker().begin() as db:
        b = events.append(db, "test.fast", reason="B", account_id=caller.account_id)
    assert a < b
    seen = feed(0)
    assert b not in seen, "B was served while A, before it, could still commit"
    slow.commit()
    slow.close()
    seen += feed(seen[-1] if seen else 0)
    assert seen == [a, b]
    # A transaction left open in another database of the server (it cannot write these
    # events) does not hold the feed back.
    elsewhere = create_engine(server_urls["admin_url"], poolclass=NullPool)
    with elsewhere.connect() as conn:
        conn.execute(text("SELECT pg_current_xact_id()"))  # an xid, in flight
        with get_sessionmaker().begin() as db:
            c = events.append(db, "test.later", reason="C", account_id=caller.account_id)
        assert feed(b) == [c]
    elsewhere.dispose()


def test_a_commands_life_is_told_without_its_argv_or_env(
    client: TestClient, caller: Caller
) -> None:
    sid = create(client, caller)["session"]["id"]
    cid = str(uuid.uuid4())
    sql_exec(
        "INSERT INTO commands (id, session_id, argv, cwd, env, timeout_seconds, status)"
        " VALUES (:id, :sid, CAST(:argv AS jsonb), '/workspace', CAST(:env AS jsonb), 5, 'queued')",
        id=cid,
        sid=sid,
        argv='["echo", "hunter2"]',
        env='{"TOKEN": "s3cret"}',
    )
    sql_exec("UPDATE commands SET status = 'running' WHERE id = :id", id=cid)
    sql_exec("UPDATE commands SET status = 'exited', exit_code = 3 WHERE id = :id", id=cid)
    found = [e for e in events_of(client, caller, sid) if e["type"].startswith("command.")]
    assert [(e["type"], e["reason"]) for e in found] == [
        ("command.queued", "command requested"),
        ("command.running", "command started"),
        ("command.exited", "exited with code 3"),
    ]
    assert found[-1]["data"] == {"commandId": cid, "exitCode": 3, "killedBy": None}
    assert "hunter2" not in str(found) and "s3cret" not in str(found)
