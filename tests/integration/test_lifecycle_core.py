"""The lifecycle service's hot path (plain SQL on one reused connection): the guards of
the claim and the record, what a lost lease, a stale or duplicate delivery and a held
lease leave behind, the chained job, and how the connection behaves when it breaks.

Driven in-process against real PostgreSQL and Redis, with the local providers."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import sessionmaker

from tests.support.drains import deliver, drain, next_job
from tests.support.lifecycle import make_service, service_settings
from tests.support.sessions import load_run, load_session, new_session, run_history
from worker.db import connection
from worker.db.engine import get_engine
from worker.db.models import ChatRecord, LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import RunKind
from worker.services import lifecycle, outbox
from worker.services.lifecycle import LifecycleService
from worker.task_names import DEFAULT_QUEUE


def _snapshot_of_tables(svc: LifecycleService) -> list[Any]:
    """Everything a delivery could change, to compare before and after."""
    with svc.factory() as db:
        rows: list[Any] = []
        for table in ("sessions", "lifecycle_runs", "outbox"):
            rows += [tuple(r) for r in db.execute(text(f"SELECT * FROM {table} ORDER BY 1")).all()]
        return rows


def _add_run(
    svc: LifecycleService, sid: uuid.UUID, kind: RunKind, state: str, version: int | None
) -> uuid.UUID:
    rid = uuid.uuid4()
    with svc.factory.begin() as db:
        db.add(
            LifecycleRunRecord(
                id=rid,
                session_id=sid,
                kind=kind.value,
                trigger="test",
                state=state,
                attempts=0,
                issued_version=version,
                created_at=datetime.now(UTC),
                updated_at=datetime.now(UTC),
            )
        )
    return rid


# ----------------------------------------------------------------- record and chain
def test_a_provision_bumps_the_version_by_one_and_chains_a_published_start(
    svc: LifecycleService,
) -> None:
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None and job["version"] == 0
    out = deliver(svc, job)
    assert (out.status, out.from_version, out.to_version) == ("succeeded", 0, 1)
    s = load_session(svc, sid)
    assert s.lifecycle_version == 1 and s.lifecycle_run_id is None and s.lease_expires_at is None
    assert s.provisioned_at is not None and s.lifecycle_state == "provisioning"
    provision, start = run_history(svc, sid)
    assert (provision.kind, provision.state, provision.attempts) == ("provision", "succeeded", 1)
    assert (provision.from_version, provision.to_version) == (0, 1)
    assert provision.started_at is not None and provision.finished_at is not None
    assert (start.kind, start.trigger, start.state, start.issued_version) == (
        "start",
        "chain",
        "queued",
        1,
    )
    # Its job was written with the record and published right after the commit.
    with svc.factory() as db:
        record = db.scalars(select(OutboxRecord).order_by(OutboxRecord.id.desc())).first()
    assert record is not None and record.task_name == "lifecycle.start"
    assert record.payload["kwargs"] == {
        "session_id": str(sid),
        "run_id": str(start.id),
        "version": 1,
    }
    assert record.queue == DEFAULT_QUEUE
    assert [j[0] for j in out.jobs] == [record.id]
    assert record.published_at is not None and record.claimed_until is None

    out = deliver(svc, next_job(svc, sid) or {})
    assert (out.status, out.from_version, out.to_version) == ("succeeded", 1, 2)
    s = load_session(svc, sid)
    assert s.lifecycle_state == "active" and s.lifecycle_version == 2
    assert s.sandbox_state["queue"] == svc.queue and s.hibernate_after is not None


def _in_place(tmp_path: Path) -> LifecycleService:
    return make_service(service_settings(tmp_path, start_in_place=True))


def _task_names(redis_client: Any) -> list[str]:
    raw = redis_client.lrange(DEFAULT_QUEUE, 0, -1)
    return [json.loads(message)["headers"]["task"] for message in raw]


def test_a_provision_runs_the_start_it_chains_in_the_same_delivery(
    db_clean: dict[str, str], redis_client: Any, tmp_path: Path
) -> None:
    svc = _in_place(tmp_path)
    sid = new_session(svc)
    redis_client.delete(DEFAULT_QUEUE)  # the create's own provision message
    out = deliver(svc, next_job(svc, sid) or {})
    assert (out.status, out.from_version, out.to_version) == ("succeeded", 0, 1)
    assert out.followed is not None
    assert (out.followed.status, out.followed.from_version, out.followed.to_version) == (
        "succeeded",
        1,
        2,
    )
    s = load_session(svc, sid)
    assert (s.lifecycle_state, s.lifecycle_version, s.lifecycle_run_id) == ("active", 2, None)
    _provision, start = run_history(svc, sid)
    assert (start.kind, start.trigger, start.state, start.attempts) == (
        "start",
        "chain",
        "succeeded",
        1,
    )
    # The start's job is settled without a message: the run already ended here.
    (row,) = out.jobs
    with svc.factory() as db:
        record = db.get(OutboxRecord, row[0])
    assert record is not None and record.task_name == "lifecycle.start"
    assert record.published_at is not None and record.claimed_until is None
    assert start.task_id == record.payload["task_id"]
    assert _task_names(redis_client) == []
    # The message a relay could still send (say the marking was lost) is a duplicate.
    again = deliver(svc, {"kind": RunKind.START, **record.payload["kwargs"]})
    assert (again.status, again.reason) == ("skipped", "duplicate delivery")


def test_a_start_to_retry_in_place_leaves_its_job_to_the_relay_at_the_retry_time(
    db_clean: dict[str, str], redis_client: Any, tmp_path: Path
) -> None:
    svc = _in_place(tmp_path)
    assert svc.settings.fault_plan is not None
    svc.settings.fault_plan.write_text(
        json.dumps({"sandbox.start_from_clone": [{"error": "transient", "retry_after": 120}]})
    )
    sid = new_session(svc)
    redis_client.delete(DEFAULT_QUEUE)
    out = deliver(svc, next_job(svc, sid) or {})
    assert out.status == "succeeded" and out.followed is not None
    assert out.followed.status == "retry" and (out.followed.retry_in or 0) >= 120
    _provision, start = run_history(svc, sid)
    assert (start.state, start.attempts) == ("queued", 1)
    (row,) = out.jobs
    with svc.factory() as db:
        record = db.get(OutboxRecord, row[0])
        assert record is not None and record.published_at is None
    # Claimed until the retry is due, so the relay leaves it until then...
    with svc.factory() as db:
        wait = db.scalar(
            text("SELECT extract(epoch FROM claimed_until - now()) FROM outbox WHERE id = :i"),
            {"i": row[0]},
        )
    assert 100 < float(wait) <= (out.followed.retry_in or 0) + 1
    assert outbox.relay(svc.factory, svc.publisher).published == 0  # type: ignore[arg-type]
    # ... and publishes it then; the delivery takes the run as a retry would.
    with svc.factory.begin() as db:
        due = update(OutboxRecord).where(OutboxRecord.id == row[0])
        db.execute(due.values(claimed_until=datetime.now(UTC)))
    assert outbox.relay(svc.factory, svc.publisher).published == 1  # type: ignore[arg-type]
    assert _task_names(redis_client) == ["lifecycle.start"]
    out = deliver(svc, {"kind": RunKind.START, **record.payload["kwargs"]})
    assert out.status == "succeeded" and load_session(svc, sid).lifecycle_state == "active"
    assert load_run(svc, start.id).attempts == 2


class _Died(BaseException):
    """The worker process dying in the middle of the in-place start."""


def test_a_worker_dying_in_an_in_place_start_leaves_its_job_to_the_relay(
    db_clean: dict[str, str],
    redis_client: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    svc = _in_place(tmp_path)
    sid = new_session(svc)
    redis_client.delete(DEFAULT_QUEUE)

    def die(_s: Any) -> dict[str, Any]:
        raise _Died

    monkeypatch.setattr(svc.work, "start", die)
    with pytest.raises(_Died):
        deliver(svc, next_job(svc, sid) or {})
    # The provision is recorded; the start holds its lease (the reaper's to re-drive)
    # and its job is in the outbox, claimed, unpublished: the relay's once the claim ends.
    provision, start = run_history(svc, sid)
    assert (provision.state, start.state) == ("succeeded", "running")
    assert load_session(svc, sid).lifecycle_run_id == start.id
    with svc.factory.begin() as db:
        record = db.scalars(select(OutboxRecord).order_by(OutboxRecord.id.desc())).first()
        assert record is not None and record.task_name == "lifecycle.start"
        assert record.published_at is None and record.claimed_until is not None
        due = update(OutboxRecord).where(OutboxRecord.id == record.id)
        db.execute(due.values(claimed_until=datetime.now(UTC)))
    assert outbox.relay(svc.factory, svc.publisher).published == 1  # type: ignore[arg-type]
    assert _task_names(redis_client) == ["lifecycle.start"]


def test_a_record_queues_the_oldest_pending_run_with_its_job(svc: LifecycleService) -> None:
    sid = new_session(svc)
    drain(svc, sid)
    job = _kick_hibernate(svc, sid)
    # Two kicks arrived while the hibernate ran (pending behind it), oldest first.
    first = _add_run(svc, sid, RunKind.SNAPSHOT, "pending", None)
    second = _add_run(svc, sid, RunKind.DIFF, "pending", None)
    out = deliver(svc, job)
    assert (out.status, out.to_version) == ("succeeded", 3)
    assert load_run(svc, first).state == "queued" and load_run(svc, first).issued_version == 3
    assert load_run(svc, second).state == "pending"
    (row,) = out.jobs
    with svc.factory() as db:
        record = db.get(OutboxRecord, row[0])
    assert record is not None and record.task_name == "lifecycle.snapshot"
    assert record.payload["kwargs"] == {"session_id": str(sid), "run_id": str(first), "version": 3}
    assert record.payload["task_id"] and record.published_at is not None
    # A snapshot needs the live sandbox: routed like runs.enqueue routes it.
    assert record.queue == DEFAULT_QUEUE  # the sandbox is stopped (hibernated)


def _kick_hibernate(svc: LifecycleService, sid: uuid.UUID) -> dict[str, Any]:
    from worker.services import runs

    with svc.factory.begin() as db:
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        kicked = runs.kick(db, s, RunKind.HIBERNATE, "api")
    assert svc.publisher is not None
    outbox.publish_now(svc.factory, kicked.outbox, svc.publisher)  # as a kick's caller does
    job = next_job(svc, sid)
    assert job is not None and job["kind"] is RunKind.HIBERNATE
    return job


def test_a_hibernate_checkpoints_the_snapshot_before_stopping(svc: LifecycleService) -> None:
    sid = new_session(svc)
    drain(svc, sid)
    job = _kick_hibernate(svc, sid)
    assert svc.settings.fault_plan is not None
    svc.settings.fault_plan.write_text(
        json.dumps({"sandbox.stop": [{"error": "permanent", "message": "stop refused"}]})
    )
    out = deliver(svc, job)
    assert out.status == "failed" and out.reason == "stop refused"
    s = load_session(svc, sid)
    # The work was saved (and recorded) before the stop was tried.
    assert s.snapshot_url and s.snapshot_created_at and s.cached_diff is not None
    assert Path(s.snapshot_url.removeprefix("file://")).exists()
    assert s.lifecycle_state == "failed" and s.lifecycle_error == "stop refused"
    assert s.lifecycle_version == 3 and s.lifecycle_run_id is None


# ----------------------------------------------------------------- deliveries that do nothing
def test_a_lease_lost_before_recording_abandons_the_run_and_records_nothing(
    svc: LifecycleService, monkeypatch: pytest.MonkeyPatch
) -> None:
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None and job["kind"] is RunKind.PROVISION
    provision = svc.work.provision

    def work_then_lose_the_lease(s: lifecycle.SessionView) -> dict[str, Any]:
        changes = provision(s)
        with svc.factory.begin() as db:  # the lease expired and someone released it
            db.execute(
                update(SessionRecord)
                .where(SessionRecord.id == sid)
                .values(lifecycle_run_id=None, lease_expires_at=None)
            )
        return changes

    monkeypatch.setattr(svc.work, "provision", work_then_lose_the_lease)
    before = len(run_history(svc, sid))
    out = deliver(svc, job)
    assert (out.status, out.reason, out.jobs) == ("skipped", "lease lost before recording", [])
    s = load_session(svc, sid)
    assert s.lifecycle_version == 0 and s.provisioned_at is None  # nothing recorded
    run = load_run(svc, job["run_id"])
    assert (run.state, run.error, run.to_version) == (
        "abandoned",
        "lease lost before recording",
        None,
    )
    assert len(run_history(svc, sid)) == before  # no chained start


def test_a_duplicate_delivery_of_a_finished_run_changes_nothing(svc: LifecycleService) -> None:
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None
    assert drain(svc, sid) == ["succeeded", "succeeded"]
    before = _snapshot_of_tables(svc)
    out = deliver(svc, job)
    assert (out.status, out.reason) == ("skipped", "duplicate delivery")
    assert _snapshot_of_tables(svc) == before


def test_a_delivery_for_an_unknown_run_changes_nothing(svc: LifecycleService) -> None:
    sid = new_session(svc)
    before = _snapshot_of_tables(svc)
    out = deliver(
        svc,
        {"kind": RunKind.START, "session_id": str(sid), "run_id": str(uuid.uuid4()), "version": 0},
    )
    assert (out.status, out.reason) == ("skipped", "duplicate delivery")
    assert _snapshot_of_tables(svc) == before


def test_a_run_held_back_by_another_runs_live_lease_is_left_queued(
    svc: LifecycleService,
) -> None:
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None
    other = uuid.uuid4()
    with svc.factory.begin() as db:
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == sid)
            .values(lifecycle_run_id=other, lease_expires_at=datetime.now(UTC) + timedelta(hours=1))
        )
    before = _snapshot_of_tables(svc)
    out = deliver(svc, job)
    assert (out.status, out.reason) == ("skipped", "duplicate delivery")
    assert _snapshot_of_tables(svc) == before
    assert load_run(svc, job["run_id"]).state == "queued"


def test_a_stale_delivery_is_recorded_skipped_and_the_pending_run_goes_next(
    svc: LifecycleService,
) -> None:
    sid = new_session(svc)
    drain(svc, sid)  # active, version 2
    job = _kick_hibernate(svc, sid)
    pending = _add_run(svc, sid, RunKind.SNAPSHOT, "pending", None)
    out = deliver(svc, {**job, "version": 1})
    assert out.status == "skipped"
    assert out.reason == "stale: issued against version 1, session is at 2"
    run = load_run(svc, job["run_id"])
    assert (run.state, run.error, run.to_version) == ("skipped", out.reason, None)
    s = load_session(svc, sid)
    assert (s.lifecycle_version, s.lifecycle_state, s.lifecycle_run_id) == (2, "active", None)
    queued = load_run(svc, pending)
    assert (queued.state, queued.issued_version) == ("queued", 2)


def test_hibernation_waits_for_a_stream_and_a_sweeps_run_for_the_due_time(
    svc: LifecycleService,
) -> None:
    from worker.services import runs

    sid = new_session(svc)
    drain(svc, sid)
    with svc.factory.begin() as db:
        db.execute(
            update(ChatRecord).where(ChatRecord.session_id == sid).values(active_stream_id="s")
        )
    job = _kick_hibernate(svc, sid)
    out = deliver(svc, job)
    assert (out.status, out.reason) == ("skipped", "a chat has an active stream")
    with svc.factory.begin() as db:
        db.execute(
            update(ChatRecord).where(ChatRecord.session_id == sid).values(active_stream_id=None)
        )
    # A sweep's run goes only while the session is still due; it is not (just started).
    with svc.factory.begin() as db:
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        kicked = runs.kick(db, s, RunKind.HIBERNATE, "sweep")
    job = next_job(svc, sid)
    assert job is not None and job["run_id"] == str(kicked.run.id)
    out = deliver(svc, job)
    assert (out.status, out.reason) == ("skipped", "not due or a chat has an active stream")
    assert load_session(svc, sid).lifecycle_state == "active"
    # Once due, the same kind of run goes.
    with svc.factory.begin() as db:
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == sid)
            .values(hibernate_after=datetime.now(UTC) - timedelta(seconds=1))
        )
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        runs.kick(db, s, RunKind.HIBERNATE, "sweep")
    assert drain(svc, sid) == ["succeeded"]
    assert load_session(svc, sid).lifecycle_state == "hibernated"


def test_a_transient_failure_releases_the_lease_and_keeps_the_run_queued(
    svc: LifecycleService,
) -> None:
    assert svc.settings.fault_plan is not None
    svc.settings.fault_plan.write_text(
        json.dumps({"repo_host.ensure_repo": [{"error": "transient", "message": "503"}]})
    )
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None
    out = deliver(svc, job)
    assert out.status == "retry" and out.retry_in is not None and out.reason == "503"
    s = load_session(svc, sid)
    assert (s.lifecycle_run_id, s.lifecycle_version, s.lifecycle_state) == (
        None,
        0,
        "provisioning",
    )
    run = load_run(svc, job["run_id"])
    assert (run.state, run.attempts, run.error) == ("queued", 1, "503")
    # The retry (the same delivery again) claims it afresh and succeeds.
    out = deliver(svc, job)
    assert out.status == "succeeded" and load_run(svc, job["run_id"]).attempts == 2


# ----------------------------------------------------------------- the connection
def test_a_connection_broken_between_deliveries_fails_one_with_a_database_error(
    svc: LifecycleService, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connection, "CONNECTION_REUSE_SECONDS", 3600.0)  # always kept
    sid = new_session(svc)
    job = next_job(svc, sid)
    assert job is not None
    assert deliver(svc, job).status == "succeeded"
    kept = svc.kept_connection
    assert kept is not None and kept.backend_pid is not None
    with get_engine().begin() as conn:  # the server drops the worker's connection
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": kept.backend_pid})
    start = next_job(svc, sid)
    assert start is not None
    # Raised as SQLAlchemy's OperationalError: the task retries the delivery later.
    with pytest.raises(OperationalError):
        deliver(svc, start)
    assert load_run(svc, start["run_id"]).state == "queued"
    assert deliver(svc, start).status == "succeeded"
    assert load_session(svc, sid).lifecycle_state == "active"


def test_connections_go_back_to_the_pool_transactional(
    db_clean: dict[str, str], redis_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One pooled connection only, so the one the service used is the one handed out next.
    engine = create_engine(db_clean["database_url"], pool_size=1, max_overflow=0)
    try:
        svc = make_service(
            service_settings(tmp_path), factory=sessionmaker(engine, expire_on_commit=False)
        )
        monkeypatch.setattr(connection, "CONNECTION_REUSE_SECONDS", -1.0)  # never kept
        sid = new_session(svc)
        assert drain(svc, sid) == ["succeeded", "succeeded"]
        assert svc.kept_connection is None
        with engine.connect() as conn:
            assert conn.connection.driver_connection.autocommit is False
            conn.execute(text("UPDATE sessions SET title = 'x' WHERE id = :id"), {"id": sid})
            conn.rollback()  # a transaction, not autocommitted
        assert load_session(svc, sid).title != "x"
    finally:
        engine.dispose()
