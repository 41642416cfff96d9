"""What the idle sweep records for each due session (it inserts with Core, not through
``runs.new_run``/``runs.enqueue``/``outbox.add``): a queued hibernate run issued against
the session's version, and its job in the outbox, routed to the sandbox's host queue,
claimed, then published and marked so."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, text

from tests.support.factories import make_account
from tests.support.lifecycle import make_service
from worker.db.engine import get_sessionmaker
from worker.db.models import LifecycleRunRecord, OutboxRecord
from worker.services import outbox
from worker.services.sweeps import hibernate_idle
from worker.task_names import DEFAULT_QUEUE, TASK_HIBERNATE

HOST_QUEUE = "lifecycle.host.sweep-test"


def _seed() -> dict[uuid.UUID, tuple[int, str]]:
    """Three due sessions at different versions (one with a local sandbox on a host
    queue), and one that is not due. Returns the due ones: id -> (version, queue)."""
    owner = make_account("sweep-records")
    due = {
        uuid.uuid4(): (3, {"type": "local", "queue": HOST_QUEUE}, HOST_QUEUE),
        uuid.uuid4(): (7, {"type": "remote"}, DEFAULT_QUEUE),
        uuid.uuid4(): (1, {}, DEFAULT_QUEUE),
    }
    rows: list[tuple[uuid.UUID, int, dict[str, Any], str]] = [
        (sid, version, state, "now() - interval '5 minutes'")
        for sid, (version, state, _q) in due.items()
    ]
    rows.append((uuid.uuid4(), 9, {}, "now() + interval '1 hour'"))
    with get_sessionmaker().begin() as db:
        for sid, version, state, hibernate_after in rows:
            db.execute(
                text(
                    f"""
                    INSERT INTO sessions (id, user_id, title, lifecycle_state, lifecycle_version,
                        sandbox_state, hibernate_after, sandbox_expires_at, created_at,
                        updated_at)
                    VALUES (:id, :owner, 't', 'active', :version, CAST(:state AS jsonb),
                        {hibernate_after}, now() + interval '4 hours', now(), now())
                    """
                ),
                {"id": sid, "owner": owner, "version": version, "state": json.dumps(state)},
            )
    return {sid: (version, queue) for sid, (version, _state, queue) in due.items()}


def _records() -> tuple[list[LifecycleRunRecord], list[OutboxRecord]]:
    with get_sessionmaker()() as db:
        run_rows = list(db.scalars(select(LifecycleRunRecord)))
        jobs = list(db.scalars(select(OutboxRecord).order_by(OutboxRecord.id)))
        return run_rows, jobs


def _check_records(due: dict[uuid.UUID, tuple[int, str]]) -> list[OutboxRecord]:
    run_rows, jobs = _records()
    assert {r.session_id for r in run_rows} == set(due)
    for r in run_rows:
        version, _queue = due[r.session_id]
        assert (r.kind, r.trigger, r.state) == ("hibernate", "sweep", "queued")
        assert (r.issued_version, r.attempts) == (version, 0)
        assert (r.from_version, r.to_version, r.task_id, r.error) == (None, None, None, None)
        assert r.started_at is None and r.finished_at is None
        assert r.created_at is not None and r.updated_at is not None
    by_run = {r.id: r for r in run_rows}
    assert len(jobs) == len(run_rows)
    for job in jobs:
        kwargs = job.payload["kwargs"]
        run = by_run[uuid.UUID(kwargs["run_id"])]
        version, queue = due[run.session_id]
        assert kwargs == {
            "session_id": str(run.session_id),
            "run_id": str(run.id),
            "version": version,
        }
        assert set(job.payload) == {"kwargs", "task_id"}
        assert str(uuid.UUID(job.payload["task_id"])) == job.payload["task_id"]
        assert (job.task_name, job.queue, job.attempts, job.last_error) == (
            TASK_HIBERNATE,
            queue,
            0,
            None,
        )
    assert len({j.payload["task_id"] for j in jobs}) == len(jobs)
    return jobs


def test_without_a_publisher_the_jobs_stay_claimed_for_the_relay(db_clean: dict[str, str]) -> None:
    due = _seed()
    assert hibernate_idle(make_service(publish=False)) == {"queued": 3}
    for job in _check_records(due):
        assert job.published_at is None
        assert job.claimed_until is not None
        assert job.claimed_until - job.created_at == timedelta(seconds=outbox.CLAIM_SECONDS)


def test_the_jobs_are_published_to_their_queues_and_marked(
    db_clean: dict[str, str], redis_client: Any
) -> None:
    due = _seed()
    assert hibernate_idle(make_service(publish=True)) == {"queued": 3}
    jobs = _check_records(due)
    for job in jobs:
        assert job.published_at is not None and job.claimed_until is None
    sent: dict[str, list[str]] = {}
    for queue in (HOST_QUEUE, DEFAULT_QUEUE):
        for raw in redis_client.lrange(queue, 0, -1):  # type: ignore[attr-defined]
            message = json.loads(raw)
            sent.setdefault(queue, []).append(message["headers"]["id"])
            assert message["headers"]["task"] == TASK_HIBERNATE
    assert {q: sorted(ids) for q, ids in sent.items()} == {
        q: sorted(j.payload["task_id"] for j in jobs if j.queue == q)
        for q in (HOST_QUEUE, DEFAULT_QUEUE)
    }


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_every_batch_is_marked_published(
    db_clean: dict[str, str], redis_client: Any, batch: int
) -> None:
    """Each batch's jobs are marked in the next batch's transaction, the last batch's in
    one of its own (batch 3: the last batch is full, the next finds nothing)."""
    from worker.config import get_settings

    due = _seed()
    settings = get_settings().model_copy(update={"sweep_batch_size": batch})
    assert hibernate_idle(make_service(settings, publish=True)) == {"queued": 3}
    jobs = _check_records(due)
    assert all(j.published_at is not None and j.claimed_until is None for j in jobs)
    queued = [
        json.loads(raw)["headers"]["id"]
        for queue in (HOST_QUEUE, DEFAULT_QUEUE)
        for raw in redis_client.lrange(queue, 0, -1)  # type: ignore[attr-defined]
    ]
    assert sorted(queued) == sorted(j.payload["task_id"] for j in jobs)


def test_jobs_the_broker_refused_are_released_for_the_relay(db_clean: dict[str, str]) -> None:
    """Refused: released at once with the error, never marked published."""

    def refuse(task: str, kwargs: dict[str, Any], task_id: str, queue: str | None) -> None:
        raise ConnectionError("broker down")

    due = _seed()
    svc = make_service(publish=False)
    svc.publisher = refuse
    assert hibernate_idle(svc) == {"queued": 3}
    run_rows, jobs = _records()
    assert {r.session_id for r in run_rows} == set(due) and len(jobs) == 3
    assert all(j.published_at is None for j in jobs)
    assert any(j.claimed_until is None and "broker down" in (j.last_error or "") for j in jobs)


def test_an_idle_sweep_logs_at_debug_and_a_busy_one_at_info(
    db_clean: dict[str, str], monkeypatch: Any, caplog: Any
) -> None:
    """Beat runs several sweeps every few seconds: one that did nothing must not put a
    line in the operator's terminal; one that did something must."""
    import logging

    from worker import tasks
    from worker.logging import configure_logging

    configure_logging("INFO", json=True)  # structlog through stdlib logging, as in a worker
    if caplog.handler not in logging.getLogger().handlers:
        logging.getLogger().addHandler(caplog.handler)
    monkeypatch.setattr(tasks, "service", lambda: None)
    caplog.set_level(logging.DEBUG, logger="worker.tasks")
    tasks._sweep("lifecycle.sweep.test_idle", lambda _svc: {"queued": 0, "failed": 0})
    tasks._sweep("lifecycle.sweep.test_busy", lambda _svc: {"queued": 3, "failed": 0})
    levels = {
        r.msg["event"]: r.levelname
        for r in caplog.records
        if isinstance(r.msg, dict) and str(r.msg.get("event", "")).startswith("lifecycle.sweep.")
    }
    assert levels == {"lifecycle.sweep.test_idle": "DEBUG", "lifecycle.sweep.test_busy": "INFO"}
