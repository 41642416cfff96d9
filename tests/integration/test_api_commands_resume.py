"""``autoResume``: a command on a session that is not active waits for the start it asks
for (through the one kick entry, under the quota) and goes to the sandbox's host once
the start has recorded the session active; a failed start fails it. The lifecycle runs
are delivered in-process (``svc``); the worker side of the command is covered end to
end in tests/e2e/test_commands_e2e.py."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error
from tests.support.drains import drain
from tests.support.events import session_for
from tests.support.factories import Caller
from tests.support.rows import sql, sql_exec
from worker.db.engine import get_sessionmaker
from worker.services import quotas
from worker.services.command_reaper import reap_commands
from worker.services.lifecycle import LifecycleService


def _post(client: TestClient, caller: Caller, sid: str, body: Any) -> Any:
    return client.post(f"/api/sessions/{sid}/commands", headers=caller.headers, json=body)


def _hibernated(client: TestClient, caller: Caller, svc: LifecycleService) -> str:
    """A session that started and hibernated, its resting state saying a bwrap host held
    it (the in-process service runs the plain directory provider)."""
    sid = session_for(client, caller, svc)
    drain(svc, uuid.UUID(sid))  # provision, start
    r = client.post(f"/api/sessions/{sid}/hibernate", headers=caller.headers)
    assert r.status_code == 202, r.text
    drain(svc, uuid.UUID(sid))
    sql_exec(
        "UPDATE sessions SET sandbox_state = jsonb_set(sandbox_state, '{type}', '\"bwrap\"')"
        " WHERE id = :id",
        id=sid,
    )
    assert _state(sid) == "hibernated"
    return sid


def _state(sid: str) -> str:
    return str(sql("SELECT lifecycle_state FROM sessions WHERE id = :id", id=sid)[0][0])


def _command(cid: str) -> dict[str, Any]:
    row = sql("SELECT status, error, env FROM commands WHERE id = :id", id=cid)[0]
    return {"status": row[0], "error": row[1], "env": row[2]}


def _command_jobs(cid: str) -> list[tuple[str, str]]:
    return [
        (task, queue)
        for task, queue in sql(
            "SELECT task_name, queue FROM outbox WHERE payload->'kwargs'->>'command_id' = :c",
            c=cid,
        )
    ]


def test_without_auto_resume_it_is_409_saying_how_to_resume(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = _hibernated(client, caller, svc)
    err = assert_error(_post(client, caller, sid, {"argv": ["true"]}), 409)
    assert err["lifecycleState"] == "hibernated"
    assert err["resume"] == f"/api/sessions/{sid}/sandbox" and "autoResume" in err["error"]
    err = assert_error(_post(client, caller, sid, {"argv": ["true"], "autoResume": "yes"}), 400)
    assert err["missing_fields"] == ["autoResume"]
    assert sql("SELECT count(*) FROM commands")[0][0] == 0
    assert sql("SELECT count(*) FROM lifecycle_runs WHERE state = 'queued'")[0][0] == 0


def test_the_command_waits_for_the_start_it_asked_for_then_goes_to_the_sandbox_host(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = _hibernated(client, caller, svc)
    r = _post(
        client, caller, sid, {"argv": ["cat", "kept.txt"], "env": {"K": "v"}, "autoResume": True}
    )
    assert r.status_code == 202, r.text
    cmd = r.json()["command"]
    assert cmd["status"] == "waiting" and cmd["host"] is None
    # One start kick, through the kick entry (the kick's event says so), and no command
    # job yet: nothing may reach a host before the sandbox is active.
    ((kind, trigger, state),) = sql(
        "SELECT kind, trigger, state FROM lifecycle_runs WHERE session_id = :s"
        " AND state NOT IN ('succeeded', 'skipped') ORDER BY created_at",
        s=sid,
    )
    assert (kind, trigger, state) == ("start", "command", "queued")
    assert (
        sql(
            "SELECT count(*) FROM events WHERE session_id = :s AND type = 'session.kicked'"
            " AND data->>'kind' = 'start'",
            s=sid,
        )[0][0]
        == 1
    )
    assert _command_jobs(cmd["id"]) == []
    # A second command joins the same start.
    second = _post(client, caller, sid, {"cmd": "true", "autoResume": True}).json()["command"]
    assert second["status"] == "waiting"
    assert (
        sql(
            "SELECT count(*) FROM lifecycle_runs WHERE session_id = :s AND kind = 'start'"
            " AND state = 'queued'",
            s=sid,
        )[0][0]
        == 1
    )
    procs = client.get(f"/api/sessions/{sid}/processes", headers=caller.headers).json()
    assert [p["status"] for p in procs["processes"]] == ["waiting", "waiting"]

    drain(svc, uuid.UUID(sid))  # the start: its record sends the waiting commands
    assert _state(sid) == "active"
    host_queue = sql("SELECT sandbox_state->>'queue' FROM sessions WHERE id = :id", id=sid)[0][0]
    assert host_queue == svc.queue
    for c in (cmd, second):
        assert _command(c["id"])["status"] == "queued"
        assert _command_jobs(c["id"]) == [("sandbox.command", host_queue)]
    # Oldest first.
    order = [
        row[0]
        for row in sql(
            "SELECT payload->'kwargs'->>'command_id' FROM outbox"
            " WHERE task_name = 'sandbox.command' ORDER BY id"
        )
    ]
    assert order == [cmd["id"], second["id"]]


def test_a_start_that_fails_fails_its_waiting_commands_with_its_error(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = _hibernated(client, caller, svc)
    cid = _post(
        client, caller, sid, {"argv": ["true"], "env": {"SECRET": "s3cret"}, "autoResume": True}
    ).json()["command"]["id"]
    # Nothing to start from: the start fails for good.
    sql_exec("UPDATE sessions SET snapshot_url = NULL, clone_url = NULL WHERE id = :id", id=sid)
    drain(svc, uuid.UUID(sid))
    assert _state(sid) == "failed"
    got = client.get(f"/api/sessions/{sid}/commands/{cid}", headers=caller.headers)
    command = got.json()["command"]
    assert command["status"] == "failed" and command["finishedAt"]
    assert command["error"] == (
        "the sandbox did not start: the session has no clone URL or branch recorded"
    )
    assert _command(cid)["env"] == {"SECRET": None}  # the value went with the end
    assert _command_jobs(cid) == []


def test_a_waiting_command_can_be_killed_and_is_then_never_sent(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = _hibernated(client, caller, svc)
    cid = _post(client, caller, sid, {"argv": ["true"], "autoResume": True}).json()["command"]
    r = client.post(f"/api/sessions/{sid}/commands/{cid['id']}/kill", headers=caller.headers)
    assert r.status_code == 202 and r.json()["command"]["status"] == "killed"
    drain(svc, uuid.UUID(sid))
    assert _state(sid) == "active"
    assert _command(cid["id"])["status"] == "killed" and _command_jobs(cid["id"]) == []


def test_auto_resume_is_a_start_under_the_sandbox_quota(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = _hibernated(client, caller, svc)
    other = session_for(client, caller, svc)  # provisioning: holds a sandbox
    with get_sessionmaker().begin() as db:
        quotas.set_limits(db, caller.account_id, active_sandboxes=1, sessions=None)
    err = assert_error(_post(client, caller, sid, {"argv": ["true"], "autoResume": True}), 429)
    assert err["limit"] == 1 and err["current"] == 1
    assert sql("SELECT count(*) FROM commands")[0][0] == 0
    assert other


@pytest.mark.parametrize("state", ["archived"])
def test_an_archived_session_refuses_even_with_auto_resume(
    client: TestClient, caller: Caller, svc: LifecycleService, state: str
) -> None:
    sid = _hibernated(client, caller, svc)
    sql_exec(
        "UPDATE sessions SET lifecycle_state = :st, status = 'archived' WHERE id = :id",
        st=state,
        id=sid,
    )
    err = assert_error(_post(client, caller, sid, {"argv": ["true"], "autoResume": True}), 409)
    assert "archived" in err["error"]
    assert sql("SELECT count(*) FROM commands")[0][0] == 0


def test_a_command_left_waiting_by_a_start_that_never_came_is_reaped(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = _hibernated(client, caller, svc)
    cid = _post(client, caller, sid, {"argv": ["true"], "autoResume": True}).json()["command"]
    young = _post(client, caller, sid, {"argv": ["true"], "autoResume": True}).json()["command"]
    assert reap_commands(svc)["waiting_orphans"] == 0  # its start is still open
    # The start ends without starting anything (skipped, as when archived meanwhile).
    sql_exec(
        "UPDATE lifecycle_runs SET state = 'skipped', finished_at = now()"
        " WHERE session_id = :s AND state = 'queued'",
        s=sid,
    )
    sql_exec(
        "UPDATE commands SET created_at = now() - interval '1 hour' WHERE id = :id", id=cid["id"]
    )
    assert reap_commands(svc)["waiting_orphans"] == 1
    row = _command(cid["id"])
    assert row["status"] == "failed"
    assert row["error"] == "the sandbox it waited for did not start (the session is hibernated)"
    assert _command(young["id"])["status"] == "waiting"  # within the grace
