"""Executing lifecycle runs: claim -> commit -> provider work -> record (SPEC §4).

Every run follows the same three steps and never holds a transaction open across a
provider (network or git) call:

1. **claim** — one guarded ``UPDATE sessions … WHERE version = :issued AND no live lease
   AND <eligibility>`` takes the lease; commit.
2. **work** — the provider calls, idempotent so a re-run has the effect of one run.
3. **record** — a second guarded ``UPDATE … WHERE lifecycle_run_id = :run`` writes the
   outcome, bumps ``lifecycleVersion`` by exactly 1 and releases the lease; in the same
   transaction the next run (a chained start, or a pending kick) is put in the outbox.

A delivery whose version is stale or whose run no longer owns the lease does nothing.

The hot path is plain SQL, each transaction a single round trip, on one pooled
connection in autocommit that a worker keeps between its transactions and deliveries
(see :class:`_Connection`): the claim is one statement (lock the run, take the lease
under every guard, mark the run running); the record is one statement (write the
outcome, finish the run, or end it abandoned when the lease was lost; for a provision
also insert the chained start and its job), pipelined in one transaction with the
dispatch of a pending run. Provider work sees the claimed row as a :class:`SessionView`.
The rare paths (a claim that finds the session not eligible, a transient failure) run
in ORM transactions of their own, as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import psycopg
from sqlalchemy import ColumnElement, Connection, Engine, exists, func, not_, or_
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db.models import ChatRecord, LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import LifecycleState, RunKind, RunState
from worker.logging import get_logger, redact_text
from worker.providers.base import PermanentProviderError, TransientProviderError
from worker.providers.registry import Providers
from worker.routing import host_queue
from worker.services import outbox, runs
from worker.services.runs import JobRow

log = get_logger(__name__)

S = SessionRecord
ACTIVE = LifecycleState.ACTIVE.value

#: A delivery keeps its connection between its transactions unless it sat idle longer
#: than this (a long provider call): then it checks one out again, so the pool's
#: pre-ping replaces a connection the server dropped meanwhile.
CONNECTION_REUSE_SECONDS = 1.0


@dataclass
class Outcome:
    """What a delivery did. ``retry_in`` is set when the caller should retry later."""

    status: str  # succeeded | failed | skipped | retry
    reason: str = ""
    retry_in: float | None = None
    from_version: int | None = None
    to_version: int | None = None
    jobs: list[JobRow] = field(default_factory=list)
    duration: float = 0.0


@dataclass(slots=True)
class SessionView:
    """The columns of a claimed session that its run reads (``SessionRecord``'s names),
    as the claim returned them (after taking the lease)."""

    id: uuid.UUID
    lifecycle_version: int
    lifecycle_state: str
    sandbox_state: dict[str, Any]
    snapshot_url: str | None
    snapshot_created_at: datetime | None
    repo_owner: str | None
    repo_name: str | None
    branch: str | None
    clone_url: str | None


@dataclass(slots=True)
class RunView:
    """The claimed run (``LifecycleRunRecord``'s names); ``attempts`` counts this one."""

    id: uuid.UUID
    kind: str
    trigger: str
    attempts: int


class _Connection:
    """The pooled connection a worker runs its deliveries' statements on, in autocommit:
    every hot-path transaction is one statement (one round trip), or a few statements
    sent together in one pipeline between an explicit ``BEGIN`` and ``COMMIT`` (still one
    round trip; under READ COMMITTED each statement sees what committed before it ran).

    Checked out from the engine's pool and kept between transactions (and deliveries),
    except after an idle spell longer than ``CONNECTION_REUSE_SECONDS`` (a provider
    call, a quiet worker): then it goes back to the pool and a fresh one is checked out,
    pre-pinged by the pool. Never left inside a transaction. Driver errors are raised as
    SQLAlchemy's (``OperationalError`` …), a broken connection is invalidated."""

    __slots__ = ("_engine", "_pg", "_pid", "_sa", "_used")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sa: Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        self._used = 0.0
        self._pid = os.getpid()

    def usable(self) -> bool:
        """Still this process's, not closed, and not idle long enough to need a fresh
        checkout."""
        return (
            self._pid == os.getpid()
            and time.monotonic() - self._used <= CONNECTION_REUSE_SECONDS
            and (self._pg is None or not self._pg.closed)
            and (self._sa is None or not self._sa.invalidated)
        )

    def _checkout(self) -> psycopg.Connection[Any]:
        if self._pg is not None and not self.usable():
            self.close()
        if self._pg is None:
            sa = self._engine.connect()
            try:
                # Reset to the default by the pool when the connection goes back.
                sa.execution_options(isolation_level="AUTOCOMMIT")
                pg = sa.connection.driver_connection
                assert isinstance(pg, psycopg.Connection)
            except BaseException:
                sa.close()
                raise
            self._sa, self._pg = sa, pg
        return self._pg

    def execute(self, sql: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        """One statement, committed on its own."""
        pg = self._checkout()
        try:
            cur = pg.execute(sql, params)
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        self._used = time.monotonic()
        return cur

    def transaction(
        self, statements: list[tuple[str, dict[str, Any]]]
    ) -> list[psycopg.Cursor[Any]]:
        """``statements`` in one transaction, sent in one pipeline (one round trip); a
        failure rolls back all of them. Returns each statement's cursor."""
        pg = self._checkout()
        cursors = [pg.cursor() for _ in statements]
        try:
            with pg.pipeline():
                pg.execute("BEGIN")
                for cur, (sql, params) in zip(cursors, statements, strict=True):
                    cur.execute(sql, params)
                pg.execute("COMMIT")
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        self._used = time.monotonic()
        return cursors

    @contextlib.contextmanager
    def orm(self) -> Iterator[sessionmaker[Session]]:
        """ORM sessions on this connection, with ordinary transactions (the engine's
        default isolation) for the duration: for a synchronous caller (the outbox marking
        rows published), which then needs no pool checkout or ping."""
        self._checkout()
        sa = self._sa
        assert sa is not None
        sa.execution_options(isolation_level=self._engine.dialect.default_isolation_level)
        try:
            yield sessionmaker(bind=sa, expire_on_commit=False)
        finally:
            try:
                sa.execution_options(isolation_level="AUTOCOMMIT")
            except Exception:  # left inside a transaction, or broken: drop it
                self.close()

    def _failed(self, exc: psycopg.Error) -> Exception:
        """Drop the connection (invalidated when broken; any open transaction is rolled
        back by the pool) and return the error as SQLAlchemy raises it."""
        dialect = self._engine.dialect
        broken = dialect.is_disconnect(cast(Any, exc), cast(Any, self._pg), None)
        if broken and self._sa is not None:
            with contextlib.suppress(Exception):
                self._sa.invalidate(exc)
        self.close()
        return sa_exc.DBAPIError.instance(
            None, None, exc, psycopg.Error, connection_invalidated=broken, dialect=dialect
        )

    def close(self) -> None:
        sa, self._sa, self._pg = self._sa, None, None
        if sa is not None and self._pid == os.getpid():  # never a parent's, after a fork
            with contextlib.suppress(Exception):  # a broken one is invalidated by the pool
                sa.close()


@dataclass
class Claim:
    session: SessionView
    run: RunView
    db: _Connection


class Skip(Exception):
    """The claim found the session not eligible; the run ends skipped with this reason."""


def sandbox_name(session_id: uuid.UUID) -> str:
    return f"s-{session_id}"


# Runs that save snapshots, each under its own key.
SNAPSHOT_KINDS = (RunKind.HIBERNATE.value, RunKind.SNAPSHOT.value, RunKind.ARCHIVE.value)


def snapshot_key(session_id: uuid.UUID, run_id: uuid.UUID) -> str:
    return f"{session_id}-{run_id}"


def no_active_stream() -> ColumnElement[bool]:
    return not_(
        exists().where(ChatRecord.session_id == S.id, ChatRecord.active_stream_id.is_not(None))
    )


def hibernate_due(settings: Settings) -> ColumnElement[bool]:
    """``now >= min(hibernateAfter, sandboxExpiresAt - guard)`` (SPEC §4)."""
    guard = timedelta(seconds=settings.hibernate_guard_seconds)
    return or_(
        S.hibernate_after <= func.now(),
        S.sandbox_expires_at - guard <= func.now(),
    )


# ----------------------------------------------------------------- the claim statement
_NOT_ARCHIVED = "s.lifecycle_state <> 'archived'"
_NO_ACTIVE_STREAM = (
    "NOT EXISTS (SELECT 1 FROM chats c"
    " WHERE c.session_id = s.id AND c.active_stream_id IS NOT NULL)"
)
# hibernate_due(): now >= min(hibernateAfter, sandboxExpiresAt - guard).
_DUE = "(s.hibernate_after <= now() OR s.sandbox_expires_at - %(guard)s <= now())"

#: The condition, re-checked inside the claim, under which a run of each kind may go.
ELIGIBILITY: dict[RunKind, str] = {
    RunKind.PROVISION: _NOT_ARCHIVED,
    RunKind.START: f"{_NOT_ARCHIVED} AND s.status <> 'archived' AND s.provisioned_at IS NOT NULL",
    # Hibernation never while a chat streams; a sweep's run also only while still due.
    RunKind.HIBERNATE: (
        f"s.lifecycle_state = 'active' AND {_NO_ACTIVE_STREAM}"
        f" AND ((SELECT trigger FROM run) <> 'sweep' OR {_DUE})"
    ),
    RunKind.SNAPSHOT: "s.lifecycle_state = 'active'",
    RunKind.DIFF: "s.lifecycle_state = 'active'",
    # Only while archiving is still wanted (an un-archive withdraws it).
    RunKind.ARCHIVE: f"{_NOT_ARCHIVED} AND s.status = 'archived'",
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
    " repo_owner, repo_name, branch, clone_url"
)


def _claim_sql(kind: RunKind) -> str:
    """Lock the run; if it is still open, take the session's lease under every guard
    and mark the run running — one statement. Returns one row when the run exists:
    the run's state, kind and trigger, the claimed session's columns (NULL when the
    guards failed) and the run's attempts after this one."""
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
        AND {ELIGIBILITY[kind]}
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


_CLAIM_SQL = {kind: _claim_sql(kind) for kind in RunKind}

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


def _assignments(values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
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
    INSERT INTO outbox {runs.JOB_COLUMNS}
    SELECT {runs.JOB_VALUES} FROM done
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


def _record_statement(assignments: str, chain: bool) -> str:
    key = (assignments, chain)
    sql = _record_sql_cache.get(key)
    if sql is None:
        sql = _record_sql_cache[key] = _record_sql(assignments, chain)
    return sql


_CHECKPOINT_SQL = (
    "UPDATE sessions SET {}, updated_at = now() WHERE id = %(sid)s AND lifecycle_run_id = %(rid)s"
)

# A run that lost its lease before its retry ends abandoned (if it still shows running).
_ABANDON_SQL = """
UPDATE lifecycle_runs SET state = 'abandoned', error = %(error)s, to_version = NULL,
    finished_at = %(now)s, updated_at = %(now)s
WHERE id = %(rid)s AND state = 'running'
"""

# A transient failure: release the lease, showing the state from before the claim ...
_RELEASE_SQL = """
UPDATE sessions SET lifecycle_run_id = NULL, lease_expires_at = NULL,
    lifecycle_state = %(state)s, updated_at = now()
WHERE id = %(sid)s AND lifecycle_run_id = %(rid)s
"""
# ... and keep the run queued for the retry.
_REQUEUE_SQL = """
UPDATE lifecycle_runs SET state = 'queued', error = %(error)s, updated_at = %(now)s
WHERE id = %(rid)s
"""

_UNRECORDED_RUNS_SQL = """
SELECT id FROM lifecycle_runs
WHERE session_id = %(sid)s AND kind = ANY(%(kinds)s) AND state = ANY(%(ended)s)
    AND from_version IS NOT NULL
"""


def state_before_claim(kind: RunKind, snapshot_url: str | None, current: str) -> str:
    """The state a session showed before a run of ``kind`` claimed it (what releasing or
    abandoning the run restores, so that its retry's claim is eligible again)."""
    if kind is RunKind.HIBERNATE:
        return ACTIVE
    if kind is RunKind.START:
        return (
            LifecycleState.HIBERNATED.value if snapshot_url else LifecycleState.PROVISIONING.value
        )
    return current


class LifecycleService:
    """Runs lifecycle work against a database and a set of providers."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        providers: Providers,
        publisher: outbox.Publisher | None = None,
        *,
        hostname_queue: str | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.providers = providers
        self.publisher = publisher
        self.queue = hostname_queue or host_queue()
        # Deliveries run on the factory's engine directly (see _Connection).
        bind = getattr(factory, "kw", {}).get("bind")
        self.engine: Engine | None = bind if isinstance(bind, Engine) else None
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._guard = timedelta(seconds=settings.hibernate_guard_seconds)
        # The connection the last delivery used, for the next one (see _Connection).
        self._spare: _Connection | None = None
        self._spare_lock = threading.Lock()

    def _connection(self) -> _Connection:
        with self._spare_lock:
            db, self._spare = self._spare, None
        if db is not None and db.usable():
            return db
        if db is not None:
            db.close()
        if self.engine is None:
            raise TypeError("the session factory must be bound to an Engine")
        return _Connection(self.engine)

    def _release(self, db: _Connection) -> None:
        kept = False
        with self._spare_lock:
            if self._spare is None and db.usable():
                self._spare, kept = db, True
        if not kept:
            db.close()

    # ----------------------------------------------------------------- entry point
    def execute(
        self,
        kind: RunKind,
        session_id: str,
        run_id: str,
        version: int,
        *,
        task_id: str | None = None,
    ) -> Outcome:
        """Run one delivery of a lifecycle job. Never raises provider errors: the
        outcome says whether the caller should retry (and when)."""
        started = time.monotonic()
        sid, rid = uuid.UUID(session_id), uuid.UUID(run_id)
        db = self._connection()
        try:
            try:
                claim = self._claim(db, kind, sid, rid, version, task_id)
            except Skip as skip:
                return Outcome("skipped", reason=str(skip), from_version=version)
            if claim is None:
                return Outcome("skipped", reason="duplicate delivery", from_version=version)
            try:
                changes = self._work(kind, claim)
            except PermanentProviderError as exc:
                outcome = self._fail(claim, redact_text(str(exc)))
            except TransientProviderError as exc:
                outcome = self._transient(claim, redact_text(str(exc)), exc.retry_after)
            except Exception as exc:  # a bug or an unmapped error: retry a few times, then fail
                log.exception("lifecycle.unexpected_error", kind=kind.value)
                outcome = self._transient(claim, f"internal error: {type(exc).__name__}", None)
            else:
                outcome = self._succeed(kind, claim, changes)
            outcome.duration = time.monotonic() - started
            self._publish_rows(outcome.jobs, db)
        finally:
            self._release(db)
        return outcome

    # ----------------------------------------------------------------- claim
    def _claim(
        self,
        db: _Connection,
        kind: RunKind,
        sid: uuid.UUID,
        rid: uuid.UUID,
        version: int,
        task_id: str | None,
    ) -> Claim | None:
        params = {
            "sid": sid,
            "rid": rid,
            "version": version,
            "task_id": task_id,
            "lease": self._lease,
            "now": datetime.now(UTC),
        }
        if kind is RunKind.HIBERNATE:
            params["guard"] = self._guard
        claim = self._claimed(db.execute(_CLAIM_SQL[kind], params).fetchone(), rid, db)
        if claim is not False:
            return claim
        # Open but not claimed. As one transaction: lock the run and try again (things
        # may have moved since), and if the session is still not ours say why.
        with self.factory.begin() as orm:
            row = orm.connection().exec_driver_sql(_CLAIM_SQL[kind], params).first()
            claim = self._claimed(row, rid, db)
            if claim is not False:
                return claim
            run = orm.get(LifecycleRunRecord, rid)  # locked by the statement
            assert run is not None
            current = orm.get(SessionRecord, sid)
            reason = self._why_not(kind, run, current, version)
            if reason is None:
                return None  # someone holds a live lease (maybe this run): not ours to end
            self._finish_run(orm, run, RunState.SKIPPED, error=reason, to_version=None)
            if current is not None and current.lifecycle_run_id is None:
                jobs = runs.dispatch_next(orm, current)
            else:
                jobs = []
            orm.flush()
        self._publish(jobs)
        raise Skip(reason)

    @staticmethod
    def _claimed(row: Any, rid: uuid.UUID, db: _Connection) -> Claim | Literal[False] | None:
        """The claim statement's row: a Claim, None (no such run, or it is finished:
        a duplicate delivery) or False (the run is open but the session was not taken)."""
        if row is None:
            return None
        state, kind, trigger, attempts, *session = row
        if attempts is not None:
            return Claim(SessionView(*session), RunView(rid, kind, trigger, attempts), db)
        if state not in (RunState.QUEUED.value, RunState.RUNNING.value):
            return None  # already finished (or never dispatched)
        return False

    def _why_not(
        self,
        kind: RunKind,
        run: LifecycleRunRecord,
        current: SessionRecord | None,
        version: int,
    ) -> str | None:
        if current is None:
            return "session no longer exists"
        now = datetime.now(UTC)
        if (
            current.lifecycle_run_id is not None
            and current.lease_expires_at is not None
            and current.lease_expires_at >= now
        ):
            if current.lifecycle_version == version and current.lifecycle_run_id != run.id:
                # Another run holds the session; this one waits its turn (kicks never
                # queue two runs, so this is a reaper re-drive racing): leave it.
                return None
            if current.lifecycle_run_id == run.id:
                return None
        if current.lifecycle_version != version:
            return f"stale: issued against version {version}, session is at {current.lifecycle_version}"
        state = current.lifecycle_state
        if kind is RunKind.HIBERNATE:
            if state != ACTIVE:
                return f"not active (state {state})"
            return (
                "a chat has an active stream"
                if run.trigger != "sweep"
                else "not due or a chat has an active stream"
            )
        if kind in (RunKind.SNAPSHOT, RunKind.DIFF):
            return f"no live sandbox (state {state})"
        if kind is RunKind.START and current.provisioned_at is None:
            return "workspace not provisioned"
        return f"not eligible in state {state}"

    # ----------------------------------------------------------------- work
    def _work(self, kind: RunKind, claim: Claim) -> dict[str, Any]:
        s = claim.session
        if kind is RunKind.PROVISION:
            return self._provision(s)
        if kind is RunKind.START:
            return self._start(s)
        if kind is RunKind.SNAPSHOT:
            return self._capture(s, claim.run, with_diff=False)
        if kind is RunKind.DIFF:
            return self._diff(s)
        # HIBERNATE and ARCHIVE: keep the work, then stop the sandbox.
        changes = self._capture_for_rest(kind, claim)
        if changes:
            # Checkpoint the snapshot before the sandbox goes, so a crash between the
            # stop and the final record can never lose the only copy of the work.
            self._checkpoint(claim, changes)
        self.providers.sandbox.stop(sandbox_name(s.id))
        rest = LifecycleState.HIBERNATED if kind is RunKind.HIBERNATE else LifecycleState.ARCHIVED
        changes.update(lifecycle_state=rest.value, sandbox_state=self._resting_state(s))
        return changes

    def _capture_for_rest(self, kind: RunKind, claim: Claim) -> dict[str, Any]:
        s = claim.session
        if self.providers.sandbox.exists(sandbox_name(s.id)):
            return self._capture(s, claim.run, with_diff=True)
        if self._snapshot_since_start(s):
            return {}  # an earlier, interrupted attempt already saved the work
        if kind is RunKind.ARCHIVE:
            return {}  # nothing live to keep; the last snapshot (if any) stands
        raise PermanentProviderError(
            "the sandbox is not on this worker's host (it was lost or runs elsewhere); "
            "the last snapshot is kept, start the session again to restore it"
        )

    @staticmethod
    def _snapshot_since_start(s: SessionView) -> bool:
        started = (s.sandbox_state or {}).get("startedAt")
        if not s.snapshot_created_at or not started:
            return False
        return s.snapshot_created_at >= datetime.fromisoformat(started)

    def _checkpoint(self, claim: Claim, changes: dict[str, Any]) -> None:
        """Record captured work while still holding the lease (no transition, so no
        version bump); raises if the lease was lost, so nothing is stopped."""
        s = claim.session
        assignments, params = _assignments(changes)
        params.update(sid=s.id, rid=claim.run.id)
        done = claim.db.execute(_CHECKPOINT_SQL.format(assignments), params).rowcount
        if not done:
            raise TransientProviderError("lease lost while saving the snapshot")
        self._drop_superseded(claim.db, s.id, s.snapshot_url, changes.get("snapshot_url"))
        # From here on the checkpointed snapshot is the session's; don't delete it again.
        s.snapshot_url = changes.get("snapshot_url", s.snapshot_url)

    def _drop_superseded(
        self, db: _Connection, session_id: uuid.UUID, old: str | None, new: str | None
    ) -> None:
        """After ``new`` was committed as the session's snapshot: delete the one it
        replaces, and any file an abandoned run of the session saved but never recorded."""
        if not new or old == new:
            return
        try:
            for url in ([old] if old else []) + self._unrecorded_snapshots(db, session_id, new):
                self.providers.snapshots.delete(url)
        except Exception:  # a leftover file is harmless
            log.warning("lifecycle.old_snapshot_delete_failed")

    def _unrecorded_snapshots(self, db: _Connection, session_id: uuid.UUID, keep: str) -> list[str]:
        """Snapshots that earlier runs of the session may have saved without recording
        them: runs that held the lease and then ended without succeeding (a killed worker,
        a database outage between the save and its checkpoint). The re-driven run saved
        under its own key, and none of those runs can record anything any more."""
        url_for = getattr(self.providers.snapshots, "url_for", None)
        if url_for is None:
            return []
        ended = [RunState.ABANDONED.value, RunState.SKIPPED.value, RunState.FAILED.value]
        rows = db.execute(
            _UNRECORDED_RUNS_SQL,  # from_version is set: the run did claim the session
            {"sid": session_id, "kinds": list(SNAPSHOT_KINDS), "ended": ended},
        ).fetchall()
        urls = [str(url_for(snapshot_key(session_id, rid))) for (rid,) in rows]
        return [url for url in urls if url != keep]

    def _provision(self, s: SessionView) -> dict[str, Any]:
        assert s.repo_owner and s.repo_name and s.branch
        host = self.providers.repo_host
        repo = host.ensure_repo(s.repo_owner, s.repo_name)
        branch = host.ensure_branch(repo, s.branch)
        # Worth a line of its own when something was created (the run's outcome line
        # follows anyway); a re-provision of existing ones only at debug level.
        (log.info if repo.created or branch.created else log.debug)(
            "lifecycle.provisioned",
            repo_created=repo.created,
            branch_created=branch.created,
            branch_sha=branch.sha,
        )
        return {
            "clone_url": repo.clone_url,
            "provisioned_at": datetime.now(UTC),
            "is_new_branch": True,
            "lifecycle_state": LifecycleState.PROVISIONING.value,
        }

    def _start(self, s: SessionView) -> dict[str, Any]:
        name = sandbox_name(s.id)
        sandbox = self.providers.sandbox
        if s.snapshot_url:
            info = sandbox.start_from_snapshot(name, self.providers.snapshots, s.snapshot_url)
        else:
            assert s.clone_url and s.branch
            url, env = self.providers.repo_host.clone_source(s.clone_url)
            info = sandbox.start_from_clone(
                name, url, s.branch, env, base_branch=self.settings.default_branch
            )
        now = datetime.now(UTC)
        expires = now + timedelta(seconds=self.settings.max_lifetime_seconds)
        state: dict[str, Any] = {
            "type": sandbox.kind,
            "sandboxName": name,
            "expiresAt": expires.isoformat(),
            "startedAt": info.started_at.isoformat(),
            "queue": self.queue,
        }
        state.update(sandbox.state(name))
        return {
            "lifecycle_state": ACTIVE,
            "sandbox_state": state,
            "last_activity_at": now,
            "hibernate_after": now + timedelta(seconds=self.settings.idle_timeout_seconds),
            "sandbox_expires_at": expires,
        }

    def _resting_state(self, s: SessionView) -> dict[str, Any]:
        """What ``sandboxState`` keeps while no sandbox runs: only what resuming needs."""
        return {"type": self.providers.sandbox.kind, "sandboxName": sandbox_name(s.id)}

    def _require_sandbox(self, s: SessionView) -> str:
        name = sandbox_name(s.id)
        if not self.providers.sandbox.exists(name):
            raise PermanentProviderError(
                "the sandbox is not on this worker's host (it was lost or runs elsewhere); "
                "the last snapshot is kept, start the session again to restore it"
            )
        return name

    def _diff(self, s: SessionView) -> dict[str, Any]:
        name = self._require_sandbox(s)
        diff = self.providers.diff(
            self.providers.sandbox.workdir(name), self.settings.default_branch
        )
        summary = diff["summary"]
        return {
            "cached_diff": diff,
            "cached_diff_updated_at": datetime.now(UTC),
            "lines_added": int(summary["totalAdditions"]),
            "lines_removed": int(summary["totalDeletions"]),
        }

    def _capture(self, s: SessionView, run: RunView, *, with_diff: bool) -> dict[str, Any]:
        name = self._require_sandbox(s)
        changes = self._diff(s) if with_diff else {}
        # Keyed by run: a re-run of the same run overwrites the same file (one snapshot).
        info = self.providers.snapshots.save(
            snapshot_key(s.id, run.id), self.providers.sandbox.workdir(name)
        )
        changes.update(
            snapshot_url=info.url,
            snapshot_created_at=info.created_at,
            snapshot_size_bytes=info.size_bytes,
        )
        return changes

    # ----------------------------------------------------------------- record
    def _record(
        self,
        claim: Claim,
        values: dict[str, Any],
        run_state: RunState,
        error: str | None,
        chain: RunKind | None = None,
    ) -> Outcome:
        s, rid = claim.session, claim.run.id
        old_snapshot = s.snapshot_url
        # Only runs write sandbox_state, and this one holds the lease: after the update
        # it is what this run writes, else what the claim read (it routes the next job).
        sandbox_state = values.get("sandbox_state", s.sandbox_state)
        assignments, params = _assignments(values)
        now = datetime.now(UTC)
        params.update(
            sid=s.id,
            rid=rid,
            version=s.lifecycle_version,
            run_state=run_state.value,
            error=error,
            now=now,
        )
        to_version = s.lifecycle_version + 1
        job = None
        if chain is not None:
            # The chained run, queued against the version this record reaches.
            next_id = uuid.uuid4()
            job = runs.job_for(chain, s.id, next_id, to_version, sandbox_state)
            params.update(job.params(), next_id=next_id, next_kind=chain.value)
        record = _record_statement(assignments, job is not None)
        jobs: list[JobRow]
        if job is not None:
            row = claim.db.execute(record, params).fetchone()
            jobs = [job.row(row[1])] if row is not None else []
        else:
            # A pending kick goes next, if the record was made: in its own statement, so it
            # sees a kick committed while the record waited for the session's lock.
            recorded, dispatched = claim.db.transaction(
                [
                    (record, params),
                    runs.dispatch_next_statement(s.id, to_version, sandbox_state, rid),
                ]
            )
            row = recorded.fetchone()
            jobs = [(r[0], r[1], r[2], r[3]) for r in dispatched.fetchall()]
        if row is None:
            # The lease was lost (expired and reaped) while we worked: nothing was recorded
            # and the run ended abandoned; the re-driven run does the work again.
            return Outcome(
                "skipped", reason="lease lost before recording", from_version=s.lifecycle_version
            )
        assert row[0] == to_version
        self._drop_superseded(claim.db, s.id, old_snapshot, values.get("snapshot_url"))
        return Outcome(
            run_state.value,
            reason=error or "",
            from_version=s.lifecycle_version,
            to_version=to_version,
            jobs=jobs,
        )

    def _succeed(self, kind: RunKind, claim: Claim, changes: dict[str, Any]) -> Outcome:
        changes.setdefault("lifecycle_state", claim.session.lifecycle_state)
        if kind is RunKind.SNAPSHOT or kind is RunKind.DIFF:
            changes["lifecycle_state"] = ACTIVE
        changes["lifecycle_error"] = None
        chain = RunKind.START if kind is RunKind.PROVISION else None
        return self._record(claim, changes, RunState.SUCCEEDED, None, chain)

    def _fail(self, claim: Claim, message: str) -> Outcome:
        values: dict[str, Any] = {
            "lifecycle_state": LifecycleState.FAILED.value,
            "lifecycle_error": message[:2000],
        }
        return self._record(claim, values, RunState.FAILED, message[:2000])

    def _transient(self, claim: Claim, message: str, retry_after: float | None) -> Outcome:
        attempts = claim.run.attempts
        if attempts > self.settings.task_max_retries:
            return self._fail(claim, f"gave up after {attempts} attempts: {message}")
        # Release the lease (restoring the state shown before the claim) and keep the run
        # queued: kicks meanwhile go pending behind it, and the retry re-claims it.
        now = datetime.now(UTC)
        with self.factory.begin() as orm:
            conn = orm.connection()
            released = conn.exec_driver_sql(
                _RELEASE_SQL,
                {"sid": claim.session.id, "rid": claim.run.id, "state": self._state_before(claim)},
            ).rowcount
            if not released:
                lost = {"rid": claim.run.id, "error": "lease lost before retry", "now": now}
                conn.exec_driver_sql(_ABANDON_SQL, lost)
                return Outcome("skipped", reason="lease lost before retry")
            conn.exec_driver_sql(
                _REQUEUE_SQL, {"rid": claim.run.id, "error": message[:2000], "now": now}
            )
        delay = self.backoff(attempts, retry_after)
        return Outcome(
            "retry", reason=message, retry_in=delay, from_version=claim.session.lifecycle_version
        )

    def _state_before(self, claim: Claim) -> str:
        s = claim.session
        return state_before_claim(RunKind(claim.run.kind), s.snapshot_url, s.lifecycle_state)

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, never sooner than the remote asked."""
        cap = self.settings.retry_backoff_max_seconds
        base = min(cap, self.settings.retry_backoff_base_seconds * float(2 ** max(0, attempts - 1)))
        delay = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return delay

    @staticmethod
    def _finish_run(
        db: Session,
        run: LifecycleRunRecord,
        state: RunState,
        *,
        error: str | None,
        to_version: int | None = None,
    ) -> None:
        now = datetime.now(UTC)
        run.state = state.value
        run.error = error
        run.to_version = to_version
        run.finished_at = now
        run.updated_at = now

    def _publish(self, jobs: list[OutboxRecord]) -> None:
        """Publish outbox records (ORM) committed by the caller (the sweeps use it too)."""
        if jobs and self.publisher is not None:
            outbox.publish_now(self.factory, jobs, self.publisher)

    def _publish_rows(self, rows: list[JobRow], db: _Connection) -> None:
        """Publish outbox rows written with Core and committed (marking them on the
        delivery's connection)."""
        if rows and self.publisher is not None:
            with db.orm() as factory:
                outbox.publish_rows(factory, rows, self.publisher)


ServiceFactory = Callable[[], LifecycleService]
