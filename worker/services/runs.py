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
    #: The run that will do what the kick asked: new, or the open run it joined.
    #: None when nothing needs doing (the session is already there; ``reason`` says so).
    run: LifecycleRunRecord | None
    created: bool  # a new run was recorded
    outbox: list[OutboxRecord]
    #: Why no new run was recorded (None when one was).
    reason: str | None = None

    @property
    def satisfied(self) -> bool:
        """Nothing to do: the session is already where the kick would take it."""
        return self.run is None


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
    start_hint: str,
) -> KickResult:
    """A kick from outside (the API, the command line), under the kick rules; the caller
    holds ``session`` locked (``FOR UPDATE``) and commits. Every kick either records or
    joins a run that will act, or says why none is needed, or is refused saying how to
    get there (docs/architecture.md, "Kicks", has the table):

    - An archived session refuses every kick (Conflict) but an archive while its status
      is archived: un-archive it first (status ``running``). An archive kick on a
      session whose status is not ``archived`` is refused too: archiving is the status
      change (``PATCH {"status": "archived"}``), which records the run.
    - With no run open: a kick the session already satisfies (start on ``active``,
      hibernate on ``hibernated``, archive on ``archived``) records nothing and answers
      with ``reason`` (``run`` None). A hibernate, snapshot or diff on a session with no
      live sandbox (hibernated, failed, never started) is refused (Conflict with
      ``lifecycleState`` and ``resume``): its run would only be skipped. ``start_hint``
      tells the caller how to start the sandbox.
    - A hibernate while a chat of the session holds a live stream claim is refused
      (Conflict, ``activeStreamId``) unless ``force``, which records the run with the
      ``force`` trigger (its claim then ignores the stream). ``force_hint`` tells the
      caller how to ask for force (``?force=true``, ``--force``).
    - Then :func:`kick`: join an open run that covers the kick, or record a new one."""
    state = LifecycleState(session.lifecycle_state)
    if kind is RunKind.ARCHIVE:
        if state is LifecycleState.ARCHIVED:
            return KickResult(None, created=False, outbox=[], reason="the session is archived")
        if session.status != SessionStatus.ARCHIVED.value:
            raise Conflict(
                "Archiving is a status change: set status to archived "
                f'(PATCH /api/sessions/{session.id} {{"status": "archived"}})',
                lifecycleState=state.value,
            )
    elif state is LifecycleState.ARCHIVED or session.status == SessionStatus.ARCHIVED.value:
        raise Conflict("Session is archived; set status to running to unarchive it first")
    if not open_runs(db, session.id):
        if is_kick_satisfied(kind, state):
            return KickResult(None, created=False, outbox=[], reason=_SATISFIED[kind])
        if kind in _NEEDS_LIVE_SANDBOX and state is not LifecycleState.ACTIVE:
            raise Conflict(
                _no_live_sandbox(kind, state, session) + f": start the sandbox first: {start_hint}",
                lifecycleState=state.value,
                resume=f"/api/sessions/{session.id}/sandbox",
            )
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


#: Why a kick that the session already satisfies records nothing.
_SATISFIED: dict[RunKind, str] = {
    RunKind.START: "the sandbox is already running",
    RunKind.HIBERNATE: "the session is already hibernated",
    RunKind.ARCHIVE: "the session is archived",
}
#: Kicks whose run works on the live sandbox (their claim needs an active session).
_NEEDS_LIVE_SANDBOX = (RunKind.HIBERNATE, RunKind.SNAPSHOT, RunKind.DIFF)


def _no_live_sandbox(kind: RunKind, state: LifecycleState, session: SessionRecord) -> str:
    """Why a hibernate, snapshot or diff cannot act on a session in ``state``."""
    if state is LifecycleState.HIBERNATED and kind is RunKind.SNAPSHOT:
        return (
            "Session is hibernated: its sandbox is stopped and its work is in the snapshot "
            "taken when it hibernated (snapshotUrl); to take a new one"
        )
    if state is LifecycleState.HIBERNATED and kind is RunKind.DIFF:
        return (
            "Session is hibernated: its cached diff (GET /api/sessions/"
            f"{session.id}/diff) was computed when it hibernated; to recompute it"
        )
    return f"Session has no live sandbox to {kind.value} (lifecycleState {state.value})"


def kick(db: Session, session: SessionRecord, kind: RunKind, trigger: str) -> KickResult:
    """Ask for a run of ``kind``. The caller holds ``session`` locked (``FOR UPDATE``).

    Joins an open run that already covers the kick (a snapshot or diff joins an open
    hibernate or archive, which takes both), or, with none open, the last run when the
    session is already where the kick would take it. Otherwise records a new run:
    queued (with its job in the outbox) when the session is free, else pending until the
    current run finishes, so runs of one session never overlap."""
    state = LifecycleState(session.lifecycle_state)
    runs = open_runs(db, session.id)
    for run in runs:
        joined = RunKind(run.kind)
        if joined in coalescing_kinds(kind):
            if joined is kind or joined is RunKind.PROVISION:
                reason = f"a {joined.value} run is already {run.state}; the kick joins it"
            else:
                reason = (
                    f"the {joined.value} run already {run.state} takes a snapshot "
                    "and recomputes the diff"
                )
            return KickResult(run, created=False, outbox=[], reason=reason)
    if not runs and is_kick_satisfied(kind, state):
        last = db.scalars(
            select(LifecycleRunRecord)
            .where(LifecycleRunRecord.session_id == session.id)
            .order_by(LifecycleRunRecord.created_at.desc(), LifecycleRunRecord.id.desc())
            .limit(1)
        ).first()
        if last is not None:
            return KickResult(last, created=False, outbox=[], reason=_SATISFIED.get(kind))
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
