"""Lifecycle runs: recording kicks (with coalescing) and dispatching them one at a time."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.celery_app import (
    TASK_ARCHIVE,
    TASK_DIFF,
    TASK_HIBERNATE,
    TASK_PROVISION,
    TASK_SNAPSHOT,
    TASK_START,
)
from worker.db.models import LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import (
    OPEN_RUN_STATES,
    LifecycleState,
    RunKind,
    RunState,
    coalescing_kinds,
    is_kick_satisfied,
)
from worker.routing import queue_for
from worker.services import outbox

TASK_FOR_KIND: dict[RunKind, str] = {
    RunKind.PROVISION: TASK_PROVISION,
    RunKind.START: TASK_START,
    RunKind.HIBERNATE: TASK_HIBERNATE,
    RunKind.SNAPSHOT: TASK_SNAPSHOT,
    RunKind.DIFF: TASK_DIFF,
    RunKind.ARCHIVE: TASK_ARCHIVE,
}


@dataclass
class KickResult:
    run: LifecycleRunRecord
    created: bool  # False when the kick coalesced onto an existing run
    outbox: list[OutboxRecord]


def task_kwargs(run: LifecycleRunRecord, version: int) -> dict[str, object]:
    return {"session_id": str(run.session_id), "run_id": str(run.id), "version": version}


def enqueue(db: Session, session: SessionRecord, run: LifecycleRunRecord) -> OutboxRecord:
    """Mark ``run`` queued against the session's current version and write its job."""
    run.state = RunState.QUEUED
    run.issued_version = session.lifecycle_version
    run.updated_at = datetime.now(UTC)
    kind = RunKind(run.kind)
    return outbox.add(
        db,
        TASK_FOR_KIND[kind],
        task_kwargs(run, session.lifecycle_version),
        queue=queue_for(kind, session.sandbox_state),
    )


def new_run(db: Session, session: SessionRecord, kind: RunKind, trigger: str) -> LifecycleRunRecord:
    run = LifecycleRunRecord(
        id=uuid.uuid4(),
        session_id=session.id,
        kind=kind.value,
        trigger=trigger,
        state=RunState.PENDING,
        attempts=0,
        created_at=datetime.now(UTC),
        updated_at=datetime.now(UTC),
    )
    db.add(run)
    return run


def open_runs(db: Session, session_id: uuid.UUID) -> list[LifecycleRunRecord]:
    return list(
        db.scalars(
            select(LifecycleRunRecord)
            .where(
                LifecycleRunRecord.session_id == session_id,
                LifecycleRunRecord.state.in_([s.value for s in OPEN_RUN_STATES]),
            )
            .order_by(LifecycleRunRecord.created_at, LifecycleRunRecord.id)
        )
    )


def kick(db: Session, session: SessionRecord, kind: RunKind, trigger: str) -> KickResult:
    """Ask for a run of ``kind``. The caller holds ``session`` locked (``FOR UPDATE``).

    Coalesces onto an open run that already covers the kick, or onto the last run when
    the session is already where the kick would take it. Otherwise records a new run:
    queued (with its job in the outbox) when the session is free, else pending until the
    current run finishes, so runs of one session never overlap."""
    state = LifecycleState(session.lifecycle_state)
    runs = open_runs(db, session.id)
    for run in runs:
        if RunKind(run.kind) in coalescing_kinds(kind):
            return KickResult(run, created=False, outbox=[])
    if not runs and is_kick_satisfied(kind, state):
        last = db.scalars(
            select(LifecycleRunRecord)
            .where(LifecycleRunRecord.session_id == session.id)
            .order_by(LifecycleRunRecord.created_at.desc(), LifecycleRunRecord.id.desc())
            .limit(1)
        ).first()
        if last is not None:
            return KickResult(last, created=False, outbox=[])
    # A start on a session whose repo was never provisioned provisions first (it chains).
    if kind is RunKind.START and session.provisioned_at is None:
        kind = RunKind.PROVISION
    run = new_run(db, session, kind, trigger)
    records: list[OutboxRecord] = []
    if not runs and session.lifecycle_run_id is None:
        records.append(enqueue(db, session, run))
    db.flush()
    return KickResult(run, created=True, outbox=records)


def dispatch_next(db: Session, session: SessionRecord) -> list[OutboxRecord]:
    """After a run finished (same transaction): queue the oldest pending run, if any."""
    pending = db.scalars(
        select(LifecycleRunRecord)
        .where(
            LifecycleRunRecord.session_id == session.id,
            LifecycleRunRecord.state == RunState.PENDING.value,
        )
        .order_by(LifecycleRunRecord.created_at, LifecycleRunRecord.id)
        .limit(1)
    ).first()
    if pending is None:
        return []
    return [enqueue(db, session, pending)]


