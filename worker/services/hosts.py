"""Worker hosts: heartbeats, and what happens to a host's sessions when it is lost.

Every worker process's main process beats (``worker_hosts.last_beat_at``) every
``host_heartbeat_seconds``. The ``sweeps.lost_hosts`` sweep declares a host lost once it
has been silent for ``host_lost_after_seconds``, then, in the same transaction, sets each
session whose live sandbox was on it back to its last checkpoint:

* with a snapshot every host can read (a shared store): ``hibernated``, restorable on
  any host; ``lifecycleError`` says which host was lost, when, and that the work after the
  snapshot (taken at ...) is gone;
* otherwise (no snapshot, or one on the lost host's own disk): ``failed``, saying so; a
  start kick then begins again from the session branch.

Runs that were queued for or running on the lost host end ``failed`` with that reason
(their messages in its queue would wait forever); the recovery is recorded as a run of
its own (trigger ``host-lost``) moving the version by one, and runs kicked meanwhile
(pending) are issued again against the new version.
"""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from worker.db.models import OutboxRecord, SessionRecord
from worker.logging import get_logger
from worker.services import outbox, runs

if TYPE_CHECKING:
    from worker.services.lifecycle import LifecycleService

log = get_logger(__name__)

_BEAT = text(
    """
INSERT INTO worker_hosts (hostname, queue, state, started_at, last_beat_at)
VALUES (:hostname, :queue, 'alive', now(), now())
ON CONFLICT (hostname) DO UPDATE SET
    queue = excluded.queue,
    last_beat_at = now(),
    started_at = CASE WHEN worker_hosts.state = 'lost' THEN now()
                      ELSE worker_hosts.started_at END,
    state = 'alive',
    lost_at = NULL
"""
)

_DECLARE_LOST = text(
    """
UPDATE worker_hosts SET state = 'lost', lost_at = now()
WHERE state = 'alive' AND last_beat_at < now() - make_interval(secs => :after)
RETURNING hostname, queue, last_beat_at, lost_at
"""
)

# The host's sessions go back to their last checkpoint (see the module docstring).
_RECOVER = text(
    """
WITH hit AS (
    SELECT s.id, s.lifecycle_version, s.lifecycle_run_id,
        (s.snapshot_url IS NOT NULL AND CAST(:shared AS boolean)) AS restorable
    FROM sessions AS s
    WHERE s.sandbox_state ->> 'queue' = :queue
        AND s.lifecycle_state IN ('active', 'hibernating')
    FOR UPDATE OF s
)
UPDATE sessions AS s SET
    lifecycle_state = CASE WHEN hit.restorable THEN 'hibernated' ELSE 'failed' END,
    lifecycle_error = CASE WHEN hit.restorable THEN
        format('host %s was lost (last heard from %s); the session was set back to its '
               'snapshot of %s: work done after that snapshot is gone',
               CAST(:hostname AS text), CAST(:last_beat AS text), s.snapshot_created_at)
    ELSE
        format('host %s was lost (last heard from %s) with the only copy of this sandbox%s; '
               'start the session to begin again from its branch',
               CAST(:hostname AS text), CAST(:last_beat AS text),
               CASE WHEN s.snapshot_url IS NOT NULL
                    THEN ' (its snapshot was on that host''s disk)' ELSE '' END)
    END,
    snapshot_url = CASE WHEN hit.restorable THEN s.snapshot_url END,
    snapshot_created_at = CASE WHEN hit.restorable THEN s.snapshot_created_at END,
    snapshot_size_bytes = CASE WHEN hit.restorable THEN s.snapshot_size_bytes END,
    lifecycle_version = s.lifecycle_version + 1,
    lifecycle_run_id = NULL,
    lease_expires_at = NULL,
    sandbox_state = jsonb_build_object(
        'type', s.sandbox_state ->> 'type',
        'sandboxName', s.sandbox_state ->> 'sandboxName',
        'lostHost', CAST(:hostname AS text)
    ),
    updated_at = now()
FROM hit
WHERE s.id = hit.id
RETURNING s.id, hit.lifecycle_version, s.lifecycle_version, s.lifecycle_state,
    s.lifecycle_error
"""
)

_FAIL_HOST_RUNS = text(
    """
UPDATE lifecycle_runs SET state = 'failed', error = :reason, finished_at = now(),
    updated_at = now()
WHERE session_id = ANY(:ids) AND state IN ('queued', 'running')
"""
)

