"""The lifecycle service as the in-process tests build it: the run's settings and
database, the providers those settings name, and a Celery publisher on the run's Redis.

The ``svc`` fixture (``tests/conftest.py``) is ``make_service(service_settings(tmp_path))``;
a test that needs other settings, another session factory or no publisher builds its own
with the same two functions."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from worker.config import Settings
    from worker.services.lifecycle import LifecycleService


def service_settings(data_dir: Path, **overrides: Any) -> Settings:
    """The run's settings with a data directory of the test's own, a fault plan file in it
    (write it to inject provider faults), two retries and every run a delivery of its own
    (``start_in_place`` off: tests step through runs one by one), then ``overrides``."""
    from worker.config import get_settings

    update = {
        "data_dir": data_dir,
        "fault_plan": data_dir / "faults.json",
        "task_max_retries": 2,
        "start_in_place": False,
    }
    return get_settings().model_copy(update={**update, **overrides})


def make_service(
    settings: Settings | None = None,
    *,
    factory: sessionmaker[Session] | None = None,
    publish: bool = True,
    hostname_queue: str | None = None,
) -> LifecycleService:
    """A :class:`LifecycleService` on ``settings`` (default: the run's), ``factory``
    (default: the run's session factory) and the providers the settings name; it
    publishes through Celery unless ``publish`` is false. ``hostname_queue`` names the
    queue of the worker host it plays (default: this machine's)."""
    from worker.celery_app import create_celery
    from worker.config import get_settings
    from worker.db.engine import get_sessionmaker
    from worker.providers.broker import CeleryPublisher
    from worker.providers.registry import build_providers
    from worker.services.lifecycle import LifecycleService

    settings = settings or get_settings()
    return LifecycleService(
        settings,
        factory or get_sessionmaker(),
        build_providers(settings),
        CeleryPublisher(create_celery(settings)) if publish else None,
        hostname_queue=hostname_queue,
    )


def host_of(svc: LifecycleService) -> str:
    """The worker host name the service plays (its host queue without the prefix)."""
    return svc.queue.removeprefix("lifecycle.host.")


def beat_long_ago(svc: LifecycleService, seconds: int = 3600) -> None:
    """Record a heartbeat of the service's host, then move it ``seconds`` into the past
    (the host looks lost to ``hosts.recover_lost_hosts``)."""
    from sqlalchemy import text

    from worker.services import hosts

    with svc.factory.begin() as db:
        hosts.beat(db, host_of(svc), svc.queue)
        db.execute(
            text(
                "UPDATE worker_hosts SET last_beat_at = now() - make_interval(secs => :s)"
                " WHERE hostname = :h"
            ),
            {"s": seconds, "h": host_of(svc)},
        )
