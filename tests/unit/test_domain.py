"""Pure rules: due times, coalescing, routing, backoff, cursors (no I/O)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest

from worker.config import Settings
from worker.domain.cursors import decode_cursor, encode_cursor
from worker.domain.lifecycle import (
    LifecycleState,
    RunKind,
    coalescing_kinds,
    hibernate_due_at,
    is_kick_satisfied,
)
from worker.errors import InvalidInput
from worker.routing import DEFAULT_QUEUE, host_queue, queue_for
from worker.services.lifecycle import LifecycleService
from worker.services.sessions import generate_title

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
GUARD = timedelta(seconds=60)


def test_due_is_the_idle_deadline_when_it_comes_first() -> None:
    assert hibernate_due_at(T0, T0 + timedelta(hours=5), GUARD) == T0


def test_due_is_the_lifetime_minus_the_guard_when_that_comes_first() -> None:
    expires = T0 + timedelta(minutes=10)
    assert hibernate_due_at(T0 + timedelta(hours=1), expires, GUARD) == expires - GUARD


def test_due_is_unknown_without_deadlines() -> None:
    assert hibernate_due_at(None, None, GUARD) is None
    assert hibernate_due_at(None, T0, GUARD) == T0 - GUARD


@pytest.mark.parametrize(
    ("kind", "state", "satisfied"),
    [
        (RunKind.START, LifecycleState.ACTIVE, True),
        (RunKind.START, LifecycleState.HIBERNATED, False),
        (RunKind.HIBERNATE, LifecycleState.HIBERNATED, True),
        (RunKind.HIBERNATE, LifecycleState.ACTIVE, False),
        (RunKind.ARCHIVE, LifecycleState.ARCHIVED, True),
        (RunKind.SNAPSHOT, LifecycleState.ACTIVE, False),
        (RunKind.DIFF, LifecycleState.ACTIVE, False),
    ],
)
def test_kick_satisfied(kind: RunKind, state: LifecycleState, satisfied: bool) -> None:
    assert is_kick_satisfied(kind, state) is satisfied


def test_a_provision_in_flight_covers_a_start_kick() -> None:
    assert RunKind.PROVISION in coalescing_kinds(RunKind.START)
    assert coalescing_kinds(RunKind.HIBERNATE) == (RunKind.HIBERNATE,)
    assert coalescing_kinds(RunKind.START) == (RunKind.START, RunKind.PROVISION)


@pytest.mark.parametrize("kind", [RunKind.SNAPSHOT, RunKind.DIFF])
def test_a_hibernate_or_archive_in_flight_covers_a_snapshot_or_diff_kick(kind: RunKind) -> None:
    """Both take a snapshot and recompute the diff before the sandbox stops; a snapshot or
    diff queued behind them would find no sandbox and be skipped."""
    assert coalescing_kinds(kind) == (kind, RunKind.HIBERNATE, RunKind.ARCHIVE)


def test_runs_on_a_live_sandbox_go_to_its_host_queue() -> None:
    state = {"type": "local", "queue": host_queue("box-7")}
    assert queue_for("hibernate", state) == "lifecycle.host.box-7"
    assert queue_for("snapshot", state) == "lifecycle.host.box-7"
    assert queue_for("diff", state) == "lifecycle.host.box-7"
    # Provisioning and starts touch no live sandbox: any worker may take them.
    assert queue_for("provision", state) == DEFAULT_QUEUE
    assert queue_for("start", state) == DEFAULT_QUEUE
    assert queue_for("hibernate", {"type": "local"}) == DEFAULT_QUEUE


def _svc(**overrides: Any) -> LifecycleService:
    settings = Settings(**overrides)
    return LifecycleService(settings, cast(Any, None), cast(Any, None), None, hostname_queue="q")


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    svc = _svc(retry_backoff_base_seconds=1, retry_backoff_max_seconds=8)
    for attempt, high in {1: 1, 2: 2, 3: 4, 4: 8, 9: 8}.items():
        delays = [svc.backoff(attempt, None) for _ in range(400)]
        assert all(0 <= d <= high for d in delays), (attempt, min(delays), max(delays))
        # Full jitter: the whole range is used, not just its upper half.
        assert min(delays) < high / 4 and max(delays) > high * 3 / 4, (attempt, delays)


def test_backoff_never_sooner_than_the_remote_asked() -> None:
    svc = _svc(retry_backoff_base_seconds=0.1, retry_backoff_max_seconds=1)
    assert all(svc.backoff(1, 7.5) >= 7.5 for _ in range(50))


def test_cursor_round_trip_and_garbage() -> None:
    sid = uuid.uuid4()
    assert decode_cursor(encode_cursor(T0, sid)) == (T0, sid)
    for bad in ("x", "!!!", encode_cursor(T0, sid)[:-3] + "###"):
        with pytest.raises(InvalidInput):
            decode_cursor(bad)


def test_generated_titles_are_readable() -> None:
    title = generate_title()
    words = title.split()
    assert len(words) == 3 and words[0].isalpha() and words[2].isdigit()