_RECORD_RECOVERY = text(
    """
INSERT INTO lifecycle_runs (id, session_id, kind, trigger, state, attempts, issued_version,
    from_version, to_version, error, created_at, started_at, finished_at, updated_at)
VALUES (:id, :sid, 'hibernate', 'host-lost', :state, 1, :from_v, :from_v, :to_v, :error,
    now(), now(), now(), now())
"""
)


def beat(db: Session, hostname: str, queue: str) -> None:
    """Record that ``hostname`` (consuming ``queue``) is alive."""
    db.execute(_BEAT, {"hostname": hostname, "queue": queue})


def recover_lost_hosts(svc: LifecycleService) -> dict[str, Any]:
    """Declare silent hosts lost and set their sessions back (one transaction a host)."""
    shared = bool(getattr(svc.providers.snapshots, "shared", False))
    hosts = sessions_total = 0
    jobs: list[OutboxRecord] = []
    with svc.factory.begin() as db:
        lost = db.execute(_DECLARE_LOST, {"after": svc.settings.host_lost_after_seconds}).all()
        for hostname, queue, last_beat, _lost_at in lost:
            recovered = db.execute(
                _RECOVER,
                {
                    "queue": queue,
                    "hostname": hostname,
                    "last_beat": last_beat.isoformat(),
                    "shared": shared,
                },
            ).all()
            ids = [row[0] for row in recovered]
            if ids:
                db.execute(_FAIL_HOST_RUNS, {"ids": ids, "reason": f"host {hostname} was lost"})
            for sid, from_v, to_v, state, error in recovered:
                db.execute(
                    _RECORD_RECOVERY,
                    {
                        "id": uuid.uuid4(),
                        "sid": sid,
                        "state": "succeeded" if state == "hibernated" else "failed",
                        "from_v": from_v,
                        "to_v": to_v,
                        "error": error,
                    },
                )
            db.execute(
                text("UPDATE worker_hosts SET sessions_recovered = :n WHERE hostname = :h"),
                {"n": len(ids), "h": hostname},
            )
            jobs += _redispatch_pending(db, ids)
            log.warning(
                "hosts.lost", host=hostname, last_beat=last_beat.isoformat(), sessions=len(ids)
            )
            hosts += 1
            sessions_total += len(ids)
    if jobs and svc.publisher is not None:
        outbox.publish_now(svc.factory, jobs, svc.publisher)
    return {"lost": hosts, "sessions": sessions_total}


def _redispatch_pending(db: Session, ids: list[uuid.UUID]) -> list[OutboxRecord]:
    """Kicks that waited behind the lost host's runs are issued again (one per session,
    the rest follow as each finishes)."""
    if not ids:
        return []
    jobs: list[OutboxRecord] = []
    for session in db.scalars(
        select(SessionRecord).where(SessionRecord.id.in_(ids)).with_for_update()
    ):
        db.refresh(session)
        jobs += runs.dispatch_next(db, session)
    return jobs


class Heartbeat:
    """Beats for this host from a daemon thread of the worker's main process, on its own
    connection-per-beat engine (the pool's forked children never share its sockets)."""

    def __init__(self, database_url: str, hostname: str, queue: str, interval: float) -> None:
        self._engine = create_engine(database_url, poolclass=NullPool)
        self._hostname, self._queue, self._interval = hostname, queue, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._engine.dispose()

    def beat_once(self) -> None:
        with Session(self._engine) as db, db.begin():
            beat(db, self._hostname, self._queue)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat_once()
            except Exception as exc:  # the database is down: beat again next time
                log.warning("hosts.beat_failed", host=self._hostname, error=type(exc).__name__)
            self._stop.wait(self._interval)


def host_rows(db: Session) -> list[dict[str, Any]]:
    """Every known host with its state and the age of its last beat (for metrics)."""
    now = datetime.now(UTC)
    rows = db.execute(
        text("SELECT hostname, state, last_beat_at, sessions_recovered FROM worker_hosts")
    ).all()
    return [
        {
            "hostname": h,
            "state": state,
            "beat_age_seconds": (now - last).total_seconds(),
            "sessions_recovered": n,
        }
        for h, state, last, n in rows
    ]
