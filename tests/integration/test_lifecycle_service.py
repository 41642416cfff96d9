"""The lifecycle service driven step by step in-process (real PostgreSQL, real local
providers, real Redis for publishing): ordering, coalescing, reaping, expiry."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.support.drains import drain, next_job
from tests.support.sessions import kick, load_session, new_session, run_history
from worker.config import Settings
from worker.db.models import LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import RunKind
from worker.services import sessions, sweeps
from worker.services.lifecycle import LifecycleService


def test_kicks_during_a_run_wait_their_turn(svc: LifecycleService) -> None:
    sid = new_session(svc)
    hib = kick(svc, sid, RunKind.HIBERNATE)  # provisioning is open: pending
    assert hib.created and hib.run.state == "pending" and not hib.outbox
    again = kick(svc, sid, RunKind.HIBERNATE)  # the same kick coalesces
    assert not again.created and again.run.id == hib.run.id
    assert drain(svc, sid) == [
        "succeeded",
        "succeeded",
        "succeeded",
    ]  # provision, start, hibernate
    s = load_session(svc, sid)
    assert s.lifecycle_state == "hibernated" and s.lifecycle_version == 3
    # History in creation order: the hibernate kick was recorded before the chained start.
    assert [r.kind for r in run_history(svc, sid)] == ["provision", "hibernate", "start"]
    finished = {r.kind: r for r in run_history(svc, sid)}
    assert finished["hibernate"].from_version == 2 and finished["hibernate"].to_version == 3


def test_hibernate_waits_for_an_active_stream_to_end(svc: LifecycleService) -> None:
    from worker.db.models import ChatRecord

    sid = new_session(svc)
    drain(svc, sid)
    with svc.factory.begin() as db:
        db.execute(
            update(ChatRecord).where(ChatRecord.session_id == sid).values(active_stream_id="s1")
        )
    kick(svc, sid, RunKind.HIBERNATE)
    assert drain(svc, sid) == ["skipped"]
    assert load_session(svc, sid).lifecycle_state == "active"
    assert run_history(svc, sid)[-1].error == "a chat has an active stream"


def test_archive_then_unarchive_then_resume(svc: LifecycleService) -> None:
    sid = new_session(svc)
    drain(svc, sid)
    workdir = Path(load_session(svc, sid).sandbox_state["workdir"])
    (workdir / "keep.txt").write_text("precious\n")
    with svc.factory.begin() as db:
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        sessions.patch_session(
            db, svc.settings, s, sessions.SessionPatch(status=sessions.SessionStatus.ARCHIVED)
        )
    assert drain(svc, sid) == ["succeeded"]
    s = load_session(svc, sid)
    assert s.lifecycle_state == "archived" and s.snapshot_url and not workdir.exists()
    with svc.factory.begin() as db:
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        sessions.patch_session(
            db, svc.settings, s, sessions.SessionPatch(status=sessions.SessionStatus.RUNNING)
        )
    assert load_session(svc, sid).lifecycle_state == "hibernated"
    kick(svc, sid, RunKind.START)
    assert drain(svc, sid) == ["succeeded"]
    assert (workdir / "keep.txt").read_text() == "precious\n"


def test_reaper_abandons_an_expired_lease_and_drives_again(svc: LifecycleService) -> None:
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None
    # A worker claimed the provision run and died: its lease is left, already expired.
    with svc.factory.begin() as db:
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == sid)
            .values(
                lifecycle_run_id=uuid.UUID(job["run_id"]),
                lease_expires_at=datetime.now(UTC) - timedelta(seconds=1),
            )
        )
        db.execute(
            update(LifecycleRunRecord)
            .where(LifecycleRunRecord.id == uuid.UUID(job["run_id"]))
            .values(state="running")
        )
    assert sweeps.reap_runs(svc) == {"reaped": 1, "republished": 0, "dispatched": 0}
    # The dead worker's message, redelivered late, does nothing.
    assert svc.execute(job.pop("kind"), **job).status == "skipped"
    assert drain(svc, sid) == ["succeeded", "succeeded"]
    states = [(r.kind, r.state, r.trigger) for r in run_history(svc, sid)]
    assert states[0] == ("provision", "abandoned", "create")
    assert ("provision", "succeeded", "reaper") in states
    assert load_session(svc, sid).lifecycle_state == "active"


def test_reaper_republishes_a_queued_run_whose_message_was_lost(svc: LifecycleService) -> None:
    sid = new_session(svc)
    with svc.factory.begin() as db:
        db.execute(
            update(LifecycleRunRecord)
            .where(LifecycleRunRecord.session_id == sid)
            .values(
                updated_at=datetime.now(UTC) - timedelta(seconds=svc.settings.lease_seconds + 5)
            )
        )
        before = db.scalar(select(OutboxRecord.id).order_by(OutboxRecord.id.desc()).limit(1))
    assert sweeps.reap_runs(svc)["republished"] == 1
    with svc.factory() as db:
        newest = db.scalars(select(OutboxRecord).order_by(OutboxRecord.id.desc()).limit(1)).one()
    assert newest.id != before and newest.task_name == "lifecycle.provision"
    assert newest.payload["kwargs"]["session_id"] == str(sid)


def test_transient_errors_retry_then_fail_permanently_after_the_limit(
    svc: LifecycleService,
) -> None:
    assert svc.settings.fault_plan is not None
    svc.settings.fault_plan.write_text(
        json.dumps(
            {"repo_host.ensure_repo": [{"error": "transient", "message": "upstream 503"}] * 5}
        )
    )
    sid = new_session(svc)
    outcomes = drain(svc, sid)
    assert outcomes == ["retry", "retry", "failed"]
    s = load_session(svc, sid)
    assert s.lifecycle_state == "failed"
    assert s.lifecycle_error == "gave up after 3 attempts: upstream 503"
    assert run_history(svc, sid)[0].attempts == 3


def test_expire_snapshots_deletes_old_archives_only(svc: LifecycleService) -> None:
    old, recent = new_session(svc), new_session(svc)
    for sid in (old, recent):
        drain(svc, sid)
        with svc.factory.begin() as db:
            s = db.get(SessionRecord, sid, with_for_update=True)
            assert s is not None
            sessions.patch_session(
                db, svc.settings, s, sessions.SessionPatch(status=sessions.SessionStatus.ARCHIVED)
            )
        drain(svc, sid)
    with svc.factory.begin() as db:
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == old)
            .values(archived_at=datetime.now(UTC) - timedelta(days=31))
        )
    old_url = load_session(svc, old).snapshot_url
    assert old_url and Path(old_url.removeprefix("file://")).exists()
    assert sweeps.expire_snapshots(svc) == {"deleted": 1}
    assert (
        load_session(svc, old).snapshot_url is None
        and not Path(old_url.removeprefix("file://")).exists()
    )
    assert load_session(svc, recent).snapshot_url is not None


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        Settings(idle_timeout_seconds=0)
