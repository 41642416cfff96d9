"""Retention: hibernated sessions nobody touched are archived, archived ones are
emptied, on the operator's schedule or the session's own.

* **Auto-archive.** A ``hibernated`` session not archived and untouched (``updatedAt``)
  for ``autoArchiveAfterSeconds`` (the session's, else
  ``LIFECYCLE_AUTO_ARCHIVE_AFTER_SECONDS``) gets ``status = archived`` and the normal
  ``archive`` run (trigger ``retention``), exactly what ``PATCH status=archived`` does.
* **Auto-delete.** An ``archived`` session archived for ``autoDeleteAfterSeconds``
  (else ``LIFECYCLE_AUTO_DELETE_AFTER_SECONDS``) loses its data: every snapshot its runs
  saved, its sandbox directory, its cached diff and its ``sandboxState`` beyond the
  type. **What remains** is the row (id, owner, organization, title, status, branch and
  repo — the work committed to the branch is the user's, not sandbox data — line
  counts, ``deletedAt``), its run history, its chats and transcripts, and its events.
  Un-archiving it later is allowed: it becomes ``hibernated`` with no snapshot, and a
  start clones the branch afresh.

Each action appends an event with its reason (``sweep.auto_archive`` through the run's
trigger, ``sweep.auto_delete`` here) in the transaction of the change. Candidates are
taken ``FOR UPDATE SKIP LOCKED`` in bounded batches with no lease and no open run, so
the sweep is safe to run twice at once and never races a run.
"""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import text, update
from sqlalchemy.orm import Session

from worker.db.models import OutboxRecord, SessionRecord
from worker.domain.lifecycle import SNAPSHOT_KINDS, RunKind, sandbox_name, snapshot_key
from worker.logging import get_logger
from worker.services import events, runs

if TYPE_CHECKING:
    from worker.services.lifecycle import LifecycleService

log = get_logger(__name__)

_NO_OPEN_RUN = """NOT EXISTS (
    SELECT 1 FROM lifecycle_runs AS r
    WHERE r.session_id = s.id AND r.state IN ('pending', 'queued', 'running'))"""

_ARCHIVE_DUE = text(
    f"""
SELECT s.id, round(extract(epoch FROM now() - s.updated_at))::bigint,
    coalesce(s.auto_archive_after_seconds, CAST(:default AS int))
FROM sessions AS s
WHERE s.lifecycle_state = 'hibernated' AND s.status <> 'archived'
    AND s.lifecycle_run_id IS NULL
    AND s.updated_at <= now() - make_interval(
        secs => coalesce(s.auto_archive_after_seconds, CAST(:default AS int)))
    AND {_NO_OPEN_RUN}
ORDER BY s.updated_at
LIMIT :batch
FOR UPDATE OF s SKIP LOCKED
"""
)

# Archived and not emptied since (a session un-archived and archived again is emptied
# again later).
_DELETE_DUE = text(
    f"""
SELECT s.id, s.snapshot_url, round(extract(epoch FROM now() - s.archived_at))::bigint,
    coalesce(s.auto_delete_after_seconds, CAST(:default AS int))
FROM sessions AS s
WHERE s.lifecycle_state = 'archived' AND s.lifecycle_run_id IS NULL
    AND (s.deleted_at IS NULL OR s.deleted_at < s.archived_at)
    AND s.archived_at <= now() - make_interval(
        secs => coalesce(s.auto_delete_after_seconds, CAST(:default AS int)))
    AND {_NO_OPEN_RUN}
ORDER BY s.archived_at
LIMIT :batch
FOR UPDATE OF s SKIP LOCKED
"""
)

_EMPTY = text(
    """
UPDATE sessions SET snapshot_url = NULL, snapshot_created_at = NULL,
    snapshot_size_bytes = NULL, cached_diff = NULL, cached_diff_updated_at = NULL,
    sandbox_state = jsonb_build_object('type', sandbox_state ->> 'type', 'deleted', true),
    deleted_at = now(), updated_at = now()
WHERE id = :id
"""
)

