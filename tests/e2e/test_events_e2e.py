"""Events, webhooks and retention end to end: the API, a Celery worker and beat as
separate processes, a webhook receiver on loopback that fails five times before it
recovers. Every event of a session's whole life — created, started, hibernated by the
idle sweep, auto-archived, auto-deleted — arrives, exactly once after deduplication by
``webhook-id``, with a valid signature."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.factories import Caller
from tests.support.processes import wait_until
from tests.support.stack import Stack, create, make_stack, wait_state
from tests.support.webhooks import Receiver, verify

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def lively(
    server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """A stack whose sessions go idle in seconds and are archived and emptied seconds
    later; webhooks may target loopback and retry every half second."""
    import redis

    redis.Redis.from_url(server_urls["broker_url"]).flushdb()
    s = make_stack(
        server_urls,
        tmp_path_factory.mktemp("e2e-events"),
        server_urls["broker_url"],
        {
            "LIFECYCLE_IDLE_TIMEOUT_SECONDS": "3",
            "LIFECYCLE_SWEEP_INTERVAL_SECONDS": "1",
            "LIFECYCLE_RELAY_INTERVAL_SECONDS": "0.5",
            "LIFECYCLE_WEBHOOK_ALLOW_PRIVATE": "true",
            "LIFECYCLE_WEBHOOK_RETRY_SECONDS": "[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5]",
            "LIFECYCLE_WEBHOOK_SWEEP_INTERVAL_SECONDS": "0.5",
            "LIFECYCLE_AUTO_ARCHIVE_AFTER_SECONDS": "2",
            "LIFECYCLE_AUTO_DELETE_AFTER_SECONDS": "2",
            "LIFECYCLE_RETENTION_INTERVAL_SECONDS": "1",
        },
    )
    s.start_api()
    s.start_worker()
    s.start_beat()
    try:
        yield s
    finally:
        s.stop_all()


def _events(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        page = client.get(f"/api/sessions/{sid}/events", params={"after": after}).json()
        if not page["events"]:
            return found
        found += page["events"]
        after = page["nextAfter"]


def test_a_whole_life_arrives_once_signed_through_a_failing_receiver(
    lively: Stack, caller: Caller
) -> None:
    rx = Receiver([500] * 5)
    try:
        with lively.client(caller) as client:
            hook = client.post("/api/webhooks", json={"url": rx.url})
            assert hook.status_code == 201, hook.text
            secret = hook.json()["secret"]
            sid = create(client)["id"]
            wait_state(client, sid, "active")
            # Idle for 3 s: hibernated by the sweep; untouched 2 s: archived; 2 s later
            # emptied. Follow the feed (long-poll) until the last of them.
            seen: list[dict[str, Any]] = []

            def deleted() -> bool:
                after = seen[-1]["id"] if seen else 0
                page = client.get("/api/events", params={"after": after, "wait": 5}).json()
                seen.extend(page["events"])
                return any(e["type"] == "sweep.auto_delete" for e in seen)

            wait_until(deleted, timeout=180, what="the session to be auto-deleted")
            life = _events(client, sid)
            assert [e["id"] for e in life] == [e["id"] for e in seen if e["sessionId"] == sid]
            ids = {str(e["id"]) for e in life}

            def all_delivered() -> bool:
                return ids <= {r["headers"]["webhook-id"] for r in rx.received}

            wait_until(all_delivered, timeout=180, what="every event to reach the receiver")
            deliveries = client.get(
                f"/api/webhooks/{hook.json()['webhook']['id']}/deliveries", params={"limit": 100}
            ).json()["deliveries"]
    finally:
        rx.close()
    types = [e["type"] for e in life]
    for wanted in (
        "session.created",
        "session.active",
        "sweep.hibernate",
        "session.hibernated",
        "sweep.auto_archive",
        "session.archived",
        "sweep.auto_delete",
    ):
        assert wanted in types, (wanted, types)
    reasons = {e["type"]: e["reason"] for e in life}
    assert reasons["session.hibernated"] == "idle for 3 s"
    assert reasons["session.archived"].startswith("auto-archive: hibernated and untouched")
    # Exactly once after deduplication; every request signed; the failures retried.
    received = [r for r in rx.received if r["headers"]["webhook-id"] in ids]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in received:
        by_id.setdefault(r["headers"]["webhook-id"], []).append(r)
        assert verify(secret, r["headers"], r["body"])
    assert set(by_id) == ids
    for event_id, copies in by_id.items():
        bodies = {json.loads(c["body"])["data"]["id"] for c in copies}
        assert bodies == {int(event_id)}
    assert len(rx.received) >= len(ids) + 5
    failed_attempts = sum(1 for d in deliveries for a in d["attemptLog"] if a["statusCode"] == 500)
    assert failed_attempts == 5
    print(
        f"\nevents of the session: {len(ids)}; requests: {len(received)}, of which"
        f" {failed_attempts} answered 500 and retried,"
        f" {len(received) - len(ids) - failed_attempts} redelivered after success;"
        f" distinct webhook-ids received: {len(by_id)}"
    )
