"""The Celery application: broker settings, reliability settings and the beat schedule.

The API imports this module only to publish tasks *by name*; task code lives in
``worker.tasks`` and is loaded by worker processes alone.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from worker.config import Settings, get_settings

TASK_PROVISION = "lifecycle.provision"
TASK_START = "lifecycle.start"
TASK_HIBERNATE = "lifecycle.hibernate"
TASK_SNAPSHOT = "lifecycle.snapshot"
TASK_DIFF = "lifecycle.diff"
TASK_ARCHIVE = "lifecycle.archive"

SWEEP_HIBERNATE_IDLE = "sweeps.hibernate_idle"
SWEEP_RELAY_OUTBOX = "sweeps.relay_outbox"
SWEEP_REAP_RUNS = "sweeps.reap_runs"
SWEEP_EXPIRE_SNAPSHOTS = "sweeps.expire_snapshots"

DEFAULT_QUEUE = "lifecycle"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings. Reliability first: a task is acknowledged only after it ran,
    and a task whose worker died is redelivered."""
    # Longer than any countdown or retry delay, so Redis never redelivers a message that
    # is merely waiting for its ETA (which would duplicate it).
    visibility = int(max(settings.retry_backoff_max_seconds * 4, settings.lease_seconds * 2, 3600))
    return {
        "broker_url": settings.broker_url,
        "task_default_queue": DEFAULT_QUEUE,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "timezone": "UTC",
        "enable_utc": True,
        "task_ignore_result": True,
        "task_track_started": True,
        "task_send_sent_event": settings.task_sent_events,
        "worker_send_task_events": True,
        "worker_hijack_root_logger": False,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {
            "visibility_timeout": visibility,
            "socket_connect_timeout": 2,
            "socket_timeout": 5,
        },
        # Publishing must fail fast when the broker is down: the outbox keeps the job.
        "task_publish_retry": False,
        "broker_connection_timeout": 2,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
    }


def beat_schedule(settings: Settings) -> dict[str, Any]:
    return {
        SWEEP_HIBERNATE_IDLE: {
            "task": SWEEP_HIBERNATE_IDLE,
            "schedule": settings.sweep_interval_seconds,
        },
        SWEEP_RELAY_OUTBOX: {
            "task": SWEEP_RELAY_OUTBOX,
            "schedule": settings.relay_interval_seconds,
        },
        SWEEP_REAP_RUNS: {"task": SWEEP_REAP_RUNS, "schedule": settings.reap_interval_seconds},
        SWEEP_EXPIRE_SNAPSHOTS: {"task": SWEEP_EXPIRE_SNAPSHOTS, "schedule": 24 * 3600.0},
    }


def _survive_broker_loss() -> None:
    """kombu (5.7) kills the worker when Redis drops while a task runs: the lost
    channel's transport (or its client) is already gone when kombu uses it to restore
    the unacknowledged messages on close, or to acknowledge a task that finished after
    the reconnect, and the ``AttributeError`` escapes as an "Unrecoverable error". Raise
    the connection error it stands for instead, which kombu and Celery handle (log and
    go on). The messages stay in Redis's unacked index and come back after the
    visibility timeout: a duplicate delivery, which the run's claim skips."""
    import redis
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams
    if getattr(original, "_lifecycle_patched", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        transport = getattr(self, "connection", None)
        if transport is None or getattr(transport, "client", None) is None:
            logging.getLogger(__name__).warning(
                "a channel of a lost broker connection was used; its unacknowledged "
                "messages are redelivered after the visibility timeout"
            )
            raise redis.exceptions.ConnectionError("the broker connection was closed")
        return original(self, asynchronous=asynchronous)  # type: ignore[no-untyped-call]

    _connparams._lifecycle_patched = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


_survive_broker_loss()


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("lifecycle", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = beat_schedule(settings)
    return app


app = create_celery()