_SNAPSHOT_RUNS = text(
    "SELECT id FROM lifecycle_runs WHERE session_id = :id AND kind = ANY(:kinds)"
    " AND from_version IS NOT NULL"
)


def set_overrides(
    db: Session, session: SessionRecord, archive_after: int | None, delete_after: int | None
) -> None:
    """The session's own retention (None: leave as is), in the caller's transaction."""
    values: dict[str, Any] = {}
    if archive_after is not None:
        values["auto_archive_after_seconds"] = session.auto_archive_after_seconds = archive_after
    if delete_after is not None:
        values["auto_delete_after_seconds"] = session.auto_delete_after_seconds = delete_after
    if values:  # a change like any other: it touches the session
        values["updated_at"] = session.updated_at = datetime.now(UTC)
        db.execute(update(SessionRecord).where(SessionRecord.id == session.id).values(**values))


def sweep(svc: LifecycleService) -> dict[str, Any]:
    """One pass of both rules (the beat task ``sweeps.retention``)."""
    return {"archived": auto_archive(svc), "deleted": auto_delete(svc)}


def auto_archive(svc: LifecycleService) -> int:
    default = svc.settings.auto_archive_after_seconds
    jobs: list[OutboxRecord] = []
    with svc.factory.begin() as db:
        due = db.execute(
            _ARCHIVE_DUE, {"default": default, "batch": svc.settings.sweep_batch_size}
        ).all()
        now = datetime.now(UTC)
        for sid, untouched, limit in due:
            session = db.get(SessionRecord, sid)
            assert session is not None  # locked by the query
            session.status = "archived"
            session.archived_at = session.updated_at = now
            run = runs.new_run(db, session, RunKind.ARCHIVE, "retention")
            run.reason = (
                f"auto-archive: hibernated and untouched for {untouched} s (limit {limit} s)"
            )
            jobs.append(runs.enqueue(db, session, run))
        db.flush()
    svc._publish(jobs)
    if due:
        log.info("retention.archived", sessions=len(due))
    return len(due)


def auto_delete(svc: LifecycleService) -> int:
    default = svc.settings.auto_delete_after_seconds
    emptied: list[tuple[uuid.UUID, list[str]]] = []
    with svc.factory.begin() as db:
        due = db.execute(
            _DELETE_DUE, {"default": default, "batch": svc.settings.sweep_batch_size}
        ).all()
        for sid, snapshot_url, archived_for, limit in due:
            urls = _snapshots_of(db, svc, sid, snapshot_url)
            db.execute(_EMPTY, {"id": sid})
            session = db.get(SessionRecord, sid)
            assert session is not None
            events.append(
                db,
                "sweep.auto_delete",
                session=session,
                reason=(
                    f"auto-delete: archived for {archived_for} s (limit {limit} s); "
                    "its snapshots and sandbox data deleted"
                ),
            )
            emptied.append((sid, urls))
    # After the commit: the row never points at a deleted file; a crash here leaves at
    # worst files nobody references.
    for sid, urls in emptied:
        for url in urls:
            with contextlib.suppress(Exception):
                svc.providers.snapshots.delete(url)
        with contextlib.suppress(Exception):
            svc.providers.sandbox.stop(sandbox_name(sid))
    if emptied:
        log.info("retention.deleted", sessions=len(emptied))
    return len(emptied)


def _snapshots_of(
    db: Session, svc: LifecycleService, sid: uuid.UUID, current: str | None
) -> list[str]:
    """Every snapshot the session may have: the current one and each snapshot-taking
    run's key (a superseded or unrecorded one may still be there)."""
    urls = [current] if current else []
    url_for = getattr(svc.providers.snapshots, "url_for", None)
    if url_for is not None:
        for (rid,) in db.execute(_SNAPSHOT_RUNS, {"id": sid, "kinds": list(SNAPSHOT_KINDS)}):
            url = str(url_for(snapshot_key(sid, rid)))
            if url not in urls:
                urls.append(url)
    return urls
