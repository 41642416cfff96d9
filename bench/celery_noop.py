"""The ``bench.noop`` task: the raw-Celery baseline of the orchestrate benchmark.

Loaded into the real worker with ``--include bench.celery_noop``, so it runs with the
same broker, pool, prefetch, late acknowledgement and event settings as the lifecycle
tasks. Its only work is one Redis ``INCR`` so the benchmark can count completions.

With ``BENCH_RECEIPTS`` set to a Redis hash name (the dispatch benchmark), the worker's
main process also writes when it received each task, as Celery's ``task_received``
signal sees it: ``HSET <hash> <session_id or mark> <time.time()>``.
"""

from __future__ import annotations

import os
import time
from functools import lru_cache
from typing import Any

from celery.signals import task_received

from worker.celery_app import app

NOOP_TASK = "bench.noop"


@lru_cache(maxsize=1)
def _redis() -> Any:
    import redis

    return redis.Redis.from_url(app.conf.broker_url)


@app.task(name=NOOP_TASK, acks_late=True, reject_on_worker_lost=True)  # type: ignore[untyped-decorator]
def noop(counter: str, mark: str | None = None) -> None:  # noqa: ARG001 -- read on receipt
    """Do nothing but count."""
    _redis().incr(counter)


RECEIPTS = os.environ.get("BENCH_RECEIPTS")


def _received(request: Any = None, **_: Any) -> None:
    at = time.time()
    kwargs = getattr(request, "kwargs", None) or {}
    mark = kwargs.get("session_id") or kwargs.get("mark")
    if RECEIPTS and mark:
        _redis().hset(RECEIPTS, str(mark), repr(at))


if RECEIPTS:
    task_received.connect(_received, weak=False)
