"""200 concurrent creates for one account against the real API server (uvicorn in a
subprocess): nothing lost, nothing doubled, generated titles unique (issue 2 "Must show" 7)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.support.factories import Caller, make_caller
from tests.support.rows import row_counts, sql

N = 200
THREADS = 16


def test_200_concurrent_creates_for_one_account(live_api: str) -> None:
    caller: Caller = make_caller("Busy")
    limits = httpx.Limits(max_connections=THREADS, max_keepalive_connections=THREADS)
    with httpx.Client(base_url=live_api, headers=caller.headers, timeout=60, limits=limits) as http:

        def post(i: int) -> httpx.Response:
            # a third with no body, a third blank-titled, a third with {} : all generated titles
            if i % 3 == 0:
                return http.post("/api/sessions")
            if i % 3 == 1:
                return http.post("/api/sessions", json={"title": "  "})
            return http.post("/api/sessions", json={})

        with ThreadPoolExecutor(max_workers=THREADS) as pool:
            responses = list(pool.map(post, range(N)))

    assert [r.status_code for r in responses] == [200] * N, [
        r.text for r in responses if r.status_code != 200
    ][:3]
    bodies = [r.json() for r in responses]
    session_ids = {b["session"]["id"] for b in bodies}
    chat_ids = {b["chat"]["id"] for b in bodies}
    titles = [b["session"]["title"] for b in bodies]
    assert len(session_ids) == N
    assert len(chat_ids) == N
    assert len(set(titles)) == N, "generated titles collide"
    assert {b["session"]["userId"] for b in bodies} == {str(caller.account_id)}

    counts = row_counts()
    assert (counts["sessions"], counts["chats"], counts["outbox"], counts["lifecycle_runs"]) == (
        N,
        N,
        N,
        N,
    )
    assert {str(r.id) for r in sql("SELECT id FROM sessions")} == session_ids
    assert {str(r.session_id) for r in sql("SELECT session_id FROM chats")} == session_ids
    assert {
        r.sid
        for r in sql(
            "SELECT payload->'kwargs'->>'session_id' AS sid FROM outbox"
            " WHERE task_name = 'lifecycle.provision'"
        )
    } == session_ids
    runs = sql("SELECT session_id, kind, state FROM lifecycle_runs")
    assert {str(r.session_id) for r in runs} == session_ids
    assert {(r.kind, r.state) for r in runs} == {("provision", "queued")}
    db_titles = [r.title for r in sql("SELECT title FROM sessions")]
    assert sorted(db_titles) == sorted(titles)

    # the listing sees all of them, newest first, with no duplicates across pages
    seen: list[str] = []
    cursor = None
    with httpx.Client(base_url=live_api, headers=caller.headers, timeout=30) as http:
        while True:
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            page = http.get("/api/sessions", params=params).json()
            seen += [s["id"] for s in page["sessions"]]
            cursor = page["nextCursor"]
            if cursor is None:
                break
    assert len(seen) == N and set(seen) == session_ids
