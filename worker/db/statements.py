"""The hot path's raw statements, and the one writer of a run's job.

A run's job (task name, kwargs, task id, queue) is built by :func:`job_for` alone; every
statement that queues a run writes that job into the outbox from :meth:`Job.params`
(create, a run's record with a chained run, the sweep) or, where the run is only chosen
inside the statement (dispatching the next pending run), from :data:`JOB_PAYLOAD_SQL`,
the same payload rendered in SQL (a test holds the two equal).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Integer, text
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.dialects.postgresql import UUID as PG_UUID

from worker.db.models import SessionRecord
from worker.domain.lifecycle import RunKind
from worker.routing import queue_for
from worker.task_names import TASK_FOR_KIND

#: How long a writer keeps a fresh job claimed for its own publishing after commit
#: before the relay may take it.
CLAIM_SECONDS = 30.0

#: A job written to the outbox, as ``outbox.publish_rows`` takes it:
#: ``(outbox id, task name, payload, queue)``.
JobRow = tuple[int, str, dict[str, Any], str | None]


def job_kwargs(
    session_id: uuid.UUID | str, run_id: uuid.UUID | str, version: int
) -> dict[str, Any]:
    """The arguments of every lifecycle task: which run of which session, issued against
    which ``lifecycleVersion``."""
    return {"session_id": str(session_id), "run_id": str(run_id), "version": version}


#: :func:`job_kwargs` rendered in SQL over the expressions ``:sid``, ``<run>.id`` and
#: ``:version`` (for the one statement that chooses its run itself).
JOB_PAYLOAD_SQL = """jsonb_build_object(
    'kwargs', jsonb_build_object(
        'session_id', %(sid)s::text, 'run_id', {run_id}::text, 'version', %(version)s::int
    ),
    'task_id', gen_random_uuid()::text
)"""


@dataclass(frozen=True, slots=True)
class Job:
    """A run's job before it is written to the outbox (claimed for publishing right
    after commit)."""

    task_name: str
    kwargs: dict[str, Any]
    task_id: str
    queue: str

    @property
    def payload(self) -> dict[str, Any]:
        """The outbox row's ``payload`` column."""
        return {"kwargs": self.kwargs, "task_id": self.task_id}

    def params(self) -> dict[str, Any]:
        """The parameters of :data:`JOB_COLUMNS` / :data:`JOB_VALUES`."""
        now = datetime.now(UTC)
        return {
            "job_task": self.task_name,
            "job_payload": json.dumps(self.payload),
            "job_queue": self.queue,
            "job_now": now,
            "job_claimed_until": claimed_until(now),
        }

    def row(self, outbox_id: int) -> JobRow:
        return (outbox_id, self.task_name, self.payload, self.queue)


def claimed_until(now: datetime) -> datetime:
    return now + timedelta(seconds=CLAIM_SECONDS)


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
    """The job of run ``run_id`` issued against ``version``: the one builder of a job."""
    return Job(
        TASK_FOR_KIND[kind],
        job_kwargs(session_id, run_id, version),
        str(uuid.uuid4()),
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
    SELECT t.task_name, {JOB_PAYLOAD_SQL.format(run_id="next.id")}, t.queue, %(job_now)s, %(job_claimed_until)s, 0
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
        "job_claimed_until": claimed_until(now),
    }
    for kind in RunKind:
        params[f"kind_{kind.value}"] = kind.value
        params[f"task_{kind.value}"] = TASK_FOR_KIND[kind]
        params[f"queue_{kind.value}"] = queue_for(kind, sandbox_state)
    return _DISPATCH_NEXT, params


# The session, its first chat, its provision run (queued against version 0, as
# runs.new_run + runs.enqueue would write it) and the run's outbox job, claimed for
# publishing right after commit (as outbox.add(claim=True) would write it). In the
# driver's parameter style: the create sends it without SQLAlchemy's statement layer.
CREATE_SESSION = f"""
WITH s AS (
    INSERT INTO sessions (id, user_id, organization_id, artist_id, title, title_generated,
        status, is_new_branch, global_skill_refs, lifecycle_state, lifecycle_version,
        repo_owner, repo_name, branch, clone_url, sandbox_state, lines_added, lines_removed,
        idle_timeout_seconds, max_lifetime_seconds, created_at, updated_at)
    VALUES (%(id)s, %(user_id)s, %(organization_id)s, %(artist_id)s, %(title)s, %(title_generated)s,
        %(status)s, %(is_new_branch)s, '[]'::jsonb, %(lifecycle_state)s, %(lifecycle_version)s,
        %(repo_owner)s, %(repo_name)s, %(branch)s, %(clone_url)s, %(sandbox_state)s::jsonb,
        %(lines_added)s, %(lines_removed)s, %(idle_timeout_seconds)s, %(max_lifetime_seconds)s,
        %(created_at)s, %(updated_at)s)
    ON CONFLICT (user_id, title) WHERE title_generated DO NOTHING
    RETURNING id
), c AS (
    INSERT INTO chats (id, session_id, title, model_id, created_at, updated_at)
    SELECT %(chat_id)s, s.id, 'New chat', %(model_id)s, %(created_at)s, %(created_at)s FROM s
), r AS (
    INSERT INTO lifecycle_runs (id, session_id, kind, trigger, state, attempts,
        issued_version, created_at, updated_at)
    SELECT %(run_id)s, s.id, 'provision', 'create', 'queued', 0, %(lifecycle_version)s,
        %(created_at)s, %(created_at)s FROM s
)
INSERT INTO outbox {JOB_COLUMNS}
SELECT {JOB_VALUES} FROM s
RETURNING id
"""


