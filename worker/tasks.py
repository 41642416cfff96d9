"""Celery tasks: thin wrappers that bind log context and call one service function.

Each lifecycle task takes the session id, the run id and the ``lifecycleVersion`` the
job was issued against; the service decides (inside its claim) whether it still applies.
"""

from __future__ import annotations

import gc
import time
from functools import lru_cache
from typing import Any

import structlog
from celery import Task
from celery.signals import worker_init, worker_process_init, worker_ready, worker_shutdown
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from worker.celery_app import app
from worker.config import get_settings
from worker.db.engine import get_sessionmaker, reset_engine
from worker.domain.lifecycle import OutcomeStatus, RunKind
from worker.logging import configure_logging, get_logger
from worker.providers.broker import CeleryPublisher, survive_broker_loss
from worker.providers.registry import build_providers
from worker.services import hosts, retention, sweeps, webhooks
from worker.services.lifecycle import LifecycleService, log_run
from worker.task_names import (
    SWEEP_CHECKPOINTS,
    SWEEP_EXPIRE_SNAPSHOTS,
    SWEEP_HIBERNATE_IDLE,
    SWEEP_LOST_HOSTS,
    SWEEP_REAP_COMMANDS,
    SWEEP_REAP_RUNS,
    SWEEP_RELAY_OUTBOX,
    SWEEP_RETENTION,
    SWEEP_WEBHOOK_RETRIES,
    TASK_ARCHIVE,
    TASK_COMMAND,
    TASK_DIFF,
    TASK_FILES,
    TASK_HIBERNATE,
    TASK_PROVISION,
    TASK_SNAPSHOT,
    TASK_START,
    TASK_WEBHOOK_DELIVER,
)

log = get_logger(__name__)


@worker_init.connect
def _survive_broker_loss(**_: Any) -> None:
    # Before the consumer opens its first channel, and before the pool forks (the pool
    # processes inherit it): a Redis connection lost mid-task must not kill the worker.
    survive_broker_loss()


@worker_init.connect
def _freeze_startup_heap(**_: Any) -> None:
    # Before the pool forks: what start-up built lives as long as the worker, so keep it
    # out of the collector's full passes (a pause of tens of milliseconds each) in the
    # parent and in every child, which also keeps those pages shared after the fork.
    gc.collect()
    gc.freeze()


@worker_process_init.connect
def _fresh_process(**_: Any) -> None:
    # A forked pool process must not share the parent's database sockets.
    reset_engine()
    service.cache_clear()


_heartbeat: hosts.Heartbeat | None = None


@worker_ready.connect
def _start_heartbeat(**_: Any) -> None:
    """This host beats from the worker's main process while it consumes its queue."""
    global _heartbeat
    from worker.routing import host_queue, this_host

    settings = get_settings()
    _heartbeat = hosts.Heartbeat(
        settings.database_url, this_host(), host_queue(), settings.host_heartbeat_seconds
    )
    _heartbeat.start()


@worker_shutdown.connect
def _stop_heartbeat(**_: Any) -> None:
    if _heartbeat is not None:
        _heartbeat.stop()


@lru_cache(maxsize=1)
def service() -> LifecycleService:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    return LifecycleService(
        settings, get_sessionmaker(), build_providers(settings), CeleryPublisher(app)
    )


def _run(task: Task, kind: RunKind, session_id: str, run_id: str, version: int) -> dict[str, Any]:
    request = task.request
    task_id = request.id
    svc = service()
    with structlog.contextvars.bound_contextvars(
        session_id=session_id, run_id=run_id, task_id=task_id, kind=kind.value, version=version
    ):
        try:
            outcome = svc.execute(kind, session_id, run_id, version, task_id=task_id)
        except (OperationalError, InterfaceError, PoolTimeout) as exc:
            # The database is unreachable: nothing was recorded, so try the same delivery
            # again later (the claim makes a repeat harmless).
            delay = svc.backoff(request.retries + 1, None)
            log.warning("lifecycle.database_unavailable", error=type(exc).__name__, retry_in=delay)
            raise task.retry(countdown=delay, max_retries=None) from None
        log_run(outcome, request.retries + 1)
        if outcome.status is OutcomeStatus.RETRY:
            raise task.retry(countdown=outcome.retry_in, max_retries=None)
        return {"outcome": outcome.status, "reason": outcome.reason}


def _lifecycle_task(name: str, kind: RunKind) -> Any:
    # max_retries=None here: ``task.retry(max_retries=None)`` alone means "the default, 3",
    # after which Celery drops the delivery. Retries are bounded by the service instead
    # (task_max_retries for provider errors); a database outage is waited out.
    @app.task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None)
    def task(self: Task, session_id: str, run_id: str, version: int) -> dict[str, Any]:
        return _run(self, kind, session_id, run_id, version)

    task.__doc__ = f"Lifecycle run of kind {kind.value!r}."
    return task


provision = _lifecycle_task(TASK_PROVISION, RunKind.PROVISION)
start = _lifecycle_task(TASK_START, RunKind.START)
hibernate = _lifecycle_task(TASK_HIBERNATE, RunKind.HIBERNATE)
snapshot = _lifecycle_task(TASK_SNAPSHOT, RunKind.SNAPSHOT)
diff = _lifecycle_task(TASK_DIFF, RunKind.DIFF)
archive = _lifecycle_task(TASK_ARCHIVE, RunKind.ARCHIVE)


