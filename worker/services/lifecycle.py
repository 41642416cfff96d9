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
(see :class:`KeptConnection`): the claim is one statement (lock the run, take the lease
under every guard, mark the run running); the record is one statement (write the
outcome, finish the run, or end it abandoned when the lease was lost; for a provision
also insert the chained start and its job), pipelined in one transaction with the
dispatch of a pending run. Provider work sees the claimed row as a :class:`SessionView`.
The rare paths (a claim that finds the session not eligible, a transient failure) run
in ORM transactions of their own, as before.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import structlog
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db import statements
from worker.db.connection import KeptConnection
from worker.db.models import LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.db.statements import JobRow
from worker.domain.lifecycle import (
    SNAPSHOT_KINDS,
    LifecycleState,
    OutcomeStatus,
    RunKind,
    RunState,
    backoff_delay,
    sandbox_name,
    snapshot_key,
    state_before_claim,
)
from worker.logging import get_logger, redact_text
from worker.providers.base import PermanentProviderError, TransientProviderError
from worker.providers.broker import Publisher
from worker.providers.registry import Providers
from worker.routing import host_queue
from worker.services import commands, outbox, quotas, runs
from worker.services.sandbox_work import SandboxWork
from worker.task_names import DEFAULT_QUEUE, TASK_START

log = get_logger(__name__)

S = SessionRecord
ACTIVE = LifecycleState.ACTIVE.value
#: Runs that start a sandbox: when one fails, the commands waiting for it fail too.
_STARTS = (RunKind.START.value, RunKind.PROVISION.value)


@dataclass
class Outcome:
    """What a delivery did. ``retry_in`` is set when the caller should retry later."""

    status: OutcomeStatus
    reason: str = ""
    retry_in: float | None = None
    from_version: int | None = None
    to_version: int | None = None
    jobs: list[JobRow] = field(default_factory=list)
    duration: float = 0.0
    # The chained start this delivery ran itself (see LifecycleService._run_here).
    followed: Outcome | None = None


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
    idle_timeout_seconds: int | None = None
    max_lifetime_seconds: int | None = None


@dataclass(slots=True)
class RunView:
    """The claimed run (``LifecycleRunRecord``'s names); ``attempts`` counts this one."""

    id: uuid.UUID
    kind: str
    trigger: str
    attempts: int


@dataclass
class Claim:
    session: SessionView
    run: RunView
    db: KeptConnection


class Skip(Exception):
    """The claim found the session not eligible; the run ends skipped with this reason."""


class Refused(Exception):
    """The claim of a provision or start found the account's active-sandbox cap full:
    the run ended failed with this reason (and the session's ``lifecycleError``)."""

    def __init__(self, reason: str, from_version: int, to_version: int) -> None:
        super().__init__(reason)
        self.from_version = from_version
        self.to_version = to_version