# ----------------------------------------------------------------- the claim statement
_NOT_ARCHIVED = "s.lifecycle_state <> 'archived'"
#: A stream claim holds while it is set and not expired (a claim without a TTL holds
#: until released); the partial index ``ix_chats_active_stream`` serves it.
LIVE_STREAM = (
    "c.active_stream_id IS NOT NULL"
    " AND (c.stream_expires_at IS NULL OR c.stream_expires_at > now())"
)
_NO_ACTIVE_STREAM = (
    f"NOT EXISTS (SELECT 1 FROM chats c WHERE c.session_id = s.id AND {LIVE_STREAM})"
)
#: The one due rule (SPEC §4, ``domain.lifecycle.hibernate_due_at`` in Python): a session
#: is due when now >= min(hibernateAfter, sandboxExpiresAt - guard). ``{guard}`` is the
#: guard's placeholder in the statement's parameter style.
DUE_RULE = "(s.hibernate_after <= now() OR s.sandbox_expires_at - {guard} <= now())"
_DUE = DUE_RULE.format(guard="%(guard)s")

#: The condition, re-checked inside the claim, under which a run of each kind may go.
ELIGIBILITY: dict[RunKind, str] = {
    RunKind.PROVISION: _NOT_ARCHIVED,
    RunKind.START: f"{_NOT_ARCHIVED} AND s.status <> 'archived' AND s.provisioned_at IS NOT NULL",
    # Hibernation never while a chat streams (unless forced); a sweep's run also only
    # while still due.
    RunKind.HIBERNATE: (
        f"s.lifecycle_state = 'active'"
        f" AND ((SELECT trigger FROM run) = 'force' OR {_NO_ACTIVE_STREAM})"
        f" AND ((SELECT trigger FROM run) <> 'sweep' OR {_DUE})"
    ),
    RunKind.SNAPSHOT: "s.lifecycle_state = 'active'",
    RunKind.DIFF: "s.lifecycle_state = 'active'",
    # Only while archiving is still wanted (an un-archive withdraws it).
    RunKind.ARCHIVE: f"{_NOT_ARCHIVED} AND s.status = 'archived'",
}

#: The active-sandbox cap, checked inside the claim of the kinds that start a sandbox:
#: ``lifecycle_sandbox_usage`` (migration 0013) locks the session and its quota account
#: and counts the account's other sessions holding a sandbox, with a snapshot taken after
#: the lock, so concurrent claims of one account are decided one after another. NULL cap
#: (no limit) or an already active session passes. ``%(max_active)s`` is the operator's
#: default cap.
QUOTA_GUARD: dict[RunKind, str] = {
    kind: "(SELECT u.current < u.cap IS NOT FALSE"
    " FROM lifecycle_sandbox_usage(s.id, %(max_active)s) AS u)"
    for kind in (RunKind.PROVISION, RunKind.START)
}

#: The state the session shows while the run holds its lease.
CLAIM_STATE: dict[RunKind, str] = {
    RunKind.PROVISION: "'provisioning'",
    # A start restores when there is a snapshot to restore; else it clones afresh.
    RunKind.START: "CASE WHEN s.snapshot_url IS NOT NULL THEN 'restoring' ELSE 'provisioning' END",
    RunKind.HIBERNATE: "'hibernating'",
    RunKind.SNAPSHOT: "s.lifecycle_state",
    RunKind.DIFF: "s.lifecycle_state",
    RunKind.ARCHIVE: "s.lifecycle_state",
}

_VIEW_COLUMNS = (
    "id, lifecycle_version, lifecycle_state, sandbox_state, snapshot_url, snapshot_created_at,"
    " repo_owner, repo_name, branch, clone_url, idle_timeout_seconds, max_lifetime_seconds"
)


