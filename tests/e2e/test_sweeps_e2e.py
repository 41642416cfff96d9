"""Scheduled sweeps with a real beat process: idle hibernation and the stuck-run reaper."""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import update

from tests.support.factories import Caller
from tests.support.processes import wait_until
from tests.support.servers import redis_db_url
from tests.support.stack import Stack, create, get, history, make_stack, running, wait_state
from worker.db.engine import get_sessionmaker
from worker.db.models import ChatRecord

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def swept(server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack with a few seconds of idle timeout, short leases and beat running."""
    s = make_stack(
        server_urls,
        tmp_path_factory.mktemp("e2e-sweeps"),
        redis_db_url(server_urls["broker_url"], 1),
        {
            "LIFECYCLE_IDLE_TIMEOUT_SECONDS": "4",
            "LIFECYCLE_SWEEP_INTERVAL_SECONDS": "1",
            "LIFECYCLE_REAP_INTERVAL_SECONDS": "1",
            "LIFECYCLE_RELAY_INTERVAL_SECONDS": "1",
            "LIFECYCLE_LEASE_SECONDS": "5",
        },
    )
    with running(s, beat=True):
        yield s


def test_idle_sessions_hibernate_by_the_sweep_alone(swept: Stack, caller: Caller) -> None:
    with swept.client(caller) as client:
        idle = create(client, title="idle")["id"]
        busy = create(client, title="busy")["id"]
        streaming = create(client, title="streaming")["id"]
        for sid in (idle, busy, streaming):
            wait_state(client, sid, "active")
        with get_sessionmaker().begin() as db:
            db.execute(
                update(ChatRecord)
                .where(ChatRecord.session_id == uuid.UUID(streaming))
                .values(active_stream_id="stream-1")
            )

        def idle_hibernated() -> bool:
            # Keep the busy one alive with the heartbeat while we wait.
            r = client.post(f"/api/sessions/{busy}/activity")
            assert r.status_code == 200
            return get(client, idle)["lifecycleState"] == "hibernated"

        wait_until(idle_hibernated, timeout=60, interval=0.5, what="the idle session to hibernate")
        # Two more idle timeouts with heartbeats (the sweep runs every second meanwhile):
        # the busy one stays active throughout.
        for _ in range(8):
            assert client.post(f"/api/sessions/{busy}/activity").status_code == 200
            assert get(client, busy)["lifecycleState"] == "active"
            time.sleep(1)
        s_idle = get(client, idle)
        assert s_idle["snapshotUrl"] and s_idle["lifecycleVersion"] == 3
        assert [r["trigger"] for r in history(client, idle) if r["kind"] == "hibernate"] == [
            "sweep"
        ]
        assert get(client, busy)["lifecycleState"] == "active"
        # The streaming session is past its idle deadline, yet never hibernated.
        streaming_now = get(client, streaming)
        assert streaming_now["lifecycleState"] == "active"
        assert not [
            r
            for r in history(client, streaming)
            if r["kind"] == "hibernate" and r["state"] == "succeeded"
        ]


def test_a_run_killed_mid_task_is_reaped_and_reaches_its_target(
    swept: Stack, caller: Caller
) -> None:
    # The first clone hangs long enough for us to kill the worker in the middle of it.
    swept.plan_faults({"sandbox.start_from_clone": [{"delay": 60}]})
    with swept.client(caller) as client:
        sid = create(client)["id"]

        def start_running() -> bool:
            return any(
                r["kind"] == "start" and r["state"] == "running" for r in history(client, sid)
            )

        wait_until(start_running, what="the start run to hold its lease")
        swept.stop("worker", signal.SIGKILL)  # the whole process group, no goodbye
        assert get(client, sid)["lifecycleRunId"] is not None  # the lease is left behind
        swept.start_worker()
        s = wait_state(client, sid, "active", timeout=120)
        runs = history(client, sid)
        starts = [r for r in runs if r["kind"] == "start"]
        assert [r["state"] for r in starts] == ["abandoned", "succeeded"]
        assert starts[1]["trigger"] == "reaper"
        assert s["lifecycleVersion"] == 2  # provision + start: the abandoned run moved nothing
        with httpx.Client(base_url=swept.base_url, headers=caller.headers) as c:
            assert c.get(f"/api/sessions/{sid}").json()["session"]["lifecycleError"] is None
