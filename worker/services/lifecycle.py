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
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, case, exists, func, not_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db.models import ChatRecord, LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import LifecycleState, RunKind, RunState
from worker.logging import get_logger, redact_text
from worker.providers.base import PermanentProviderError, TransientProviderError
from worker.providers.registry import Providers
from worker.routing import host_queue
from worker.services import outbox, runs

log = get_logger(__name__)

S = SessionRecord
ACTIVE = LifecycleState.ACTIVE.value


@dataclass
class Outcome:
    """What a delivery did. ``retry_in`` is set when the caller should retry later."""

    status: str  # succeeded | failed | skipped | retry
    reason: str = ""
    retry_in: float | None = None
    from_version: int | None = None
    to_version: int | None = None
    jobs: list[OutboxRecord] = field(default_factory=list)
    duration: float = 0.0


@dataclass
class Claim:
    session: SessionRecord
    run: LifecycleRunRecord


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


def _eligibility(kind: RunKind, trigger: str, settings: Settings) -> ColumnElement[bool]:
    """The condition, re-checked inside the claim, under which a run of ``kind`` may go."""
    not_archived = S.lifecycle_state != LifecycleState.ARCHIVED.value
    if kind is RunKind.PROVISION:
        return not_archived
    if kind is RunKind.START:
        return and_(not_archived, S.status != "archived", S.provisioned_at.is_not(None))
    if kind is RunKind.HIBERNATE:
        cond = and_(S.lifecycle_state == ACTIVE, no_active_stream())
        if trigger == "sweep":
            cond = and_(cond, hibernate_due(settings))
        return cond
    if kind in (RunKind.SNAPSHOT, RunKind.DIFF):
        return S.lifecycle_state == ACTIVE
    # ARCHIVE: only while archiving is still wanted (an un-archive withdraws it).
    return and_(not_archived, S.status == "archived")