def _claim_sql(kind: RunKind) -> str:
    """Lock the run; if it is still open, take the session's lease under every guard
    and mark the run running — one statement. Returns one row when the run exists:
    the run's state, kind and trigger, the claimed session's columns (NULL when the
    guards failed) and the run's attempts after this one."""
    quota = f"\n        AND {QUOTA_GUARD[kind]}" if kind in QUOTA_GUARD else ""
    return f"""
WITH run AS (
    SELECT state, kind, trigger FROM lifecycle_runs
    WHERE id = %(rid)s AND session_id = %(sid)s
    FOR UPDATE
), claimed AS (
    UPDATE sessions AS s SET
        lifecycle_run_id = %(rid)s,
        lease_expires_at = now() + %(lease)s,
        lifecycle_state = {CLAIM_STATE[kind]},
        updated_at = now()
    WHERE s.id = %(sid)s
        AND s.lifecycle_version = %(version)s
        AND (s.lifecycle_run_id IS NULL OR s.lease_expires_at < now())
        AND EXISTS (SELECT 1 FROM run WHERE run.state IN ('queued', 'running'))
        AND {ELIGIBILITY[kind]}{quota}
    RETURNING {_VIEW_COLUMNS}
), started AS (
    UPDATE lifecycle_runs SET
        state = 'running',
        attempts = attempts + 1,
        task_id = %(task_id)s,
        from_version = %(version)s,
        started_at = coalesce(started_at, %(now)s),
        updated_at = %(now)s
    WHERE id = %(rid)s AND EXISTS (SELECT 1 FROM claimed)
    RETURNING attempts
)
SELECT run.state, run.kind, run.trigger, started.attempts,
    claimed.{_VIEW_COLUMNS.replace(", ", ", claimed.")}
FROM run LEFT JOIN claimed ON true LEFT JOIN started ON true
"""


CLAIM_SQL = {kind: _claim_sql(kind) for kind in RunKind}

# ----------------------------------------------------------------- the record statement
# Columns a run's outcome may write, and which of them are JSON.
_RECORDABLE = frozenset(c.name for c in SessionRecord.__table__.columns) - {
    "id",
    "lifecycle_version",
    "lifecycle_run_id",
    "lease_expires_at",
    "updated_at",
}
_JSON_COLUMNS = frozenset({"sandbox_state", "cached_diff", "global_skill_refs"})


