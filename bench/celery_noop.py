"""The ``bench.noop`` task: the raw-Celery baseline of the orchestrate benchmark.

Loaded into the real worker with ``--include bench.celery_noop``, so it runs with the
same broker, pool, prefetch, late acknowledgement and event settings as the lifecycle
tasks. Its only work is one Redis ``INCR`` so the benchmark can count completions.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from worker.celery_app import app

NOOP_TASK = "bench.noop"


@lru_cache(maxsize=1)
def _redis() -> Any:
    import redis

    return redis.Redis.from_url(app.conf.broker_url)


@app.task(name=NOOP_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
def noop(counter: str) -> None:
    """Do nothing but count."""
    _redis().incr(counter)