# ----------------------------------------------------------------- Core (the worker's hot path)
#: A job written to the outbox with Core, as ``outbox.publish_rows`` takes it:
#: ``(outbox id, task name, payload, queue)``.
JobRow = tuple[int, str, dict[str, Any], str | None]


@dataclass(frozen=True, slots=True)
class Job:
    """A run's job before it is written: what ``enqueue`` records through ``outbox.add``
    (claimed for publishing right after commit)."""

    task_name: str
    payload: dict[str, Any]
    queue: str

    def params(self) -> dict[str, Any]:
        """The parameters of :data:`JOB_COLUMNS` / :data:`JOB_VALUES`."""
        now = datetime.now(UTC)
        return {
            "job_task": self.task_name,
            "job_payload": json.dumps(self.payload),
            "job_queue": self.queue,
            "job_now": now,
            "job_claimed_until": now + timedelta(seconds=outbox.CLAIM_SECONDS),
        }

    def row(self, outbox_id: int) -> JobRow:
        return (outbox_id, self.task_name, self.payload, self.queue)


#: ``INSERT INTO outbox {JOB_COLUMNS} VALUES ({JOB_VALUES})`` (or ``SELECT {JOB_VALUES}``)
#: with :meth:`Job.params`: the row ``outbox.add(..., claim=True)`` writes.
JOB_COLUMNS = "(task_name, payload, queue, created_at, claimed_until, attempts)"
JOB_VALUES = (
    "%(job_task)s, %(job_payload)s::jsonb, %(job_queue)s, %(job_now)s, %(job_claimed_until)s, 0"
)


def job_for(
    kind: RunKind,
    session_id: uuid.UUID,
    run_id: uuid.UUID,
    version: int,
    sandbox_state: Mapping[str, Any] | None,
) -> Job:
    """The job of run ``run_id`` issued against ``version`` (what ``enqueue`` writes)."""
    return Job(
        TASK_FOR_KIND[kind],
        {
            "kwargs": {"session_id": str(session_id), "run_id": str(run_id), "version": version},
            "task_id": str(uuid.uuid4()),
        },
        queue_for(kind, sandbox_state),
    )


_KIND_TASK_QUEUE = ", ".join(
    f"(%(kind_{k.value})s, %(task_{k.value})s, %(queue_{k.value})s)" for k in RunKind
)

# Queue the session's oldest pending run against its new version and write its job,
# once run ``after_run`` was recorded at that version in this transaction.
_DISPATCH_NEXT = f"""
WITH next AS (
    UPDATE lifecycle_runs SET state = 'queued', issued_version = %(version)s,
        updated_at = %(job_now)s
    WHERE id = (
        SELECT id FROM lifecycle_runs
        WHERE session_id = %(sid)s AND state = 'pending'
        ORDER BY created_at, id
        LIMIT 1
    ) AND state = 'pending'
    AND EXISTS (
        SELECT 1 FROM lifecycle_runs WHERE id = %(after_run)s AND to_version = %(version)s
    )
    RETURNING id, kind
), job AS (
    INSERT INTO outbox {JOB_COLUMNS}
    SELECT t.task_name,
        jsonb_build_object(
            'kwargs', jsonb_build_object(
                'session_id', %(sid)s::text, 'run_id', next.id::text, 'version', %(version)s::int
            ),
            'task_id', gen_random_uuid()::text
        ),
        t.queue, %(job_now)s, %(job_claimed_until)s, 0
    FROM next JOIN (VALUES {_KIND_TASK_QUEUE}) AS t (kind, task_name, queue)
        ON t.kind = next.kind
    RETURNING id, task_name, payload, queue
)
SELECT id, task_name, payload, queue FROM job
"""


def dispatch_next_statement(
    session_id: uuid.UUID,
    version: int,
    sandbox_state: Mapping[str, Any] | None,
    after_run: uuid.UUID,
) -> tuple[str, dict[str, Any]]:
    """``dispatch_next`` as one Core statement (and its parameters) for the transaction
    that records run ``after_run`` at ``version``: if that record was made (it holds the
    session's row lock, which kicks take), queue the oldest pending run against
    ``version`` and write its job (``enqueue``'s job: the same task, kwargs, queue and
    claim). The statement returns the job as a :data:`JobRow` (no row when nothing was
    pending or the record was not made).

    Run it as its own statement after the record's, not inside it: it must see a
    pending run that a kick committed while the record waited for the lock."""
    now = datetime.now(UTC)
    params: dict[str, Any] = {
        "sid": session_id,
        "version": version,
        "after_run": after_run,
        "job_now": now,
        "job_claimed_until": now + timedelta(seconds=outbox.CLAIM_SECONDS),
    }
    for kind in RunKind:
        params[f"kind_{kind.value}"] = kind.value
        params[f"task_{kind.value}"] = TASK_FOR_KIND[kind]
        params[f"queue_{kind.value}"] = queue_for(kind, sandbox_state)
    return _DISPATCH_NEXT, params
