"""The Celery application: broker settings, reliability settings and the beat schedule.

The API imports this module only to publish tasks *by name*; task code lives in
``worker.tasks`` and is loaded by worker processes alone. Importing it builds the app and
does nothing else: no connection, no patching.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.config import Settings, get_settings
from worker.task_names import (  # noqa: F401 -- re-exported: the names Celery users know
    DEFAULT_QUEUE,
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
    TASK_DIFF,
    TASK_HIBERNATE,
    TASK_PROVISION,
    TASK_SNAPSHOT,
    TASK_START,
)


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
        SWEEP_WEBHOOK_RETRIES: {
            "task": SWEEP_WEBHOOK_RETRIES,
            "schedule": settings.webhook_sweep_interval_seconds,
        },
        SWEEP_RETENTION: {"task": SWEEP_RETENTION, "schedule": settings.retention_interval_seconds},
        # As often as hosts are checked: a lost host's commands end soon after it is.
        SWEEP_REAP_COMMANDS: {
            "task": SWEEP_REAP_COMMANDS,
            "schedule": max(1.0, settings.host_lost_after_seconds / 4),
        },
        SWEEP_EXPIRE_SNAPSHOTS: {"task": SWEEP_EXPIRE_SNAPSHOTS, "schedule": 24 * 3600.0},
        # A quarter of the silence that declares a host lost: detected within 1.25x.
        SWEEP_LOST_HOSTS: {
            "task": SWEEP_LOST_HOSTS,
            "schedule": max(1.0, settings.host_lost_after_seconds / 4),
        },
        **(
            {
                SWEEP_CHECKPOINTS: {
                    "task": SWEEP_CHECKPOINTS,
                    "schedule": max(1.0, min(60.0, settings.checkpoint_interval_seconds / 4)),
                }
            }
            if settings.checkpoint_interval_seconds > 0
            else {}
        ),
    }


def create_celery(settings: Settings | None = None) -> Celery:
    """The Celery app, configured; nothing else. Each process that talks to the broker
    installs kombu's fix for a lost Redis connection itself
    (``providers.broker.survive_broker_loss``: a worker in ``worker.tasks`` at
    ``worker_init``, Flower and beat in their commands, the API in ``create_app``)."""
    settings = settings or get_settings()
    app = Celery("lifecycle", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    app.conf.beat_schedule = beat_schedule(settings)
    return app


app = create_celery()
