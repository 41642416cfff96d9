"""POST/GET /api/sessions/{id}/commands, …/{cid}, …/{cid}/kill: the contract.

The API records a command and its job (routed to the host holding the sandbox) and
answers 202; the worker side is covered end to end in tests/e2e/test_commands_e2e.py.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create, new_uuid
from tests.support.commands import HOST_QUEUE, activate
from tests.support.factories import Caller, make_caller
from tests.support.rows import sql, sql_exec


@pytest.fixture
def active(client: TestClient, caller: Caller) -> str:
    sid: str = create(client, caller)["session"]["id"]
    activate(sid)
    return sid


def _post(client: TestClient, caller: Caller, sid: str, body: Any) -> Any:
    return client.post(f"/api/sessions/{sid}/commands", headers=caller.headers, json=body)


def test_a_command_is_recorded_and_sent_to_the_sandbox_host(
    client: TestClient, caller: Caller, active: str
) -> None:
    before = sql("SELECT hibernate_after FROM sessions WHERE id = :id", id=active)[0][0]
    r = _post(
        client,
        caller,
        active,
        {
            "argv": ["echo", "hi"],
            "cwd": "src",
            "env": {"TOKEN": "caller-secret"},
            "timeoutSeconds": 5,
        },
    )
    assert r.status_code == 202, r.text
    cmd = r.json()["command"]
    assert cmd["status"] == "queued" and cmd["argv"] == ["echo", "hi"]
    assert cmd["cwd"] == "/workspace/src" and cmd["timeoutSeconds"] == 5
    assert cmd["envNames"] == ["TOKEN"] and "caller-secret" not in r.text
    assert cmd["sessionId"] == active and cmd["exitCode"] is None
    # Its job, in the outbox of the same transaction, goes to the sandbox's host queue.
    (task, payload, queue), *_ = sql(
        "SELECT task_name, payload, queue FROM outbox ORDER BY id DESC LIMIT 1"
    )
    assert task == "sandbox.command" and queue == HOST_QUEUE
    assert payload["kwargs"] == {"command_id": cmd["id"]}
    # A command is activity: the idle deadline moved.
    after = sql("SELECT hibernate_after FROM sessions WHERE id = :id", id=active)[0][0]
    assert after > before

    got = client.get(f"/api/sessions/{active}/commands/{cmd['id']}", headers=caller.headers)
    assert got.status_code == 200 and got.json()["command"]["id"] == cmd["id"]
    assert got.json()["command"]["stdout"] == ""


def test_cmd_runs_through_the_shell(client: TestClient, caller: Caller, active: str) -> None:
    r = _post(client, caller, active, {"cmd": "echo $HOME | wc -c", "stdin": "x"})
    assert r.status_code == 202, r.text
    assert r.json()["command"]["argv"] == ["/bin/sh", "-c", "echo $HOME | wc -c"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "argv"),
        ({"argv": ["a"], "cmd": "a"}, "argv"),
        ({"argv": []}, "argv"),
        ({"argv": "echo hi"}, "argv"),
        ({"argv": ["echo", 1]}, "argv"),
        ({"argv": ["echo", "nul\x00"]}, "argv"),
        ({"argv": [""]}, "argv"),
        ({"cmd": 5}, "cmd"),
        ({"argv": ["x"], "cwd": "../etc"}, "cwd"),
        ({"argv": ["x"], "cwd": "/etc"}, "cwd"),
        ({"argv": ["x"], "cwd": "a/../../b"}, "cwd"),
        ({"argv": ["x"], "env": {"BAD-NAME": "x"}}, "env"),
        ({"argv": ["x"], "env": {"OK": 1}}, "env"),
        ({"argv": ["x"], "env": ["A=1"]}, "env"),
        ({"argv": ["x"], "timeoutSeconds": 0}, "timeoutSeconds"),
        ({"argv": ["x"], "timeoutSeconds": -1}, "timeoutSeconds"),
        ({"argv": ["x"], "timeoutSeconds": 10**9}, "timeoutSeconds"),
        ({"argv": ["x"], "timeoutSeconds": "5"}, "timeoutSeconds"),
        ({"argv": ["x"], "timeoutSeconds": True}, "timeoutSeconds"),
        ({"argv": ["x"], "stdin": "y" * 40_000}, "stdin"),  # over 32 KiB, under the body limit
        ({"argv": ["x"], "detached": "yes"}, "detached"),
    ],
)
def test_bad_requests_are_400_and_write_nothing(
    client: TestClient, caller: Caller, active: str, body: dict[str, Any], field: str
) -> None:
    r = _post(client, caller, active, body)
    err = assert_error(r, 400, case=body)
    assert field in err["missing_fields"], err
    assert sql("SELECT count(*) FROM commands")[0][0] == 0


def test_a_session_that_is_not_active_is_409_with_how_to_resume(
    client: TestClient, caller: Caller
) -> None:
    sid = create(client, caller)["session"]["id"]  # still provisioning
    err = assert_error(_post(client, caller, sid, {"argv": ["true"]}), 409)
    assert err["lifecycleState"] == "provisioning"
    assert err["resume"] == f"/api/sessions/{sid}/sandbox"
    activate(sid)
    sql_exec("UPDATE sessions SET lifecycle_state = 'hibernated' WHERE id = :id", id=sid)
    err = assert_error(_post(client, caller, sid, {"argv": ["true"]}), 409)
    assert err["lifecycleState"] == "hibernated" and "resume" in err["error"]
    assert "autoResume" in err["error"]
    assert sql("SELECT count(*) FROM commands")[0][0] == 0
    # On an active session autoResume changes nothing: queued at once, one job.
    activate(sid)
    r = _post(client, caller, sid, {"argv": ["true"], "autoResume": True})
    assert r.status_code == 202 and r.json()["command"]["status"] == "queued"
    assert sql("SELECT count(*) FROM lifecycle_runs WHERE kind = 'start'")[0][0] == 0


def test_a_plain_directory_sandbox_says_what_to_install(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    activate(sid, sandbox_type="local")
    err = assert_error(_post(client, caller, sid, {"argv": ["true"]}), 409)
    assert "apt-get install -y bubblewrap" in err["error"]


def test_auth_and_access(client: TestClient, caller: Caller, active: str) -> None:
    url = f"/api/sessions/{active}/commands"
    assert_error(client.post(url, json={"argv": ["true"]}), 401)
    assert_error(client.get(url), 401)
    stranger = make_caller("Eve")
    assert_error(client.post(url, headers=stranger.headers, json={"argv": ["true"]}), 403)
    assert_error(client.get(url, headers=stranger.headers), 403)
    assert_error(_post(client, caller, new_uuid(), {"argv": ["true"]}), 404)
    assert_error(_post(client, caller, "not-a-uuid", {"argv": ["true"]}), 404)
    assert_error(client.get(f"{url}/{new_uuid()}", headers=caller.headers), 404)
    assert_error(client.get(f"{url}/nope", headers=caller.headers), 404)
    assert_error(client.post(f"{url}/{new_uuid()}/kill", headers=caller.headers), 404)
    # A command of another session is not found through this one.
    other = create(client, caller)["session"]["id"]
    activate(other)
    cid = _post(client, caller, other, {"argv": ["true"]}).json()["command"]["id"]
    assert_error(client.get(f"{url}/{cid}", headers=caller.headers), 404)


def test_list_pages_newest_first(client: TestClient, caller: Caller, active: str) -> None:
    ids = [
        _post(client, caller, active, {"argv": ["echo", str(i)]}).json()["command"]["id"]
        for i in range(5)
    ]
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        r = client.get(f"/api/sessions/{active}/commands", headers=caller.headers, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert all("stdout" not in c for c in page["commands"])
        seen += [c["id"] for c in page["commands"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    bad = client.get(
        f"/api/sessions/{active}/commands", headers=caller.headers, params={"limit": "0"}
    )
    assert_error(bad, 400)


def test_killing_a_queued_command_ends_it_and_a_worker_then_skips_it(
    client: TestClient, caller: Caller, active: str, svc: Any
) -> None:
    from worker.services import commands

    cid = _post(client, caller, active, {"argv": ["sleep", "100"]}).json()["command"]["id"]
    r = client.post(f"/api/sessions/{active}/commands/{cid}/kill", headers=caller.headers)
    assert r.status_code == 202, r.text
    cmd = r.json()["command"]
    assert cmd["status"] == "killed" and cmd["killedBy"] == "request" and cmd["finishedAt"]
    skipped = commands.execute(svc.factory, svc.settings, svc.providers, uuid.UUID(cid), "h")
    assert skipped == "skipped"


def test_processes_lists_what_still_runs_or_waits(
    client: TestClient, caller: Caller, active: str
) -> None:
    ids = [
        _post(client, caller, active, body).json()["command"]["id"]
        for body in (
            {"cmd": "exec python3 -m http.server", "detached": True},
            {"argv": ["sleep", "5"]},
            {"argv": ["true"]},
        )
    ]
    sql_exec("UPDATE commands SET status = 'running' WHERE id = :id", id=ids[0])
    sql_exec("UPDATE commands SET status = 'exited', exit_code = 0 WHERE id = :id", id=ids[2])
    r = client.get(f"/api/sessions/{active}/processes", headers=caller.headers)
    assert r.status_code == 200, r.text
    procs = r.json()["processes"]
    assert [p["id"] for p in procs] == ids[:2]
    assert procs[0]["detached"] is True and procs[0]["status"] == "running"
    assert all("stdout" not in p for p in procs)
    assert_error(client.get(f"/api/sessions/{active}/processes"), 401)
    eve = make_caller("Eve")
    assert_error(client.get(f"/api/sessions/{active}/processes", headers=eve.headers), 403)
