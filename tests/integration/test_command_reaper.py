"""Commands whose worker is gone are ended ``failed`` with the reason, by a sweep.

Rows are made through the API and put in the state a dead worker leaves them in; the
host is declared lost by the real ``lost_hosts`` sweep; the streamed output of a reaped
command then ends with its ``exit`` event instead of waiting forever.
"""

from __future__ import annotations

from typing import Any

from fastapi.testclient import TestClient

from tests.support.api import create
from tests.support.commands import activate
from tests.support.factories import Caller
from tests.support.rows import sql, sql_exec
from tests.support.sse import parse_sse
from worker.routing import host_queue
from worker.services import hosts
from worker.services.command_reaper import reap_commands


def _command(client: TestClient, caller: Caller, sid: str, **body: Any) -> str:
    r = client.post(
        f"/api/sessions/{sid}/commands",
        headers=caller.headers,
        json={"argv": ["sleep", "1000"], "env": {"TOKEN": "v"}, **body},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["command"]["id"])


def _running(cid: str, host: str, started_ago: float = 0) -> None:
    sql_exec(
        "UPDATE commands SET status = 'running', host = :h,"
        " started_at = now() - make_interval(secs => :ago) WHERE id = :id",
        h=host,
        ago=started_ago,
        id=cid,
    )


def _row(cid: str) -> dict[str, Any]:
    status, error, env, finished = sql(
        "SELECT status, error, env, finished_at FROM commands WHERE id = :id", id=cid
    )[0]
    return {"status": status, "error": error, "env": env, "finished": finished}


def test_commands_of_a_lost_host_end_failed_and_their_stream_ends(
    client: TestClient, caller: Caller, svc: Any
) -> None:
    sid = create(client, caller)["session"]["id"]
    activate(sid)
    on_ghost = _command(client, caller, sid, timeoutSeconds=600)
    on_alive = _command(client, caller, sid, timeoutSeconds=600)
    _running(on_ghost, "ghost-host")
    _running(on_alive, "alive-host")
    with svc.factory.begin() as db:
        hosts.beat(db, "ghost-host", host_queue("ghost-host"))
        hosts.beat(db, "alive-host", host_queue("alive-host"))
    # ghost-host falls silent and the lost_hosts sweep declares it lost.
    sql_exec(
        "UPDATE worker_hosts SET last_beat_at = now() - interval '1 hour'"
        " WHERE hostname = 'ghost-host'"
    )
    assert hosts.recover_lost_hosts(svc)["lost"] == 1

    result = reap_commands(svc)
    assert result["lost_host"] == 1 and result["past_deadline"] == 0
    ghost = _row(on_ghost)
    assert ghost["status"] == "failed" and ghost["finished"] is not None
    assert ghost["error"] == "its worker host ghost-host was lost while it ran"
    assert ghost["env"] == {"TOKEN": None}  # the value is gone, the name stays
    assert _row(on_alive)["status"] == "running"

    # A client streaming the lost command's output gets its end.
    r = client.get(f"/api/sessions/{sid}/commands/{on_ghost}/output", headers=caller.headers)
    (exit_event,) = parse_sse(r.text)
    assert exit_event["event"] == "exit" and exit_event["data"]["status"] == "failed"
    assert reap_commands(svc)["lost_host"] == 0  # done once


def test_running_past_wall_time_and_grace_is_ended(
    client: TestClient, caller: Caller, svc: Any
) -> None:
    sid = create(client, caller)["session"]["id"]
    activate(sid)
    grace = svc.settings.command_reap_grace_seconds
    overdue = _command(client, caller, sid, timeoutSeconds=5)
    in_grace = _command(client, caller, sid, timeoutSeconds=5)
    _running(overdue, "h1", started_ago=5 + grace + 1)
    _running(in_grace, "h1", started_ago=5 + grace - 30)
    assert reap_commands(svc)["past_deadline"] == 1
    row = _row(overdue)
    assert row["status"] == "failed" and "after its wall time of 5" in row["error"]
    assert "worker was lost" in row["error"]
    assert _row(in_grace)["status"] == "running"


def test_queued_commands_of_a_stopped_sandbox_are_ended(
    client: TestClient, caller: Caller, svc: Any
) -> None:
    stopped = create(client, caller)["session"]["id"]
    live = create(client, caller)["session"]["id"]
    activate(stopped)
    activate(live)
    old_stopped = _command(client, caller, stopped)
    new_stopped = _command(client, caller, stopped)
    old_live = _command(client, caller, live)
    sql_exec("UPDATE sessions SET lifecycle_state = 'hibernated' WHERE id = :id", id=stopped)
    sql_exec(
        "UPDATE commands SET created_at = now() - interval '1 hour' WHERE id IN (:a, :b)",
        a=old_stopped,
        b=old_live,
    )
    assert reap_commands(svc)["queued_orphans"] == 1
    row = _row(old_stopped)
    assert row["status"] == "failed"
    assert row["error"] == "its sandbox stopped (hibernated) before any worker ran it"
    assert _row(new_stopped)["status"] == "queued"  # its worker may still be on its way
    assert _row(old_live)["status"] == "queued"


def test_file_operations_nobody_waits_for_are_purged(
    client: TestClient, caller: Caller, svc: Any
) -> None:
    sid = create(client, caller)["session"]["id"]
    for age in ("2 hours", "1 minute"):
        sql_exec(
            "INSERT INTO file_ops (id, session_id, op, path, status, created_at)"
            f" VALUES (gen_random_uuid(), :sid, 'read', 'x', 'done', now() - interval '{age}')",
            sid=sid,
        )
    assert reap_commands(svc)["file_ops_purged"] == 1
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 1
