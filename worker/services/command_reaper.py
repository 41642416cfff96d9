"""Commands left ``running`` (or ``queued``) when the worker that had them is gone.

A command is at most once: lost with its worker, it is never run again — but its row
would say ``running`` forever, and a client streaming its output would wait forever.
This sweep ends such rows ``failed``, saying why, in one statement per case:

* ``running`` on a host the ``lost_hosts`` sweep declared lost (``worker_hosts``);
* ``running`` past its wall time plus ``command_reap_grace_seconds``: a live worker's
  watchdog ends every command at its wall time, so a row still running well after it
  belongs to a worker that died (or lost its database) without saying so;
* ``queued`` for longer than the grace while its session is no longer active: its
  sandbox stopped (or its host was lost) before any worker claimed it, and its message,
  if it ever arrives, finds nothing to run;
* ``waiting`` (``autoResume``) for longer than the grace while its session is not active
  and no run that would start it is open: the start it waited for ended without making
  the sandbox active and without failing (skipped, say, because the session was
  archived meanwhile). A failed start fails its waiting commands itself.

A worker that was merely slow and records its outcome afterwards overwrites the
``failed`` with what really happened. The same sweep deletes file operations no API
process came back for (:func:`worker.services.files.purge_stale`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from worker.logging import get_logger
from worker.services import files

if TYPE_CHECKING:
    from worker.services.lifecycle import LifecycleService

log = get_logger(__name__)

# The values of a command's environment go when it ends; only the names stay.
_ENDED = """
    status = 'failed', error = {reason}, finished_at = now(), stdin = NULL,
    env = (SELECT coalesce(jsonb_object_agg(k, NULL), '{{}}'::jsonb)
           FROM jsonb_object_keys(c.env) AS k)
"""

_LOST_HOST = text(
    "UPDATE commands AS c SET "
    + _ENDED.format(reason="format('its worker host %s was lost while it ran', c.host)")
    + """
    FROM worker_hosts AS h
    WHERE c.status = 'running' AND h.hostname = c.host AND h.state = 'lost'
    RETURNING c.id
    """
)

_PAST_DEADLINE = text(
    "UPDATE commands AS c SET "
    + _ENDED.format(
        reason="format('still running %s s after its wall time of %s s on host %s: its worker "
        "was lost', CAST(:grace_text AS text), c.timeout_seconds, c.host)"
    )
    + """
    WHERE c.status = 'running'
      AND c.started_at + make_interval(secs => c.timeout_seconds + :grace) < now()
    RETURNING c.id
    """
)

_QUEUED_ORPHANS = text(
    "UPDATE commands AS c SET "
    + _ENDED.format(
        reason="format('its sandbox stopped (%s) before any worker ran it', s.lifecycle_state)"
    )
    + """
    FROM sessions AS s
    WHERE c.status = 'queued' AND s.id = c.session_id AND s.lifecycle_state <> 'active'
      AND c.created_at < now() - make_interval(secs => :grace)
    RETURNING c.id
    """
)


_WAITING_ORPHANS = text(
    "UPDATE commands AS c SET "
    + _ENDED.format(
        reason="format('the sandbox it waited for did not start (the session is %s)', "
        "s.lifecycle_state)"
    )
    + """
    FROM sessions AS s
    WHERE c.status = 'waiting' AND s.id = c.session_id AND s.lifecycle_state <> 'active'
      AND c.created_at < now() - make_interval(secs => :grace)
      AND NOT EXISTS (
          SELECT 1 FROM lifecycle_runs AS r
          WHERE r.session_id = s.id AND r.kind IN ('provision', 'start')
            AND r.state IN ('pending', 'queued', 'running'))
    RETURNING c.id
    """
)


def reap_commands(svc: LifecycleService) -> dict[str, Any]:
    """End the commands no worker will ever finish; purge abandoned file operations."""
    grace = svc.settings.command_reap_grace_seconds
    with svc.factory.begin() as db:
        lost = len(db.execute(_LOST_HOST).all())
        overdue = len(
            db.execute(_PAST_DEADLINE, {"grace": grace, "grace_text": f"{grace:g}"}).all()
        )
        orphaned = len(db.execute(_QUEUED_ORPHANS, {"grace": grace}).all())
        stranded = len(db.execute(_WAITING_ORPHANS, {"grace": grace}).all())
        purged = files.purge_stale(db)
    if lost or overdue or orphaned or stranded:
        log.warning(
            "sandbox.commands_reaped",
            lost_host=lost,
            past_deadline=overdue,
            queued=orphaned,
            waiting=stranded,
        )
    return {
        "lost_host": lost,
        "past_deadline": overdue,
        "queued_orphans": orphaned,
        "waiting_orphans": stranded,
        "file_ops_purged": purged,
    }
