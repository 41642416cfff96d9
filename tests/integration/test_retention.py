"""Retention with the real local providers: a hibernated session left untouched is
archived through the normal archive run, an archived one past its time loses its
snapshots and sandbox data (the row, history and events stay), each with an event and
its reason; nothing else is touched."""

from __future__ import annotations

import uuid
from pathlib import Path

from fastapi.testclient import TestClient

from tests.support.api import assert_error
from tests.support.drains import drain
from tests.support.events import events_of, session_for
from tests.support.factories import Caller
from tests.support.rows import sql, sql_exec
from worker.services import retention
from worker.services.lifecycle import LifecycleService


def _hibernate(client: TestClient, caller: Caller, svc: LifecycleService, sid: str) -> None:
    drain(svc, uuid.UUID(sid))
    assert client.post(f"/api/sessions/{sid}/hibernate", headers=caller.headers).status_code == 202
    drain(svc, uuid.UUID(sid))


def _snapshots(svc: LifecycleService, sid: str) -> list[Path]:
    return sorted(svc.settings.snapshots_dir.rglob(f"{sid}-*"))


def test_auto_archive_then_auto_delete(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    kept = session_for(client, caller, svc, autoArchiveAfterSeconds=60, autoDeleteAfterSeconds=120)
    r = client.get(f"/api/sessions/{kept}", headers=caller.headers).json()["session"]
    assert r["autoArchiveAfterSeconds"] == 60 and r["autoDeleteAfterSeconds"] == 120
    bystander = session_for(client, caller, svc)  # the operator's default: never
    active = session_for(client, caller, svc, autoArchiveAfterSeconds=60)
    for sid in (kept, bystander):
        _hibernate(client, caller, svc, sid)
    drain(svc, uuid.UUID(active))
    # Nothing is due yet.
    assert retention.sweep(svc) == {"archived": 0, "deleted": 0}
    sql_exec("UPDATE sessions SET updated_at = now() - interval '61 s'")
    assert retention.sweep(svc) == {"archived": 1, "deleted": 0}
    drain(svc, uuid.UUID(kept))
    s = client.get(f"/api/sessions/{kept}", headers=caller.headers).json()["session"]
    assert s["lifecycleState"] == "archived" and s["status"] == "archived" and s["snapshotUrl"]
    assert _snapshots(svc, kept)
    found = events_of(client, caller, kept)
    queued = [e for e in found if e["type"] == "sweep.auto_archive"]
    archived = [e for e in found if e["type"] == "session.archived"]
    assert len(queued) == 1 and len(archived) == 1
    assert queued[0]["reason"] == archived[0]["reason"]
    assert archived[0]["reason"].startswith("auto-archive: hibernated and untouched for 6")
    assert archived[0]["reason"].endswith("s (limit 60 s)")
    run = sql(
        "SELECT trigger, state FROM lifecycle_runs WHERE session_id = :id AND kind = 'archive'",
        id=kept,
    )
    assert [tuple(r) for r in run] == [("retention", "succeeded")]

    # Archived for 121 s: emptied.
    sql_exec("UPDATE sessions SET archived_at = now() - interval '121 s' WHERE id = :id", id=kept)
    others = {sid: _snapshots(svc, sid) for sid in (bystander, active)}
    assert retention.sweep(svc) == {"archived": 0, "deleted": 1}
    s = client.get(f"/api/sessions/{kept}", headers=caller.headers).json()["session"]
    assert s["snapshotUrl"] is None and s["cachedDiff"] is None and s["deletedAt"]
    assert s["sandboxState"] == {"type": "local", "deleted": True}
    # The row, its branch, history, chats and events remain.
    assert s["branch"] == f"session/{kept}" and s["title"]
    assert client.get(f"/api/sessions/{kept}/runs", headers=caller.headers).json()["runs"]
    assert client.get(f"/api/sessions/{kept}/chats", headers=caller.headers).json()["chats"]
    assert _snapshots(svc, kept) == []
    deleted = [e for e in events_of(client, caller, kept) if e["type"] == "sweep.auto_delete"]
    assert len(deleted) == 1
    assert deleted[0]["reason"].startswith("auto-delete: archived for 12")
    assert "(limit 120 s); its snapshots and sandbox data deleted" in deleted[0]["reason"]
    # Nothing else was touched: the bystander (no retention) keeps its snapshot, the
    # active one its sandbox.
    assert {sid: _snapshots(svc, sid) for sid in others} == others
    for sid, state in ((bystander, "hibernated"), (active, "active")):
        got = client.get(f"/api/sessions/{sid}", headers=caller.headers).json()["session"]
        assert got["lifecycleState"] == state and got["deletedAt"] is None
    # Running again does nothing more.
    assert retention.sweep(svc) == {"archived": 0, "deleted": 0}
    # Un-archiving an emptied session: hibernated without a snapshot; a start clones afresh.
    r = client.patch(f"/api/sessions/{kept}", json={"status": "running"}, headers=caller.headers)
    assert r.json()["session"]["lifecycleState"] == "hibernated"
    assert client.post(f"/api/sessions/{kept}/sandbox", headers=caller.headers).status_code == 202
    drain(svc, uuid.UUID(kept))
    s = client.get(f"/api/sessions/{kept}", headers=caller.headers).json()["session"]
    assert s["lifecycleState"] == "active"


def test_operator_defaults_and_patch_overrides(
    client: TestClient, caller: Caller, svc: LifecycleService
) -> None:
    sid = session_for(client, caller, svc)
    _hibernate(client, caller, svc, sid)
    sql_exec("UPDATE sessions SET updated_at = now() - interval '2 hours'")
    svc.settings.auto_archive_after_seconds = 3 * 3600
    assert retention.auto_archive(svc) == 0
    r = client.patch(
        f"/api/sessions/{sid}", json={"autoArchiveAfterSeconds": 3600}, headers=caller.headers
    )
    assert r.status_code == 200 and r.json()["session"]["autoArchiveAfterSeconds"] == 3600
    # The PATCH touched the session: its clock starts again.
    assert retention.auto_archive(svc) == 0
    sql_exec("UPDATE sessions SET updated_at = now() - interval '3601 s'")
    assert retention.auto_archive(svc) == 1
    for bad in (0, -1, "60", 2**31):
        r = client.patch(
            f"/api/sessions/{sid}", json={"autoDeleteAfterSeconds": bad}, headers=caller.headers
        )
        assert_error(r, 400, case=bad)
