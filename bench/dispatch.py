"""dispatch: from a create answered to the worker holding the provision task.

The path the issue asks not to slow down: the API commits the session with its outbox
job and answers, and the job has to reach a worker. Measured at concurrency 1 and 8.

System: ``POST /api/sessions`` through the real API (``--workers N``), one keep-alive
``http.client`` connection per client thread; the moment the client has read the answer
(``time.time()``), against the moment the real worker's main process received the
session's ``lifecycle.provision`` task (Celery's ``task_received`` signal, written by
``bench/celery_noop.py`` when ``BENCH_RECEIPTS`` is set). Same machine, same clock. The
worker (no-op providers) runs with ``--prefetch-multiplier 10000`` so that it takes each
message as it arrives even while its pool is busy with earlier sessions: the figure is
the path to the worker, not the worker's backlog.

Baseline: the create floor's transaction (the same three inserts, ``bench/create.py``),
then the client publishes a ``bench.noop`` task to the same worker through Celery
itself (``send_task``), timed from the publish's return to the worker's receipt the
same way. No target: the issue asks for the figures before and after a change of the
publishing path, and that they do not get worse.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections.abc import Callable

from bench.common import Context, Result, Spread, api_process, celery_app, compare, percentile
from bench.create import Load, _callers, _raw_worker

RECEIPTS = "bench.dispatch.receipts"
COUNTER = "bench.dispatch.count"


def _system(
    host: str, port: int, keys: list[str], sent: dict[str, float]
) -> Callable[[], Callable[[int], None]]:
    lock = threading.Lock()

    def make() -> Callable[[int], None]:
        conn = http.client.HTTPConnection(host, port, timeout=60)

        def op(i: int) -> None:
            conn.request(
                "POST",
                "/api/sessions",
                body=json.dumps({"title": f"dispatch {uuid.uuid4()}"}),
                headers={"x-api-key": keys[i % len(keys)], "content-type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read()
            answered = time.time()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")
            with lock:
                sent[json.loads(data)["session"]["id"]] = answered

        return op

    return make


def _baseline(
    floor: Callable[[], Callable[[int], None]], sent: dict[str, float]
) -> Callable[[], Callable[[int], None]]:
    app = celery_app()
    lock = threading.Lock()

    def make() -> Callable[[int], None]:
        insert = floor()

        def op(i: int) -> None:
            insert(i)  # the floor's transaction (and its LPUSH of a message of Celery's size)
            mark = str(uuid.uuid4())
            app.send_task("bench.noop", kwargs={"counter": COUNTER, "mark": mark})
            with lock:
                sent[mark] = time.time()

        return op

    return make


def _latencies(client: object, sent: dict[str, float], timeout: float = 120.0) -> list[float]:
    """Wait for every receipt; seconds from answer (or publish) to receipt."""
    deadline = time.monotonic() + timeout
    while True:
        got = client.hgetall(RECEIPTS)  # type: ignore[attr-defined]
        missing = [m for m in sent if m.encode() not in got]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if missing:
        raise RuntimeError(
            f"{len(missing)} of {len(sent)} tasks never reached the worker"
            f" (e.g. {missing[0]}; received {list(got)[:3]})"
        )
    return [float(got[m.encode()]) - at for m, at in sent.items()]


def run(ctx: Context) -> list[Result]:
    import redis

    from bench.common import start_worker

    servers = ctx.servers
    sizes = ctx.sizes
    callers = _callers()
    keys = [key for _, key in callers]
    floor = _raw_worker(servers.conninfo(), servers.broker_url, [a for a, _ in callers])
    client = redis.Redis.from_url(servers.broker_url)
    results: list[Result] = []
    # A prefetch large enough that the worker's main process takes every message off
    # the broker as it arrives, whether or not a pool process is free to run it: the
    # receipt then times the path to the worker, not the queue in front of its pool.
    worker = start_worker(
        servers,
        ctx.work,
        sizes.worker_concurrency,
        "dispatch-worker",
        ("--prefetch-multiplier", "10000"),
        BENCH_RECEIPTS=RECEIPTS,
    )
    try:
        with api_process(servers, ctx.work, sizes.api_workers) as (host, port, _api):
            for concurrency in (1, 8):
                n = sizes.dispatch_requests * max(1, concurrency // 2)
                p50: dict[str, list[float]] = {"sys": [], "raw": []}
                p99: dict[str, list[float]] = {"sys": [], "raw": []}
                for r in range(sizes.rounds + 1):  # the first round warms up
                    for side in ("sys", "raw") if r % 2 == 0 else ("raw", "sys"):
                        client.delete(RECEIPTS)
                        sent: dict[str, float] = {}
                        make = (
                            _system(host, port, keys, sent)
                            if side == "sys"
                            else _baseline(floor, sent)
                        )
                        Load(n, concurrency).run(make)
                        lat = _latencies(client, sent)
                        if r:
                            p50[side].append(percentile(lat, 50) * 1000)
                            p99[side].append(percentile(lat, 99) * 1000)
                ctx.log(
                    f"dispatch: c={concurrency}: p50 {Spread.of(p50['sys']).median:.1f} ms vs "
                    f"{Spread.of(p50['raw']).median:.1f} ms"
                )
                size = f"c={concurrency}, {n:,} creates/round, {sizes.api_workers} API workers, worker -c {sizes.worker_concurrency}"
                for pct, values in (("p50", p50), ("p99", p99)):
                    results.append(
                        compare(
                            "dispatch",
                            f"{pct} answer → worker c={concurrency}",
                            "ms",
                            values["sys"],
                            values["raw"],
                            "none",
                            size,
                        )
                    )
    finally:
        worker.stop()
        client.delete(RECEIPTS)
        client.close()
    return results
