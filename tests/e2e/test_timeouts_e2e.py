"""Per-session timeouts, extend and stream claims with a real worker and beat."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.support.factories import Caller
from tests.support.processes import wait_until
from tests.support.servers import redis_db_url
from tests.support.stack import Stack, create, get, make_stack, running, wait_state

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def timed(server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Defaults far away (10 min idle, 5 h lifetime), a 1 s guard and a sweep every second:
    only what a session asks for itself can make it hibernate here."""
    s = make_stack(
        server_urls,
        tmp_path_factory.mktemp("e2e-timeouts"),
        redis_db_url(server_urls["broker_url"], 1),
        {
            "LIFECYCLE_IDLE_TIMEOUT_SECONDS": "600",
            "LIFECYCLE_HIBERNATE_GUARD_SECONDS": "1",
            "LIFECYCLE_SWEEP_INTERVAL_SECONDS": "1",
            "LIFECYCLE_RELAY_INTERVAL_SECONDS": "1",
        },
    )
    with running(s, beat=True):
        yield s


def test_own_idle_timeout_and_extend(timed: Stack, caller: Caller) -> None:
    with timed.client(caller) as client:
        quick = create(client, title="quick", idleTimeoutSeconds=5)["id"]
        default = create(client, title="default")["id"]
        short = create(client, title="short life", maxLifetimeSeconds=12)["id"]
        for sid in (quick, default, short):
            wait_state(client, sid, "active")
        original_expiry = datetime.fromisoformat(get(client, short)["sandboxExpiresAt"])
        r = client.post(f"/api/sessions/{short}/extend", json={"seconds": 600})
        assert r.status_code == 200, r.text
        assert r.json()["extendedBy"] == 600
        active_at = datetime.fromisoformat(get(client, quick)["lastActivityAt"])

        wait_until(
            lambda: get(client, quick)["lifecycleState"] == "hibernated",
            timeout=90,
            interval=0.5,
            what="the 5 s session to hibernate",
        )
        s_quick = get(client, quick)
        hibernated_at = datetime.fromisoformat(s_quick["updatedAt"])
        # Not before its own idle timeout passed.
        assert (hibernated_at - active_at).total_seconds() >= 5
        # Past the short session's original expiry (minus the guard), and a few sweeps on.
        while datetime.now(original_expiry.tzinfo) < original_expiry:
            time.sleep(0.5)
        time.sleep(3)
        assert get(client, short)["lifecycleState"] == "active"
        assert get(client, default)["lifecycleState"] == "active"


def _stream_url(client: Any, sid: str) -> str:
    chat = client.get(f"/api/sessions/{sid}/chats").json()["chats"][0]
    return f"/api/sessions/{sid}/chats/{chat['id']}/stream"


def test_a_dropped_stream_claim_expires_and_a_kept_one_holds(timed: Stack, caller: Caller) -> None:
    with timed.client(caller) as client:
        dropped = create(client, title="dropped", idleTimeoutSeconds=4)
        kept = create(client, title="kept", idleTimeoutSeconds=4)
        d_url, k_url = (_stream_url(client, s["id"]) for s in (dropped, kept))
        # Claimed before the sandboxes are even up: a turn may start at once.
        assert client.post(d_url, json={"streamId": "crashed", "ttlSeconds": 3}).status_code == 200
        assert client.post(k_url, json={"streamId": "alive", "ttlSeconds": 3}).status_code == 200
        for s in (dropped, kept):
            wait_state(client, s["id"], "active")
        client.post(k_url, json={"streamId": "alive", "ttlSeconds": 3})

        def dropped_hibernated() -> bool:
            # The kept turn renews its claim (its heartbeat); the dropped one never does.
            assert (
                client.post(k_url, json={"streamId": "alive", "ttlSeconds": 3}).status_code == 200
            )
            return get(client, dropped["id"])["lifecycleState"] == "hibernated"

        wait_until(dropped_hibernated, timeout=90, interval=0.5, what="the dropped claim to expire")
        for _ in range(6):
            assert (
                client.post(k_url, json={"streamId": "alive", "ttlSeconds": 3}).status_code == 200
            )
            time.sleep(1)
        assert get(client, kept["id"])["lifecycleState"] == "active"
