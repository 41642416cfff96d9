"""``lifecycle sessions``: the command line asks for runs under the same kick rules as the
API (``services.runs.request_run``) and shows sessions with the same read model."""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.support.api import assert_error, create
from tests.support.factories import Caller
from tests.support.processes import LIFECYCLE, ROOT
from tests.support.rows import row_counts, sql_exec
from worker.logging import redact_text
from worker.ops.cli import app


def _lifecycle(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _error(result: Any) -> str:
    """The error line (stderr's last; the first says which database was used)."""
    return str(result.stderr.strip().splitlines()[-1])


def _archive(client: TestClient, caller: Caller, sid: str) -> None:
    r = client.patch(f"/api/sessions/{sid}", headers=caller.headers, json={"status": "archived"})
    assert r.status_code == 200, r.text


def test_cli_refuses_to_kick_an_archived_session(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    _archive(client, caller, sid)
    before = row_counts()
    for kind in ("start", "hibernate", "snapshot", "diff"):
        result = _lifecycle("sessions", "kick", sid, kind)
        assert result.exit_code == 1, (kind, result.output)
        assert "Session is archived; set status to running to unarchive it first" in result.output
    assert row_counts() == before  # nothing recorded, nothing queued
    # As through the API: once un-archived, the same kick is accepted.
    r = client.patch(f"/api/sessions/{sid}", headers=caller.headers, json={"status": "running"})
    assert r.status_code == 200, r.text
    result = _lifecycle("sessions", "kick", sid, "start")
    assert result.exit_code == 0, result.output
    kicked = json.loads(result.stdout)
    runs = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers).json()["runs"]
    assert kicked["run"] in [run["id"] for run in runs]


def test_cli_hibernate_respects_a_live_stream_unless_forced(
    client: TestClient, caller: Caller
) -> None:
    created = create(client, caller)
    sid, cid = created["session"]["id"], created["chat"]["id"]
    r = client.post(
        f"/api/sessions/{sid}/chats/{cid}/stream",
        headers=caller.headers,
        json={"streamId": "turn-1", "ttlSeconds": 30},
    )
    assert r.status_code == 200, r.text
    before = row_counts()
    result = _lifecycle("sessions", "kick", sid, "hibernate")
    assert result.exit_code == 1, result.output
    assert "A chat is streaming (turn-1); hibernate with --force" in result.output
    assert row_counts() == before
    result = _lifecycle("sessions", "kick", sid, "hibernate", "--force")
    assert result.exit_code == 0, result.output
    run_id = json.loads(result.stdout)["run"]
    runs = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers).json()["runs"]
    assert [run["trigger"] for run in runs if run["id"] == run_id] == ["force"]


def test_cli_show_renders_the_api_read_model(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    result = _lifecycle("sessions", "show", sid)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    api_session = client.get(f"/api/sessions/{sid}", headers=caller.headers).json()["session"]
    api_runs = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers).json()["runs"]
    assert shown == {"session": api_session, "runs": api_runs}


# --------------------------------------------------------------------------- kicks


def _at_rest(sid: str, state: str) -> None:
    """The session's runs finished and it rests in ``state`` (as the worker leaves it)."""
    sql_exec(
        "UPDATE lifecycle_runs SET state = 'succeeded', finished_at = now() WHERE session_id = :id",
        id=sid,
    )
    sql_exec(
        "UPDATE sessions SET lifecycle_state = :state, lifecycle_version = 3,"
        " provisioned_at = now(), snapshot_url = 'file:///s.tar.zst' WHERE id = :id",
        id=sid,
        state=state,
    )


def test_cli_kick_answers_as_the_api(client: TestClient, caller: Caller) -> None:
    """The same rules as the API's kick endpoints (tests/integration/test_api_kicks.py),
    with the CLI's own way to start the sandbox in the refusal."""
    sid = create(client, caller)["session"]["id"]
    _at_rest(sid, "active")
    before = row_counts()
    result = _lifecycle("sessions", "kick", sid, "start")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {
        "run": None,
        "coalesced": False,
        "reason": "the sandbox is already running",
        "lifecycleState": "active",
    }
    assert row_counts() == before

    _at_rest(sid, "hibernated")
    result = _lifecycle("sessions", "kick", sid, "snapshot")
    assert result.exit_code == 1, result.output
    assert f"start the sandbox first: lifecycle sessions kick {sid} start" in result.stderr
    assert row_counts() == before