# At most once: a command is not idempotent, so a delivery lost with its worker is not
# run again (acks_late off), and the claim skips a duplicate.
@app.task(name=TASK_COMMAND, acks_late=False)
def command(command_id: str) -> dict[str, Any]:
    """An agent's command in the sandbox this host holds."""
    import uuid

    from worker.routing import this_host
    from worker.services import commands

    svc = service()
    with structlog.contextvars.bound_contextvars(command_id=command_id):
        status = commands.execute(
            svc.factory, svc.settings, svc.providers, uuid.UUID(command_id), this_host()
        )
    return {"status": status}


# At most once, like a command; a repeat would find its row already claimed.
@app.task(name=TASK_FILES, acks_late=False)
def file_op(op_id: str) -> dict[str, Any]:
    """A file operation on the tree of a sandbox this host holds, for the API."""
    import uuid

    from worker.services import files

    svc = service()
    with structlog.contextvars.bound_contextvars(op_id=op_id):
        status = files.execute(svc.factory, svc.settings, svc.providers, uuid.UUID(op_id))
    return {"status": status}


def _sweep(name: str, fn: Any) -> dict[str, Any]:
    from datetime import UTC, datetime

    from worker.services import sweep_stats

    started = time.monotonic()
    started_at = datetime.now(UTC)
    result: dict[str, Any] | None = None
    error: str | None = None
    try:
        result = fn(service())
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        # What the sweep did goes to the database for /metrics; never fail the sweep on it.
        try:
            sweep_stats.record(
                get_sessionmaker(),
                name,
                started_at=started_at,
                finished_at=datetime.now(UTC),
                result=result,
                error=error,
            )
        except Exception as exc:
            log.warning("sweep.stats_not_recorded", sweep=name, error=type(exc).__name__)
    if result is None:  # unreachable: fn returned (else its exception went up)
        raise RuntimeError(f"sweep {name} returned nothing")
    # A sweep that found nothing to do is a debug line: idle, beat runs several every few
    # seconds, and the log should show what happened, not that nothing did.
    did = any(isinstance(v, int | float) and v for v in result.values())
    (log.info if did else log.debug)(
        name, duration_ms=round((time.monotonic() - started) * 1000, 1), **result
    )
    return result


@app.task(name=SWEEP_HIBERNATE_IDLE)
def hibernate_idle() -> dict[str, Any]:
    """Hibernate sessions whose idle or lifetime deadline has passed."""
    return _sweep(SWEEP_HIBERNATE_IDLE, sweeps.hibernate_idle)


@app.task(name=SWEEP_RELAY_OUTBOX)
def relay_outbox() -> dict[str, Any]:
    """Publish outbox records the API or a worker could not publish."""
    return _sweep(SWEEP_RELAY_OUTBOX, sweeps.relay_outbox)


@app.task(name=SWEEP_REAP_RUNS)
def reap_runs() -> dict[str, Any]:
    """Release expired leases and re-drive their sessions."""
    return _sweep(SWEEP_REAP_RUNS, sweeps.reap_runs)


@app.task(name=SWEEP_REAP_COMMANDS)
def reap_commands() -> dict[str, Any]:
    """End commands whose worker was lost; purge abandoned file operations."""
    from worker.services.command_reaper import reap_commands

    return _sweep(SWEEP_REAP_COMMANDS, reap_commands)


@app.task(name=SWEEP_EXPIRE_SNAPSHOTS)
def expire_snapshots() -> dict[str, Any]:
    """Delete snapshots of sessions archived longer than the retention."""
    return _sweep(SWEEP_EXPIRE_SNAPSHOTS, sweeps.expire_snapshots)


@app.task(name=SWEEP_LOST_HOSTS)
def lost_hosts() -> dict[str, Any]:
    """Declare silent worker hosts lost and set their sessions back to a checkpoint."""
    return _sweep(SWEEP_LOST_HOSTS, hosts.recover_lost_hosts)


@app.task(name=SWEEP_CHECKPOINTS)
def checkpoints() -> dict[str, Any]:
    """Snapshot active sandboxes with activity since their last snapshot."""
    return _sweep(SWEEP_CHECKPOINTS, sweeps.checkpoint_active)


@app.task(
    name=TASK_WEBHOOK_DELIVER,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=None,
)
def webhook_deliver(self: Task, delivery_id: int) -> dict[str, Any]:
    """One attempt of a webhook delivery (its retries are scheduled in the database)."""
    svc = service()
    with structlog.contextvars.bound_contextvars(delivery_id=delivery_id, task_id=self.request.id):
        try:
            outcome = webhooks.deliver(svc.factory, svc.settings, delivery_id)
        except (OperationalError, InterfaceError, PoolTimeout) as exc:
            delay = svc.backoff(self.request.retries + 1, None)
            log.warning("webhook.database_unavailable", error=type(exc).__name__, retry_in=delay)
            raise self.retry(countdown=delay, max_retries=None) from None
    return {"outcome": outcome}


@app.task(name=SWEEP_WEBHOOK_RETRIES)
def webhook_retries() -> dict[str, Any]:
    """Queue webhook deliveries whose next attempt is due."""
    return _sweep(SWEEP_WEBHOOK_RETRIES, webhooks.retry_due)


@app.task(name=SWEEP_RETENTION)
def retention_sweep() -> dict[str, Any]:
    """Archive hibernated sessions left untouched; empty archived ones past retention."""
    return _sweep(SWEEP_RETENTION, retention.sweep)