class LifecycleService:
    """Runs lifecycle work against a database and a set of providers."""

    def __init__(
        self,
        settings: Settings,
        factory: sessionmaker[Session],
        providers: Providers,
        publisher: Publisher | None = None,
        *,
        hostname_queue: str | None = None,
    ) -> None:
        self.settings = settings
        self.factory = factory
        self.providers = providers
        self.publisher = publisher
        self.queue = hostname_queue or host_queue()
        self.work = SandboxWork(settings, providers, self.queue)
        # Deliveries run on the factory's engine directly (see KeptConnection).
        bind = getattr(factory, "kw", {}).get("bind")
        self.engine: Engine | None = bind if isinstance(bind, Engine) else None
        self._lease = timedelta(seconds=settings.lease_seconds)
        self._guard = timedelta(seconds=settings.hibernate_guard_seconds)
        # The connection the last delivery used, for the next one (see KeptConnection).
        self._spare: KeptConnection | None = None
        self._spare_lock = threading.Lock()

    def _connection(self) -> KeptConnection:
        with self._spare_lock:
            db, self._spare = self._spare, None
        if db is not None and db.usable():
            return db
        if db is not None:
            db.close()
        if self.engine is None:
            raise TypeError("the session factory must be bound to an Engine")
        return KeptConnection(self.engine)

    @property
    def kept_connection(self) -> KeptConnection | None:
        """The connection the last delivery kept for the next one, or None when it went
        back to the pool (read-only: for tests and diagnostics to observe it)."""
        return self._spare

    def _release(self, db: KeptConnection) -> None:
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
        here: JobRow | None = None
        try:
            try:
                claim = self._claim(db, kind, sid, rid, version, task_id)
            except Skip as skip:
                return Outcome(OutcomeStatus.SKIPPED, reason=str(skip), from_version=version)
            except Refused as refused:
                return Outcome(
                    OutcomeStatus.FAILED,
                    reason=str(refused),
                    from_version=refused.from_version,
                    to_version=refused.to_version,
                    duration=time.monotonic() - started,
                )
            if claim is None:
                return Outcome(
                    OutcomeStatus.SKIPPED, reason="duplicate delivery", from_version=version
                )
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
            here = self._chained_here(outcome)
            self._publish_rows([job for job in outcome.jobs if job is not here], db)
        finally:
            self._release(db)
        if here is not None:
            outcome.followed = self._run_here(here)
        return outcome

    def _chained_here(self, outcome: Outcome) -> JobRow | None:
        """A start this successful delivery queued (the one a provision chains, or a start
        kicked meanwhile and dispatched by the record), when this worker can run it
        itself: it consumes the start's queue (the default queue, or this host's own)."""
        if outcome.status is not OutcomeStatus.SUCCEEDED or not self.settings.start_in_place:
            return None
        for job in outcome.jobs:
            if job[1] == TASK_START and job[3] in (DEFAULT_QUEUE, self.queue):
                return job
        return None

    def _run_here(self, job: JobRow) -> Outcome:
        """Run a start this delivery queued in the same delivery instead of sending it through the broker
        to wait for a worker (the hop was a fifth of the time from create to ``active``).

        Its outbox row, committed with the provision's record, stays claimed meanwhile,
        so nothing is lost if this process dies: the relay publishes it once the claim
        expires, and the reaper re-drives the lease the start held. Once the start has an
        outcome the row is settled: marked published when the run ended here (a message
        now would only be skipped as a duplicate), or, when it is to be retried, its claim
        moved to the retry's time, so the relay publishes it then."""
        outbox_id, _task, payload, _queue = job
        kwargs = payload["kwargs"]
        with structlog.contextvars.bound_contextvars(
            run_id=kwargs["run_id"],
            task_id=payload.get("task_id"),
            kind=RunKind.START.value,
            version=kwargs["version"],
        ):
            followed = self.execute(
                RunKind.START,
                kwargs["session_id"],
                kwargs["run_id"],
                kwargs["version"],
                task_id=payload.get("task_id"),
            )
            log_run(followed, 1)
        if followed.status is OutcomeStatus.RETRY:
            outbox.reclaim(self.factory, [outbox_id], followed.retry_in or 0.0)
        else:
            outbox.mark_published(self.factory, [outbox_id])
        return followed

    # ----------------------------------------------------------------- claim
    def _claim(
        self,
        db: KeptConnection,
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
        if kind in statements.QUOTA_GUARD:
            params["max_active"] = self.settings.max_active_sandboxes
        claim = self._claimed(db.execute(statements.CLAIM_SQL[kind], params).fetchone(), rid, db)
        if claim is not False:
            return claim
        # Open but not claimed. As one transaction: lock the run and try again (things
        # may have moved since), and if the session is still not ours say why: over the
        # active-sandbox cap, the run fails with the limit; otherwise it is skipped.
        refused: Refused | None = None
        with self.factory.begin() as orm:
            row = orm.connection().exec_driver_sql(statements.CLAIM_SQL[kind], params).first()
            claim = self._claimed(row, rid, db)
            if claim is not False:
                return claim
            run = orm.get(LifecycleRunRecord, rid)  # locked by the statement
            if run is None:  # the claim returned its row: it exists, and stays locked
                raise RuntimeError(f"run {rid} vanished under its lock")
            current = orm.get(SessionRecord, sid)
            refusal = quotas.claim_refusal(orm, kind, params)
            if refusal is not None and current is not None:
                jobs = self._refuse(orm, run, current, refusal)
                refused = Refused(refusal.message, version, current.lifecycle_version)
            else:
                reason = self._why_not(kind, run, current, version)
                if reason is None:
                    return None  # someone holds a live lease (maybe this run): not ours to end
                self.finish_run(run, RunState.SKIPPED, error=reason, to_version=None)
                if current is not None and current.lifecycle_run_id is None:
                    jobs = runs.dispatch_next(orm, current)
                else:
                    jobs = []
            orm.flush()
        self._publish(jobs)
        if refused is not None:
            raise refused
        raise Skip(reason)

    def _refuse(
        self,
        orm: Session,
        run: LifecycleRunRecord,
        current: SessionRecord,
        refusal: quotas.QuotaExceeded,
    ) -> list[OutboxRecord]:
        """Record a claim refused by the active-sandbox cap, as a failure is recorded
        (run ``failed``, ``lifecycleError``, version + 1, the lease of this run's earlier
        attempt, if any, released), and dispatch the next pending run. The session rests
        where it was: ``hibernated`` when it has a snapshot to resume from, else
        ``failed``."""
        now = datetime.now(UTC)
        message = refusal.message
        resting = (
            LifecycleState.HIBERNATED
            if current.snapshot_url and current.lifecycle_state != LifecycleState.FAILED.value
            else LifecycleState.FAILED
        )
        current.lifecycle_state = resting.value
        current.lifecycle_error = message
        current.lifecycle_version += 1
        current.lifecycle_run_id = None
        current.lease_expires_at = None
        current.updated_at = now
        self.finish_run(run, RunState.FAILED, error=message, to_version=current.lifecycle_version)
        orm.flush()
        quotas.record_refusal(
            orm, refusal, at="claim", kind=run.kind, session=current, run_id=run.id
        )
        return runs.dispatch_next(orm, current)

    @staticmethod
    def _claimed(row: Any, rid: uuid.UUID, db: KeptConnection) -> Claim | Literal[False] | None:
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
            )  # a forced run is never refused for a stream
        if kind in (RunKind.SNAPSHOT, RunKind.DIFF):
            return f"no live sandbox (state {state})"
        if kind is RunKind.START and current.provisioned_at is None:
            return "workspace not provisioned"
        return f"not eligible in state {state}"

    # ----------------------------------------------------------------- work
    def _work(self, kind: RunKind, claim: Claim) -> dict[str, Any]:
        s = claim.session
        if kind is RunKind.PROVISION:
            return self.work.provision(s)
        if kind is RunKind.START:
            return self.work.start(s)
        if kind is RunKind.SNAPSHOT:
            return self.work.capture(s, claim.run, with_diff=False)
        if kind is RunKind.DIFF:
            return self.work.diff(s)
        # HIBERNATE and ARCHIVE: end every process of the sandbox (nothing writes to the
        # tree after the final snapshot), keep the work, then stop the sandbox.
        self.providers.sandbox.stop_processes(sandbox_name(s.id))
        changes = self._capture_for_rest(kind, claim)
        if changes:
            # Checkpoint the snapshot before the sandbox goes, so a crash between the
            # stop and the final record can never lose the only copy of the work.
            self._checkpoint(claim, changes)
        self.providers.sandbox.stop(sandbox_name(s.id))
        rest = LifecycleState.HIBERNATED if kind is RunKind.HIBERNATE else LifecycleState.ARCHIVED
        changes.update(lifecycle_state=rest.value, sandbox_state=self.work.resting_state(s))
        return changes

    def _capture_for_rest(self, kind: RunKind, claim: Claim) -> dict[str, Any]:
        s = claim.session
        if self.providers.sandbox.exists(sandbox_name(s.id)):
            return self.work.capture(s, claim.run, with_diff=True)
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
        assignments, params = statements.assignments(changes)
        params.update(sid=s.id, rid=claim.run.id)
        done = claim.db.execute(statements.CHECKPOINT_SQL.format(assignments), params).rowcount
        if not done:
            raise TransientProviderError("lease lost while saving the snapshot")
        self._drop_superseded(claim.db, s.id, s.snapshot_url, changes.get("snapshot_url"))
        # From here on the checkpointed snapshot is the session's; don't delete it again.
        s.snapshot_url = changes.get("snapshot_url", s.snapshot_url)

    def _drop_superseded(
        self, db: KeptConnection, session_id: uuid.UUID, old: str | None, new: str | None
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

    def _unrecorded_snapshots(
        self, db: KeptConnection, session_id: uuid.UUID, keep: str
    ) -> list[str]:
        """Snapshots that earlier runs of the session may have saved without recording
        them: runs that held the lease and then ended without succeeding (a killed worker,
        a database outage between the save and its checkpoint). The re-driven run saved
        under its own key, and none of those runs can record anything any more."""
        url_for = getattr(self.providers.snapshots, "url_for", None)
        if url_for is None:
            return []
        ended = [RunState.ABANDONED.value, RunState.SKIPPED.value, RunState.FAILED.value]
        rows = db.execute(
            statements.UNRECORDED_RUNS_SQL,  # from_version is set: the run did claim the session
            {"sid": session_id, "kinds": list(SNAPSHOT_KINDS), "ended": ended},
        ).fetchall()
        urls = [str(url_for(snapshot_key(session_id, rid))) for (rid,) in rows]
        return [url for url in urls if url != keep]

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
        assignments, params = statements.assignments(values)
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
            job = statements.job_for(chain, s.id, next_id, to_version, sandbox_state)
            params.update(job.params(), next_id=next_id, next_kind=chain.value)
        record = statements.record_statement(assignments, job is not None)
        jobs: list[JobRow]
        if job is not None:
            row = claim.db.execute(record, params).fetchone()
            jobs = [job.row(row[1])] if row is not None else []
        else:
            # A pending kick goes next, if the record was made: in its own statement, so it
            # sees a kick committed while the record waited for the session's lock. So do
            # the commands that waited for this start (autoResume): sent to the sandbox's
            # host once it is active, or failed with the start's error.
            batch = [
                (record, params),
                statements.dispatch_next_statement(s.id, to_version, sandbox_state, rid),
            ]
            if values.get("lifecycle_state") == ACTIVE:
                batch.append(
                    commands.dispatch_waiting_statement(s.id, to_version, sandbox_state, rid)
                )
            elif run_state is RunState.FAILED and claim.run.kind in _STARTS:
                batch.append(
                    commands.fail_waiting_statement(s.id, to_version, rid, error or "failed")
                )
            recorded, *dispatched = claim.db.transaction(batch)
            row = recorded.fetchone()
            jobs = [
                (r[0], r[1], r[2], r[3])
                for cur in dispatched
                if cur.description is not None
                for r in cur.fetchall()
            ]
        if row is None:
            # The lease was lost (expired and reaped) while we worked: nothing was recorded
            # and the run ended abandoned; the re-driven run does the work again.
            return Outcome(
                OutcomeStatus.SKIPPED,
                reason="lease lost before recording",
                from_version=s.lifecycle_version,
            )
        if row[0] != to_version:  # the statement's guard makes this impossible
            raise RuntimeError(f"recorded version {row[0]}, expected {to_version}")
        self._drop_superseded(claim.db, s.id, old_snapshot, values.get("snapshot_url"))
        return Outcome(
            OutcomeStatus(run_state.value),
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
                statements.RELEASE_SQL,
                {"sid": claim.session.id, "rid": claim.run.id, "state": self._state_before(claim)},
            ).rowcount
            if not released:
                lost = {"rid": claim.run.id, "error": "lease lost before retry", "now": now}
                conn.exec_driver_sql(statements.ABANDON_SQL, lost)
                return Outcome(OutcomeStatus.SKIPPED, reason="lease lost before retry")
            conn.exec_driver_sql(
                statements.REQUEUE_SQL, {"rid": claim.run.id, "error": message[:2000], "now": now}
            )
        delay = self.backoff(attempts, retry_after)
        return Outcome(
            OutcomeStatus.RETRY,
            reason=message,
            retry_in=delay,
            from_version=claim.session.lifecycle_version,
        )

    def _state_before(self, claim: Claim) -> str:
        s = claim.session
        return state_before_claim(RunKind(claim.run.kind), s.snapshot_url, s.lifecycle_state)

    def backoff(self, attempts: int, retry_after: float | None) -> float:
        """Exponential backoff with full jitter, never sooner than the remote asked."""
        return backoff_delay(
            attempts,
            self.settings.retry_backoff_base_seconds,
            self.settings.retry_backoff_max_seconds,
            retry_after,
        )

    @staticmethod
    def finish_run(
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

    def _publish_rows(self, rows: list[JobRow], db: KeptConnection) -> None:
        """Publish outbox rows written with Core and committed (marking them on the
        delivery's connection)."""
        if rows and self.publisher is not None:
            with db.orm() as factory:
                outbox.publish_rows(factory, rows, self.publisher)


ServiceFactory = Callable[[], LifecycleService]


def log_run(outcome: Outcome, attempt: int) -> None:
    """The line every delivery's outcome gets (the run's ids are bound by the caller)."""
    log.info(
        "lifecycle.run",
        outcome=outcome.status,
        reason=outcome.reason or None,
        from_version=outcome.from_version,
        to_version=outcome.to_version,
        attempt=attempt,
        duration_ms=round(outcome.duration * 1000, 1),
    )