def test_cli_kick_archive_archives_as_the_api_patch_does(
    client: TestClient, caller: Caller
) -> None:
    """An archive run only goes while the status is archived (else the worker would skip
    it): the CLI's archive kick sets the status, as PATCH {"status": "archived"} does."""
    sid = create(client, caller)["session"]["id"]
    _at_rest(sid, "active")
    result = _lifecycle("sessions", "kick", sid, "archive")
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["coalesced"] is False and answer["run"] is not None
    session = client.get(f"/api/sessions/{sid}", headers=caller.headers).json()["session"]
    assert session["status"] == "archived"
    runs = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers).json()["runs"]
    assert [(r["id"], r["kind"], r["state"]) for r in runs][-1] == (
        answer["run"],
        "archive",
        "queued",
    )
    again = json.loads(_lifecycle("sessions", "kick", sid, "archive").stdout)
    assert again["run"] == answer["run"] and again["coalesced"] is True


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("args", "query"),
    [
        (["--status", "bogus"], {"status": "bogus"}),
        (["--limit", "0"], {"limit": "0"}),
        (["--limit", "101"], {"limit": "101"}),
    ],
)
def test_cli_list_refuses_what_the_api_refuses_with_its_message(
    client: TestClient, caller: Caller, args: list[str], query: dict[str, str]
) -> None:
    api = assert_error(client.get("/api/sessions", headers=caller.headers, params=query), 400)
    result = _lifecycle("sessions", "list", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {api['error']}"
    assert result.stdout == ""


def test_cli_list_refuses_an_unknown_state(client: TestClient, caller: Caller) -> None:
    result = _lifecycle("sessions", "list", "--state", "bogus")
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        "error: state must be one of provisioning, active, hibernating, hibernated, "
        "restoring, archived, failed"
    )


# --------------------------------------------------------------------------- ids


def test_ids_are_whole_or_a_unique_start(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    for given in (sid, sid[:8], sid[:13].replace("-", ""), sid.upper()[:6]):
        result = _lifecycle("sessions", "show", given)
        assert result.exit_code == 0, (given, result.output)
        assert json.loads(result.stdout)["session"]["id"] == sid
    result = _lifecycle("sessions", "list", "--account", str(caller.account_id)[:10], "--json")
    assert [s["id"] for s in json.loads(result.stdout)] == [sid]

    # Not found: no id starts with it (whole ids keep the API's message).
    other = "0" if sid[0] != "0" else "1"
    result = _lifecycle("sessions", "show", other * 8)
    assert result.exit_code == 1
    assert _error(result) == f"error: session not found: no session starts with {other * 8}"
    result = _lifecycle("sessions", "show", str(uuid.uuid4()))
    assert (result.exit_code, _error(result)) == (1, "error: Session not found")
    # Not an id at all.
    result = _lifecycle("sessions", "kick", "x'; --", "start")
    assert result.exit_code == 2
    assert "session must be a UUID or the start of one" in result.stderr


def test_an_ambiguous_prefix_lists_the_matches(client: TestClient, caller: Caller) -> None:
    ids = [f"abcdef00-0000-4000-8000-00000000000{i}" for i in range(1, 8)]
    for account_id in ids:
        sql_exec(
            "INSERT INTO accounts (id, name, kind) VALUES (:id, 'Twin', 'person')", id=account_id
        )
    before = row_counts()
    result = _lifecycle("keys", "create", "--account", "abcdef")
    assert result.exit_code == 2, result.output
    message = _error(result)
    assert message.startswith("error: account prefix abcdef is ambiguous: it matches ")
    assert all(i in message for i in ids[:5]) and ids[6] not in message and ", ..." in message
    assert row_counts() == before
    # Long enough to be unique: accepted.
    result = _lifecycle("keys", "create", "--account", ids[2][:-1] + "3", "--json")
    assert result.exit_code == 0, result.output
    key_id = json.loads(result.stdout)["id"]
    result = _lifecycle("keys", "revoke", key_id[:12])
    assert (result.exit_code, result.stdout.strip()) == (0, f"revoked {key_id}")


@pytest.mark.parametrize("columns", ["40", "60", "200"])
def test_tables_never_cut_ids(
    client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch, columns: str
) -> None:
    """Narrow or piped (CliRunner's output is not a terminal): the whole id is printed
    on one line, and a long title or error wraps instead."""
    sids = [
        create(client, caller, {"title": f"a rather long title number {i} " * 3})["session"]["id"]
        for i in range(3)
    ]
    monkeypatch.setenv("COLUMNS", columns)
    result = _lifecycle("sessions", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    for sid in sids:
        assert any(sid in line for line in lines), (sid, result.stdout)
        # the id printed can be given back
        shown = _lifecycle("sessions", "show", sid)
        assert shown.exit_code == 0
    assert max(len(line) for line in lines) <= int(columns)


def test_every_json_option_is_documented() -> None:
    import typer.main

    def walk(command: Any, path: str) -> Iterator[tuple[str, Any]]:
        for param in command.params:
            yield path, param
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    found = [
        (path, param.help)
        for path, param in walk(typer.main.get_command(app), "lifecycle")
        if "--json" in getattr(param, "opts", [])
    ]
    assert len(found) >= 3, found
    assert all(help_text for _, help_text in found), found


# --------------------------------------------------------------------------- the database


def _run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LIFECYCLE, *args], env=env, cwd=cwd, capture_output=True, text=True, check=False
    )


