"""Lifecycle runs: the kick rules (the one place the API and the command line ask for a
run), recording kicks with coalescing, dispatching runs one at a time, and the history."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from worker.db import statements
from worker.db.models import LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import (
    OPEN_RUN_STATES,
    LifecycleState,
    RunKind,
    RunState,
    SessionStatus,
    coalescing_kinds,
    is_kick_satisfied,
)
from worker.errors import Conflict
from worker.services import chats, outbox

#: The trigger of a hibernate asked for with ``force``: its claim ignores a live stream.
FORCE_TRIGGER = "force"


@dataclass
class KickResult:
    run: LifecycleRunRecord
    created: bool  # False when the kick coalesced onto an existing run
    outbox: list[OutboxRecord]


def enqueue(db: Session, session: SessionRecord, run: LifecycleRunRecord) -> OutboxRecord:
    """Mark ``run`` queued against the session's current version and write its job."""
    run.state = RunState.QUEUED
    run.issued_version = session.lifecycle_version
    run.updated_at = datetime.now(UTC)
    job = statements.job_for(
        RunKind(run.kind), run.session_id, run.id, session.lifecycle_version, session.sandbox_state
    )
    return outbox.add(db, job.task_name, job.kwargs, queue=job.queue, task_id=job.task_id)


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


def request_run(
    db: Session,
    session: SessionRecord,
    kind: RunKind,
    trigger: str,
    *,
    force: bool = False,
    force_hint: str,
) -> KickResult:
    """A kick from outside (the API, the command line), under the kick rules; the caller
    holds ``session`` locked (``FOR UPDATE``) and commits.

    An archived session refuses every kick (Conflict) but an archive while its status is
    archived: un-archive it first (status ``running``). A hibernate while a chat of the
    session holds a live stream claim is refused (Conflict, ``activeStreamId``) unless
    ``force``, which records the run with the ``force`` trigger (its claim then ignores
    the stream). ``force_hint`` tells the caller how to ask for force (``?force=true``,
    ``--force``). Then :func:`kick`."""
    if session.lifecycle_state == LifecycleState.ARCHIVED.value or (
        session.status == SessionStatus.ARCHIVED.value and kind is not RunKind.ARCHIVE
    ):
        raise Conflict("Session is archived; set status to running to unarchive it first")
    if kind is RunKind.HIBERNATE:
        if force:
            trigger = FORCE_TRIGGER
        else:
            holder = chats.session_has_live_stream(db, session.id)
            if holder is not None:
                raise Conflict(
                    f"A chat is streaming ({holder}); hibernate with {force_hint} "
                    "to stop it anyway",
                    activeStreamId=holder,
                )
    return kick(db, session, kind, trigger)


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


def history(db: Session, session_id: uuid.UUID) -> list[LifecycleRunRecord]:
    """Every run of the session, oldest first."""
    return list(
        db.scalars(
            select(LifecycleRunRecord)
            .where(LifecycleRunRecord.session_id == session_id)
            .order_by(LifecycleRunRecord.created_at, LifecycleRunRecord.id)
        )
    )