def assignments(values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``SET`` assignments (``col = %(v_col)s``) and their parameters for ``values``."""
    params: dict[str, Any] = {}
    sets = []
    for col, value in values.items():
        if col not in _RECORDABLE:
            raise ValueError(f"not a recordable session column: {col!r}")
        if col in _JSON_COLUMNS:
            sets.append(f"{col} = %(v_{col})s::jsonb")
            params[f"v_{col}"] = None if value is None else json.dumps(value)
        else:
            sets.append(f"{col} = %(v_{col})s")
            params[f"v_{col}"] = value
    return ", ".join(sets), params


def _record_sql(assignments: str, chain: bool) -> str:
    """Write the outcome under the lease guard (bumping the version by 1, releasing the
    lease) and finish the run — one statement, returning the new version (no row when
    the lease was lost: then the run ends abandoned). With ``chain`` also the chained
    run, queued against the new version, and its job in the outbox (returning the job's
    id)."""
    chained = (
        f""", chained AS (
    INSERT INTO lifecycle_runs (id, session_id, kind, trigger, state, attempts,
        issued_version, created_at, updated_at)
    SELECT %(next_id)s, %(sid)s, %(next_kind)s, 'chain', 'queued', 0,
        done.lifecycle_version, %(now)s, %(now)s
    FROM done
), job AS (
    INSERT INTO outbox {JOB_COLUMNS}
    SELECT {JOB_VALUES} FROM done
    RETURNING id
)"""
        if chain
        else ""
    )
    return f"""
WITH done AS (
    UPDATE sessions SET {assignments},
        lifecycle_version = lifecycle_version + 1,
        lifecycle_run_id = NULL,
        lease_expires_at = NULL,
        updated_at = now()
    WHERE id = %(sid)s AND lifecycle_run_id = %(rid)s AND lifecycle_version = %(version)s
    RETURNING lifecycle_version
), finished AS (
    UPDATE lifecycle_runs SET
        state = %(run_state)s,
        error = %(error)s,
        to_version = done.lifecycle_version,
        finished_at = %(now)s,
        updated_at = %(now)s
    FROM done
    WHERE lifecycle_runs.id = %(rid)s
), abandoned AS (
    -- The lease was lost: the run ends abandoned (if it still shows running).
    UPDATE lifecycle_runs SET
        state = 'abandoned',
        error = 'lease lost before recording',
        to_version = NULL,
        finished_at = %(now)s,
        updated_at = %(now)s
    WHERE id = %(rid)s AND state = 'running' AND NOT EXISTS (SELECT 1 FROM done)
){chained}
SELECT done.lifecycle_version{", (SELECT id FROM job)" if chain else ""} FROM done
"""


_record_sql_cache: dict[tuple[str, bool], str] = {}


def record_statement(assignments: str, chain: bool) -> str:
    key = (assignments, chain)
    sql = _record_sql_cache.get(key)
    if sql is None:
        sql = _record_sql_cache[key] = _record_sql(assignments, chain)
    return sql


CHECKPOINT_SQL = (
    "UPDATE sessions SET {}, updated_at = now() WHERE id = %(sid)s AND lifecycle_run_id = %(rid)s"
)

# A run that lost its lease before its retry ends abandoned (if it still shows running).
ABANDON_SQL = """
UPDATE lifecycle_runs SET state = 'abandoned', error = %(error)s, to_version = NULL,
    finished_at = %(now)s, updated_at = %(now)s
WHERE id = %(rid)s AND state = 'running'
"""

# A transient failure: release the lease, showing the state from before the claim ...
RELEASE_SQL = """
UPDATE sessions SET lifecycle_run_id = NULL, lease_expires_at = NULL,
    lifecycle_state = %(state)s, updated_at = now()
WHERE id = %(sid)s AND lifecycle_run_id = %(rid)s
"""
# ... and keep the run queued for the retry.
REQUEUE_SQL = """
UPDATE lifecycle_runs SET state = 'queued', error = %(error)s, updated_at = %(now)s
WHERE id = %(rid)s
"""

UNRECORDED_RUNS_SQL = """
SELECT id FROM lifecycle_runs
WHERE session_id = %(sid)s AND kind = ANY(%(kinds)s) AND state = ANY(%(ended)s)
    AND from_version IS NOT NULL
"""


# ----------------------------------------------------------------- the idle sweep
#: Active, unleased, due sessions with no streaming chat and no open run, oldest due
#: first, locked for queueing hibernate runs (``:guard``, ``:batch``).
DUE_CANDIDATES = text(
    f"""
SELECT s.id, s.lifecycle_version, s.sandbox_state FROM sessions AS s
WHERE s.lifecycle_state = 'active'
    -- the index condition (a superset, exact for the guard-free part) ...
    AND least(s.hibernate_after, s.sandbox_expires_at) <= now() + :guard
    -- ... and the precise rule
    AND {DUE_RULE.format(guard=":guard")}
    AND s.lifecycle_run_id IS NULL
    AND {_NO_ACTIVE_STREAM}
    -- OFFSET 0 keeps this a per-candidate probe of ix_lifecycle_runs_open: as an anti
    -- join, with statistics that predate the sweep's own runs (a few open runs), the
    -- planner materialised every open run and compared each candidate with all of
    -- them, so each batch rescanned the ones before it (91 ms for the fifth batch of
    -- 200, against 4 ms probing).
    AND NOT EXISTS (
        SELECT 1 FROM lifecycle_runs AS r
        WHERE r.session_id = s.id AND r.state IN ('pending', 'queued', 'running')
        OFFSET 0
    )
ORDER BY least(s.hibernate_after, s.sandbox_expires_at)
LIMIT :batch
FOR UPDATE OF s SKIP LOCKED
"""
).columns(id=PG_UUID(as_uuid=True), lifecycle_version=Integer, sandbox_state=JSONB)


#: Active, unleased sandboxes with activity since their last snapshot, whose last
#: snapshot (or start) is older than ``:interval``, with no open run (``:batch``).
CHECKPOINT_CANDIDATES = text(
    """
SELECT s.id, s.lifecycle_version, s.sandbox_state FROM sessions AS s
WHERE s.lifecycle_state = 'active'
    AND s.lifecycle_run_id IS NULL
    AND s.last_activity_at > coalesce(s.snapshot_created_at, '-infinity'::timestamptz)
    AND coalesce(
        s.snapshot_created_at, (s.sandbox_state ->> 'startedAt')::timestamptz, s.last_activity_at
    ) <= now() - :interval
    AND NOT EXISTS (
        SELECT 1 FROM lifecycle_runs AS r
        WHERE r.session_id = s.id AND r.state IN ('pending', 'queued', 'running')
    )
ORDER BY s.snapshot_created_at NULLS FIRST
LIMIT :batch
FOR UPDATE OF s SKIP LOCKED
"""
).columns(id=PG_UUID(as_uuid=True), lifecycle_version=Integer, sandbox_state=JSONB)