def _bare_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


ADMIN_COMMANDS = [
    ["accounts", "create", "--name", "Ada"],
    ["accounts", "limits", "--account", "abc", "--max-sessions", "3"],
    ["keys", "create", "--account", "abc"],
    ["keys", "revoke", "abc"],
    ["orgs", "add-member", "--org", "abc", "--account", "abd"],
    ["orgs", "remove-member", "--org", "abc", "--account", "abd"],
    ["sessions", "list"],
    ["sessions", "show", "abc"],
    ["sessions", "kick", "abc", "start"],
    ["sweep", "relay_outbox"],
    ["migrate"],
]


def test_with_no_database_anywhere_each_admin_command_says_what_to_do(tmp_path: Path) -> None:
    """No LIFECYCLE_DATABASE_URL and no `lifecycle up` from ./.lifecycle: one line, not
    a traceback, and never the settings' built-in test database."""
    for args in ADMIN_COMMANDS:
        result = _run_cli(*args, env=_bare_env(), cwd=tmp_path)
        assert result.returncode == 1, (args, result.stdout, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, (args, result.stderr)
        assert lines[0] == (
            "error: no database: LIFECYCLE_DATABASE_URL is not set and no `lifecycle up` has "
            f"run from {tmp_path / '.lifecycle'} (no {tmp_path / '.lifecycle' / 'stack.json'}); "
            "start it with make run, or set LIFECYCLE_DATABASE_URL"
        )
        assert result.stdout == ""


def test_a_stack_that_is_gone_is_named_with_the_fix(tmp_path: Path) -> None:
    from worker.ops.embedded import find_free_port
    from worker.ops.target import StackFile, write_stack_file

    data = tmp_path / "data"
    data.mkdir()
    port = find_free_port()
    write_stack_file(
        data,
        StackFile(
            f"postgresql+psycopg://postgres:hunter2@127.0.0.1:{port}/lifecycle",
            f"redis://127.0.0.1:{port}/0",
            "http://127.0.0.1:1",
            pid=2**22 + 1,  # above the default pid_max: never a live process
        ),
    )
    for args in (["sessions", "list"], ["accounts", "create", "--name", "Ada"]):
        result = _run_cli(*args, "--data-dir", str(data), env=_bare_env(), cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        said, error = result.stderr.strip().splitlines()
        url = f"postgresql+psycopg://postgres:[REDACTED]@127.0.0.1:{port}/lifecycle"
        assert said == f"using the database at {url} (the `lifecycle up` stack in {data})"
        assert error.startswith(
            f"error: cannot reach the database at {url}: the `lifecycle up` stack that used "
            f"it (pid {2**22 + 1}) is not running; start it with make run, or set "
            "LIFECYCLE_DATABASE_URL ("
        )
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_a_database_without_the_schema_says_run_migrate(
    server_urls: dict[str, str], tmp_path: Path
) -> None:
    from tests.support import servers

    name = f"lifecycle_noschema_{uuid.uuid4().hex[:8]}"
    url = servers.create_fresh_database(server_urls["admin_url"], name)
    try:
        env = {**_bare_env(), "LIFECYCLE_DATABASE_URL": url}
        result = _run_cli("accounts", "create", "--name", "Ada", env=env, cwd=tmp_path)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert (
            lines[0].startswith("using the database at ") and "(LIFECYCLE_DATABASE_URL)" in lines[0]
        )
        assert lines[1:] == [
            f"error: the database at {redact_text(url)} has no schema: run lifecycle migrate"
        ]
        # ... and following the advice works.
        assert _run_cli("migrate", env=env, cwd=tmp_path).returncode == 0
        result = _run_cli("accounts", "create", "--name", "Ada", env=env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        uuid.UUID(result.stdout.strip())
    finally:
        servers.drop_database(server_urls["admin_url"], name)
