"""Lifecycle states, run kinds and the due-time rules (SPEC §4). Pure: no I/O."""

from __future__ import annotations

import random
import uuid
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Protocol


class LifecycleState(StrEnum):
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    HIBERNATING = "hibernating"
    HIBERNATED = "hibernated"
    RESTORING = "restoring"
    ARCHIVED = "archived"
    FAILED = "failed"


class SessionStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    ARCHIVED = "archived"


class RunKind(StrEnum):
    PROVISION = "provision"
    START = "start"
    HIBERNATE = "hibernate"
    SNAPSHOT = "snapshot"
    DIFF = "diff"
    ARCHIVE = "archive"


class RunState(StrEnum):
    PENDING = "pending"  # waiting for the session's current run to finish
    QUEUED = "queued"  # published (or in the outbox), not yet claimed
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"  # stale or duplicate delivery: no side effect
    ABANDONED = "abandoned"  # its lease expired (worker died); the reaper re-drove it


class OutcomeStatus(StrEnum):
    """What one delivery of a run's task did."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    RETRY = "retry"


OPEN_RUN_STATES = (RunState.PENDING, RunState.QUEUED, RunState.RUNNING)
FINISHED_RUN_STATES = (RunState.SUCCEEDED, RunState.FAILED, RunState.SKIPPED, RunState.ABANDONED)

# The state a session shows while a run of this kind holds its lease.
IN_PROGRESS_STATE: dict[RunKind, LifecycleState | None] = {
    RunKind.PROVISION: LifecycleState.PROVISIONING,
    RunKind.START: None,  # provisioning (fresh) or restoring (from a snapshot), decided at claim
    RunKind.HIBERNATE: LifecycleState.HIBERNATING,
    RunKind.SNAPSHOT: None,  # unchanged
    RunKind.DIFF: None,  # unchanged
    RunKind.ARCHIVE: None,  # unchanged until archived
}


def hibernate_due_at(
    hibernate_after: datetime | None, sandbox_expires_at: datetime | None, guard: timedelta
) -> datetime | None:
    """When the idle sweep should hibernate: the earlier of ``hibernateAfter`` and
    ``sandboxExpiresAt`` minus a guard (so a sandbox is saved before its host kills it)."""
    candidates = [
        t for t in (hibernate_after, sandbox_expires_at and sandbox_expires_at - guard) if t
    ]
    return min(candidates) if candidates else None


def is_kick_satisfied(kind: RunKind, state: LifecycleState) -> bool:
    """Whether a kick of ``kind`` asks for nothing the session does not already have."""
    if kind is RunKind.START:
        return state is LifecycleState.ACTIVE
    if kind is RunKind.HIBERNATE:
        return state in (LifecycleState.HIBERNATED, LifecycleState.ARCHIVED)
    if kind is RunKind.ARCHIVE:
        return state is LifecycleState.ARCHIVED
    return False


def coalescing_kinds(kind: RunKind) -> tuple[RunKind, ...]:
    """Open runs of these kinds already cover a kick of ``kind``."""
    if kind is RunKind.START:
        # A provision run chains into a start run.
        return (RunKind.START, RunKind.PROVISION)
    if kind in (RunKind.SNAPSHOT, RunKind.DIFF):
        # A hibernate or archive takes a snapshot and recomputes the diff before it stops
        # the sandbox (a snapshot or diff queued after it would find no sandbox).
        return (kind, RunKind.HIBERNATE, RunKind.ARCHIVE)
    return (kind,)


def backoff_delay(
    attempts: int, base_seconds: float, cap_seconds: float, retry_after: float | None
) -> float:
    """Seconds before retry ``attempts`` + 1: exponential backoff with *full* jitter
    (uniform in ``[0, min(cap, base * 2**(attempts-1))]``), never sooner than a
    ``Retry-After`` the remote asked for."""
    ceiling = min(cap_seconds, base_seconds * float(2 ** max(0, attempts - 1)))
    delay = random.uniform(0, ceiling)
    return delay if retry_after is None else max(delay, retry_after)


# ----------------------------------------------------------------- timeouts
class TimeoutDefaults(Protocol):
    idle_timeout_seconds: float
    max_lifetime_seconds: float


def session_timeouts(
    defaults: TimeoutDefaults, idle_seconds: int | None, lifetime_seconds: int | None
) -> tuple[float, float]:
    """A session's idle timeout and maximum lifetime: its own, else the operator's."""
    return (
        float(idle_seconds) if idle_seconds else defaults.idle_timeout_seconds,
        float(lifetime_seconds) if lifetime_seconds else defaults.max_lifetime_seconds,
    )


# ----------------------------------------------------------------- names
def sandbox_name(session_id: uuid.UUID) -> str:
    return f"s-{session_id}"


# Runs that save snapshots, each under its own key.
SNAPSHOT_KINDS = (RunKind.HIBERNATE.value, RunKind.SNAPSHOT.value, RunKind.ARCHIVE.value)


def snapshot_key(session_id: uuid.UUID, run_id: uuid.UUID) -> str:
    return f"{session_id}-{run_id}"


def state_before_claim(kind: RunKind, snapshot_url: str | None, current: str) -> str:
    """The state a session showed before a run of ``kind`` claimed it (what releasing or
    abandoning the run restores, so that its retry's claim is eligible again)."""
    if kind is RunKind.HIBERNATE:
        return LifecycleState.ACTIVE.value
    if kind is RunKind.START:
        return (
            LifecycleState.HIBERNATED.value if snapshot_url else LifecycleState.PROVISIONING.value
        )
    return current
