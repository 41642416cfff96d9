"""``lifecycle sessions``: the command line asks for runs under the same kick rules as the
API (``services.runs.request_run``) and shows sessions with the same read model."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from tests.support.api import create
from tests.support.factories import Caller
from tests.support.rows import row_counts
from worker.ops.cli import app


def _lifecycle(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


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
    kicked = json.loads(result.output)
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
    run_id = json.loads(result.output)["run"]
    runs = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers).json()["runs"]
    assert [run["trigger"] for run in runs if run["id"] == run_id] == ["force"]


def test_cli_show_renders_the_api_read_model(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    result = _lifecycle("sessions", "show", sid)
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    api_session = client.get(f"/api/sessions/{sid}", headers=caller.headers).json()["session"]
    api_runs = client.get(f"/api/sessions/{sid}/runs", headers=caller.headers).json()["runs"]
    assert shown == {"session": api_session, "runs": api_runs}
