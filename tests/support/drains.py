"""Deliveries without a worker: find the job a worker would receive for a session's
queued run and run it through ``LifecycleService.execute``, one at a time."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import select

from worker.db.models import LifecycleRunRecord
from worker.domain.lifecycle import RunKind
from worker.services.lifecycle import LifecycleService, Outcome

#: A job as a worker receives it: ``kind`` plus the task's keyword arguments.
Job = dict[str, Any]


def next_job(svc: LifecycleService, sid: uuid.UUID) -> Job | None:
    """The newest queued run's job for the session, as a worker would receive it."""
    with svc.factory() as db:
        run = db.scalars(
            select(LifecycleRunRecord)
            .where(LifecycleRunRecord.session_id == sid, LifecycleRunRecord.state == "queued")
            .order_by(LifecycleRunRecord.created_at.desc())
        ).first()
        if run is None:
            return None
        return {
            "kind": RunKind(run.kind),
            "session_id": str(sid),
            "run_id": str(run.id),
            "version": run.issued_version,
        }


def deliver(svc: LifecycleService, job: Job) -> Outcome:
    """One delivery of ``job`` (which is left as it was, to deliver again)."""
    kwargs = dict(job)
    return svc.execute(kwargs.pop("kind"), **kwargs)


def drain(svc: LifecycleService, sid: uuid.UUID, limit: int = 20) -> list[str]:
    """Deliver the session's queued jobs until none is left (at most ``limit``); the
    outcomes' statuses in order."""
    outcomes: list[str] = []
    for _ in range(limit):
        job = next_job(svc, sid)
        if job is None:
            break
        outcomes.append(deliver(svc, job).status)
    return outcomes
