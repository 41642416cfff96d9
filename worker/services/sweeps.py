"""Scheduled sweeps (Celery beat): idle hibernation, outbox relay, stuck-run reaper,
snapshot expiry. Each is safe to run twice at once and returns what it did."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    ARRAY,
    DateTime,
    Integer,
    Row,
    String,
    Table,
    Text,
    bindparam,
    cast,
    column,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID
from sqlalchemy.orm import Session

from worker.db import statements
from worker.db.models import LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import OPEN_RUN_STATES, LifecycleState, RunKind, RunState
from worker.logging import get_logger
from worker.services import outbox, runs
from worker.task_names import TASK_FOR_KIND

if TYPE_CHECKING:
    from worker.services.lifecycle import LifecycleService

log = get_logger(__name__)
S = SessionRecord
R = LifecycleRunRecord

MAX_BATCHES = 50


def _open_run_exists() -> Any:
    return exists().where(R.session_id == S.id, R.state.in_([s.value for s in OPEN_RUN_STATES]))


def due_candidates_query(guard_seconds: float, batch: int) -> Any:
    """Active, unleased sessions past their due time, oldest due first, over the partial
    expression index ``ix_sessions_hibernate_due`` (its cost follows the due rows).

    Selects only what queueing a hibernate run needs: ``(id, lifecycle_version,
    sandbox_state)`` (the version the run is issued against, the state for routing)."""
    return statements.DUE_CANDIDATES.bindparams(guard=timedelta(seconds=guard_seconds), batch=batch)


OutboxRow = tuple[int, str, dict[str, Any], str | None]

_UUIDS = ARRAY(PG_UUID(as_uuid=True))
# The Core tables: executed with plain parameters, an INSERT of an ORM entity would take
# the ORM's bulk path.
_RUNS_TABLE: Table = LifecycleRunRecord.__table__  # type: ignore[assignment]
_OUTBOX_TABLE: Table = OutboxRecord.__table__  # type: ignore[assignment]


def _insert_runs_stmt() -> Any:
    """One INSERT of every queued run of a batch, the rows passed as arrays (a fixed
    statement, compiled and prepared once, whatever the batch size)."""
    rows = (
        func.unnest(
            bindparam("run_ids", type_=_UUIDS),
            bindparam("session_ids", type_=_UUIDS),
            bindparam("versions", type_=ARRAY(Integer)),
        )
        .table_valued("id", "session_id", "version")
        .render_derived()
    )
    now = bindparam("now", type_=DateTime(timezone=True))
    return insert(_RUNS_TABLE).from_select(
        [
            "id",
            "session_id",
            "kind",
            "trigger",
            "state",
            "attempts",
            "issued_version",
            "created_at",
            "updated_at",
        ],
        select(
            rows.c.id,
            rows.c.session_id,
            bindparam("kind", type_=String),
            bindparam("trigger", type_=String),
            bindparam("state", type_=String),
            bindparam("attempts", type_=Integer),
            rows.c.version,
            now,
            now,
        ),
    )


def _insert_jobs_stmt() -> Any:
    """One INSERT of every job of a batch, passed as one JSON array of ``{"payload",
    "queue"}`` objects (one parameter: psycopg adapts a ``text[]`` of JSON documents
    several times slower), returning each record's id with its task id (to pair them
    without relying on the order of RETURNING)."""
    jobs = (
        func.jsonb_array_elements(cast(bindparam("jobs", type_=Text), JSONB))
        .table_valued(column("job", JSONB))
        .render_derived()
    )
    return (
        insert(_OUTBOX_TABLE)
        .from_select(
            ["task_name", "payload", "queue", "created_at", "claimed_until", "attempts"],
            select(
                bindparam("task_name", type_=Text),
                jobs.c.job["payload"],
                jobs.c.job["queue"].astext,
                bindparam("now", type_=DateTime(timezone=True)),
                bindparam("claimed_until", type_=DateTime(timezone=True)),
                bindparam("attempts", type_=Integer),
            ),
        )
        .returning(_OUTBOX_TABLE.c.id, _OUTBOX_TABLE.c.payload["task_id"].astext)
    )


_INSERT_RUNS = _insert_runs_stmt()
_INSERT_JOBS = _insert_jobs_stmt()


def _queue_runs(
    db: Session,
    due: Sequence[Row[uuid.UUID, int, dict[str, Any]]],
    kind: RunKind = RunKind.HIBERNATE,
    trigger: str = "sweep",
) -> list[OutboxRow]:
    """What ``runs.enqueue(db, s, runs.new_run(db, s, kind, trigger))`` does for each
    locked candidate, in two statements: a queued run (``trigger``) issued
    against the session's version, and its job in the outbox, claimed for publishing
    right after commit as ``outbox.add(claim=True)`` records it. Returns the jobs as
    ``(id, task_name, payload, queue)`` rows, in id order."""
    conn = db.connection()
    now = datetime.now(UTC)
    run_ids = [uuid.uuid4() for _ in due]
    conn.execute(
        _INSERT_RUNS,
        {
            "run_ids": run_ids,
            "session_ids": [sid for sid, _v, _st in due],
            "versions": [version for _sid, version, _st in due],
            "kind": kind.value,
            "trigger": trigger,
            "state": RunState.QUEUED.value,
            "attempts": 0,
            "now": now,
        },
    )
    jobs = {
        job.task_id: job
        for job in (
            statements.job_for(kind, sid, rid, version, sandbox_state)
            for (sid, version, sandbox_state), rid in zip(due, run_ids, strict=True)
        )
    }
    task_name = TASK_FOR_KIND[kind]
    ids = conn.execute(
        _INSERT_JOBS,
        {
            "task_name": task_name,
            "jobs": json.dumps([{"payload": j.payload, "queue": j.queue} for j in jobs.values()]),
            "now": now,
            "claimed_until": statements.claimed_until(now),
            "attempts": 0,
        },
    ).all()
    return [jobs[task_id].row(oid) for oid, task_id in sorted(ids)]


def hibernate_idle(svc: LifecycleService) -> dict[str, Any]:
    """Queue a hibernate run (trigger ``sweep``) for every due session. The run's claim
    re-checks that the session is still idle, so activity in between wins."""
    settings = svc.settings
    queued = 0
    published: list[int] = []  # the previous batch's jobs the broker took, still unmarked
    for _ in range(MAX_BATCHES):
        with svc.factory.begin() as db:
            # Marked in the next batch's transaction rather than one of their own (a
            # commit each: 5 of the 10 a 1,000-session sweep made). Should it roll
            # back, the relay publishes them again: a duplicate delivery, skipped.
            if published:
                db.execute(outbox.MARK_PUBLISHED, {"ids": published})
            due = db.execute(
                due_candidates_query(settings.hibernate_guard_seconds, settings.sweep_batch_size)
            ).all()
            jobs = _queue_runs(db, due) if due else []
        # After the commit, in one broker round trip.
        published = (
            outbox.publish_rows_unmarked(svc.factory, jobs, svc.publisher)
            if jobs and svc.publisher is not None
            else []
        )
        queued += len(due)
        if len(due) < settings.sweep_batch_size:
            break
    outbox.mark_published(svc.factory, published)
    return {"queued": queued}


def checkpoint_active(svc: LifecycleService) -> dict[str, Any]:
    """Queue a snapshot run (trigger ``checkpoint``) for every active sandbox with
    activity since its last snapshot, once per ``checkpoint_interval_seconds``: what a
    lost host can cost is bounded by that interval. Superseded snapshots are deleted
    when the new one is recorded."""
    interval = svc.settings.checkpoint_interval_seconds
    if interval <= 0:
        return {"queued": 0}
    with svc.factory.begin() as db:
        due = db.execute(
            statements.CHECKPOINT_CANDIDATES.bindparams(
                interval=timedelta(seconds=interval), batch=svc.settings.sweep_batch_size
            )
        ).all()
        jobs = _queue_runs(db, due, RunKind.SNAPSHOT, "checkpoint") if due else []
    if jobs and svc.publisher is not None:
        outbox.publish_rows(svc.factory, jobs, svc.publisher)
    return {"queued": len(due)}


def relay_outbox(svc: LifecycleService) -> dict[str, Any]:
    if svc.publisher is None:
        return {"published": 0, "failed": 0}
    result = outbox.relay(svc.factory, svc.publisher)
    return {"published": result.published, "failed": result.failed}


def reap_runs(svc: LifecycleService) -> dict[str, Any]:
    """Expired leases: mark the run abandoned, release the lease and queue a new run of
    the same kind (trigger ``reaper``). Queued runs whose message never ran (lost by the
    broker) are published again; sessions left with only pending runs are dispatched."""
    from worker.domain.lifecycle import state_before_claim

    lease = timedelta(seconds=svc.settings.lease_seconds)
    reaped = republished = dispatched = 0
    jobs: list[OutboxRecord] = []
    with svc.factory.begin() as db:
        expired = list(
            db.scalars(
                select(S)
                .where(S.lifecycle_run_id.is_not(None), S.lease_expires_at < func.now())
                .order_by(S.lease_expires_at)
                .limit(svc.settings.sweep_batch_size)
                .with_for_update(skip_locked=True)
            )
        )
        for s in expired:
            run = db.get(R, s.lifecycle_run_id, with_for_update=True)
            s.lifecycle_run_id = None
            s.lease_expires_at = None
            s.updated_at = datetime.now(UTC)
            if run is None:
                continue
            # Undo the claim's in-progress state so the re-driven run's claim is eligible.
            s.lifecycle_state = state_before_claim(
                RunKind(run.kind), s.snapshot_url, s.lifecycle_state
            )
            if run.state in (RunState.QUEUED.value, RunState.RUNNING.value):
                svc.finish_run(run, RunState.ABANDONED, error="lease expired (worker lost)")
            db.flush()
            again = runs.new_run(db, s, RunKind(run.kind), "reaper")
            jobs.append(runs.enqueue(db, s, again))
            reaped += 1
        # Queued runs nobody picked up for a whole lease: their message was lost.
        stale = list(
            db.execute(
                select(R, S)
                .join(S, S.id == R.session_id)
                .where(
                    R.state == RunState.QUEUED.value,
                    R.updated_at < func.now() - lease,
                    S.lifecycle_run_id.is_(None),
                )
                .limit(svc.settings.sweep_batch_size)
                .with_for_update(of=R, skip_locked=True)
            ).all()
        )
        for run, s in stale:
            jobs.append(runs.enqueue(db, s, run))
            republished += 1
        # Pending runs with nothing ahead of them (their predecessor ended without
        # dispatching, e.g. a crash right after recording).
        orphaned = list(
            db.scalars(
                select(S)
                .where(
                    S.lifecycle_run_id.is_(None),
                    exists().where(R.session_id == S.id, R.state == RunState.PENDING.value),
                    ~exists().where(
                        R.session_id == S.id,
                        R.state.in_([RunState.QUEUED.value, RunState.RUNNING.value]),
                    ),
                )
                .limit(svc.settings.sweep_batch_size)
                .with_for_update(of=S, skip_locked=True)
            )
        )
        for s in orphaned:
            jobs += runs.dispatch_next(db, s)
            dispatched += 1
    svc._publish(jobs)
    return {"reaped": reaped, "republished": republished, "dispatched": dispatched}


def expire_snapshots(svc: LifecycleService) -> dict[str, Any]:
    """Delete the snapshots of sessions archived longer than the retention."""
    retention = timedelta(days=svc.settings.snapshot_retention_days)
    deleted = 0
    for _ in range(MAX_BATCHES):
        with svc.factory.begin() as db:
            rows = list(
                db.execute(
                    select(S.id, S.snapshot_url)
                    .where(
                        S.lifecycle_state == LifecycleState.ARCHIVED.value,
                        S.archived_at < func.now() - retention,
                        S.snapshot_url.is_not(None),
                        S.lifecycle_run_id.is_(None),
                    )
                    .limit(svc.settings.sweep_batch_size)
                    .with_for_update(skip_locked=True)
                ).all()
            )
            if rows:
                db.execute(
                    update(S)
                    .where(S.id.in_([r[0] for r in rows]))
                    .values(snapshot_url=None, snapshot_created_at=None, snapshot_size_bytes=None)
                )
        # Delete after the commit: the row never points at a missing file, and a crash
        # here leaves at worst an unreferenced file.
        for _sid, url in rows:
            if url is not None:
                svc.providers.snapshots.delete(url)
        deleted += len(rows)
        if len(rows) < svc.settings.sweep_batch_size:
            break
    return {"deleted": deleted}