def _claim_state(kind: RunKind) -> Any:
    """The state the session shows while the run holds its lease."""
    if kind is RunKind.PROVISION:
        return LifecycleState.PROVISIONING.value
    if kind is RunKind.START:
        # A start restores when there is a snapshot to restore; else it clones afresh.
        return case(
            (S.snapshot_url.is_not(None), LifecycleState.RESTORING.value),
            else_=LifecycleState.PROVISIONING.value,
        )
    if kind is RunKind.HIBERNATE:
        return LifecycleState.HIBERNATING.value
    return S.lifecycle_state


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
        try:
            claim = self._claim(kind, sid, rid, version, task_id)
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
        self._publish(outcome.jobs)
        return outcome

    # ----------------------------------------------------------------- claim
    def _claim(
        self, kind: RunKind, sid: uuid.UUID, rid: uuid.UUID, version: int, task_id: str | None
    ) -> Claim | None:
        lease = timedelta(seconds=self.settings.lease_seconds)
        with self.factory.begin() as db:
            run = db.scalars(
                select(LifecycleRunRecord)
                .where(LifecycleRunRecord.id == rid, LifecycleRunRecord.session_id == sid)
                .with_for_update()
            ).first()
            if run is None:
                return None
            if run.state not in (RunState.QUEUED.value, RunState.RUNNING.value):
                return None  # already finished (or never dispatched): a duplicate delivery
            row = db.execute(
                update(SessionRecord)
                .where(
                    S.id == sid,
                    S.lifecycle_version == version,
                    or_(S.lifecycle_run_id.is_(None), S.lease_expires_at < func.now()),
                    _eligibility(kind, run.trigger, self.settings),
                )
                .values(
                    lifecycle_run_id=rid,
                    lease_expires_at=func.now() + lease,
                    lifecycle_state=_claim_state(kind),
                    updated_at=func.now(),
                )
                .returning(SessionRecord)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            if row is None:
                current = db.get(SessionRecord, sid)
                reason = self._why_not(kind, run, current, version)
                if reason is None:
                    return None  # someone holds a live lease (maybe this run): not ours to end
                self._finish_run(db, run, RunState.SKIPPED, error=reason, to_version=None)
                if current is not None and current.lifecycle_run_id is None:
                    jobs = runs.dispatch_next(db, current)
                else:
                    jobs = []
                db.flush()
                skipped_jobs = jobs
            else:
                run.state = RunState.RUNNING.value
                run.attempts += 1
                run.task_id = task_id
                run.from_version = version
                run.started_at = run.started_at or datetime.now(UTC)
                run.updated_at = datetime.now(UTC)
                return Claim(row, run)
        self._publish(skipped_jobs)
        raise Skip(reason)

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
    def _snapshot_since_start(s: SessionRecord) -> bool:
        started = (s.sandbox_state or {}).get("startedAt")
        if not s.snapshot_created_at or not started:
            return False
        return s.snapshot_created_at >= datetime.fromisoformat(started)

    def _checkpoint(self, claim: Claim, changes: dict[str, Any]) -> None:
        """Record captured work while still holding the lease (no transition, so no
        version bump); raises if the lease was lost, so nothing is stopped."""
        s = claim.session
        with self.factory.begin() as db:
            done = db.execute(
                update(SessionRecord)
                .where(S.id == s.id, S.lifecycle_run_id == claim.run.id)
                .values(**changes, updated_at=func.now())
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
        if not done:
            raise TransientProviderError("lease lost while saving the snapshot")
        self._drop_superseded(s.id, s.snapshot_url, changes.get("snapshot_url"))
        # From here on the checkpointed snapshot is the session's; don't delete it again.
        s.snapshot_url = changes.get("snapshot_url", s.snapshot_url)

    def _drop_superseded(self, session_id: uuid.UUID, old: str | None, new: str | None) -> None:
        """After ``new`` was committed as the session's snapshot: delete the one it
        replaces, and any file an abandoned run of the session saved but never recorded."""
        if not new or old == new:
            return
        try:
            for url in ([old] if old else []) + self._unrecorded_snapshots(session_id, new):
                self.providers.snapshots.delete(url)
        except Exception:  # a leftover file is harmless
            log.warning("lifecycle.old_snapshot_delete_failed")

    def _unrecorded_snapshots(self, session_id: uuid.UUID, keep: str) -> list[str]:
        """Snapshots that earlier runs of the session may have saved without recording
        them: runs that held the lease and then ended without succeeding (a killed worker,
        a database outage between the save and its checkpoint). The re-driven run saved
        under its own key, and none of those runs can record anything any more."""
        url_for = getattr(self.providers.snapshots, "url_for", None)
        if url_for is None:
            return []
        ended = (RunState.ABANDONED.value, RunState.SKIPPED.value, RunState.FAILED.value)
        with self.factory() as db:
            run_ids = db.scalars(
                select(LifecycleRunRecord.id).where(
                    LifecycleRunRecord.session_id == session_id,
                    LifecycleRunRecord.kind.in_(SNAPSHOT_KINDS),
                    LifecycleRunRecord.state.in_(ended),
                    LifecycleRunRecord.from_version.is_not(None),  # it did claim the session
                )
            ).all()
        urls = [str(url_for(snapshot_key(session_id, rid))) for rid in run_ids]
        return [url for url in urls if url != keep]

    def _provision(self, s: SessionRecord) -> dict[str, Any]:
        assert s.repo_owner and s.repo_name and s.branch
        host = self.providers.repo_host
        repo = host.ensure_repo(s.repo_owner, s.repo_name)
        branch = host.ensure_branch(repo, s.branch)
        log.info(
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

    def _start(self, s: SessionRecord) -> dict[str, Any]:
        name = sandbox_name(s.id)
        sandbox = self.providers.sandbox
        if s.snapshot_url:
            info = sandbox.start_from_snapshot(name, self.providers.snapshots, s.snapshot_url)
        else:
            assert s.clone_url and s.branch
            url, env = self.providers.repo_host.clone_source(s.clone_url)
            info = sandbox.start_from_clone(name, url, s.branch, env)
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

    def _resting_state(self, s: SessionRecord) -> dict[str, Any]:
        """What ``sandboxState`` keeps while no sandbox runs: only what resuming needs."""
        return {"type": self.providers.sandbox.kind, "sandboxName": sandbox_name(s.id)}

    def _require_sandbox(self, s: SessionRecord) -> str:
        name = sandbox_name(s.id)
        if not self.providers.sandbox.exists(name):
            raise PermanentProviderError(
                "the sandbox is not on this worker's host (it was lost or runs elsewhere); "
                "the last snapshot is kept, start the session again to restore it"
            )
        return name

    def _diff(self, s: SessionRecord) -> dict[str, Any]:
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

    def _capture(
        self, s: SessionRecord, run: LifecycleRunRecord, *, with_diff: bool
    ) -> dict[str, Any]:
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
        with self.factory.begin() as db:
            row = db.execute(
                update(SessionRecord)
                .where(
                    S.id == s.id,
                    S.lifecycle_run_id == rid,
                    S.lifecycle_version == s.lifecycle_version,
                )
                .values(
                    **values,
                    lifecycle_version=S.lifecycle_version + 1,
                    lifecycle_run_id=None,
                    lease_expires_at=None,
                    updated_at=func.now(),
                )
                .returning(SessionRecord)
                .execution_options(synchronize_session=False)
            ).scalar_one_or_none()
            run = db.get(LifecycleRunRecord, rid, with_for_update=True)
            assert run is not None
            if row is None:
                # The lease was lost (expired and reaped) while we worked: our result is
                # discarded; the re-driven run does the work again (idempotently).
                if run.state == RunState.RUNNING.value:
                    self._finish_run(
                        db, run, RunState.ABANDONED, error="lease lost before recording"
                    )
                return Outcome(
                    "skipped",
                    reason="lease lost before recording",
                    from_version=s.lifecycle_version,
                )
            self._finish_run(db, run, run_state, error=error, to_version=row.lifecycle_version)
            jobs: list[OutboxRecord] = []
            if chain is not None:
                jobs.append(runs.enqueue(db, row, runs.new_run(db, row, chain, "chain")))
            else:
                jobs += runs.dispatch_next(db, row)
            db.flush()
        self._drop_superseded(s.id, old_snapshot, values.get("snapshot_url"))
        return Outcome(
            run_state.value,
            reason=error or "",
            from_version=s.lifecycle_version,
            to_version=row.lifecycle_version,
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
        with self.factory.begin() as db:
            released = db.execute(
                update(SessionRecord)
                .where(S.id == claim.session.id, S.lifecycle_run_id == claim.run.id)
                .values(
                    lifecycle_run_id=None,
                    lease_expires_at=None,
                    lifecycle_state=self._state_before(claim),
                    updated_at=func.now(),
                )
                .execution_options(synchronize_session=False)
            ).rowcount  # type: ignore[attr-defined]
            run = db.get(LifecycleRunRecord, claim.run.id, with_for_update=True)
            assert run is not None
            if not released:
                if run.state == RunState.RUNNING.value:
                    self._finish_run(db, run, RunState.ABANDONED, error="lease lost before retry")
                return Outcome("skipped", reason="lease lost before retry")
            run.state = RunState.QUEUED.value
            run.error = message[:2000]
            run.updated_at = datetime.now(UTC)
        delay = self.backoff(attempts, retry_after)
        return Outcome(
            "retry", reason=message, retry_in=delay, from_version=claim.session.lifecycle_version
        )

    def _state_before(self, claim: Claim) -> str:
        kind = RunKind(claim.run.kind)
        if kind is RunKind.HIBERNATE:
            return ACTIVE
        if kind is RunKind.START:
            return (
                LifecycleState.HIBERNATED.value
                if claim.session.snapshot_url
                else LifecycleState.PROVISIONING.value
            )
        return claim.session.lifecycle_state

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
        if jobs and self.publisher is not None:
            outbox.publish_now(self.factory, jobs, self.publisher)


ServiceFactory = Callable[[], LifecycleService]
