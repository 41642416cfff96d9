"""orchestrate: sessions per second through provision → start → hibernate → resume with
the real worker and the no-op provider set, against raw Celery no-op tasks.

One worker process (``lifecycle worker -c N --pool prefork``, ``LIFECYCLE_PROVIDER_SET=noop``,
also loading ``bench.noop``) serves both sides, so the broker, pool, prefetch, late
acknowledgement and event settings are the same.

System, per round of ``n`` new sessions (rows bulk-inserted untimed, as the API writes
them: session, first chat, queued provision run):

1. publish the ``n`` provision jobs; the worker provisions and chains the start
   (it publishes the start job itself); wait until all ``n`` are ``active``;
2. record a hibernate kick for each (untimed), publish, wait until all are
   ``hibernated``;
3. record a start kick for each (untimed), publish, wait until all are ``active`` again.

The figure is ``n`` / (sum of the three timed phases): 4 tasks per session.

Baseline: the same three phases with ``2n``, ``n`` and ``n`` ``bench.noop`` tasks
published the same way, each phase timed until the worker ran them all (the task
increments a Redis counter; its only work).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

from bench.common import Context, Proc, Result, Servers, Spread, celery_app, compare, start_worker

PHASES = (
    # (run kind, trigger, state waited for, version reached)
    ("provision", "create", "active", 2),
    ("hibernate", "api", "hibernated", 3),
    ("start", "api", "active", 4),
)


@dataclass
class Round:
    seconds: float
    sessions: int

    @property
    def rate(self) -> float:
        return self.sessions / self.seconds


class Driver:
    """Feeds sessions through their lifecycle on a running worker."""

    def __init__(self, servers: Servers, worker: Proc) -> None:
        import psycopg

        from worker.config import get_settings
        from worker.db.engine import get_sessionmaker
        from worker.services import accounts

        self.servers = servers
        self.worker = worker
        self.settings = get_settings()
        self.app = celery_app()
        self.conn = psycopg.connect(servers.conninfo(), autocommit=True)
        with get_sessionmaker().begin() as db:
            self.account = accounts.create_account(db, "bench-orchestrate").id
        import redis

        self.redis = redis.Redis.from_url(servers.broker_url)

    def close(self) -> None:
        self.conn.close()
        self.redis.close()

    # ----------------------------------------------------------------- system
    def _insert_sessions(self, n: int) -> None:
        owner = self.settings.workspace_owner
        self.conn.execute(
            """
            WITH new AS (
                INSERT INTO sessions (id, user_id, title, title_generated, status, is_new_branch,
                    global_skill_refs, lifecycle_state, lifecycle_version, repo_owner, repo_name,
                    branch, clone_url, sandbox_state, lines_added, lines_removed, created_at,
                    updated_at)
                SELECT s.id, %(acct)s, 'orchestrate ' || s.id, false, 'running', true, '[]',
                    'provisioning', 0, %(owner)s, %(acct_s)s, 'session/' || s.id,
                    'noop://' || %(owner)s || '/' || %(acct_s)s || '.git', '{"type": "local"}',
                    0, 0, now(), now()
                FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, %(n)s)) s
                RETURNING id
            )
            INSERT INTO chats (id, session_id, title, model_id, created_at, updated_at)
            SELECT gen_random_uuid(), id, 'New chat', %(model)s, now(), now() FROM new
            """,
            {
                "acct": self.account,
                "acct_s": str(self.account),
                "owner": owner,
                "n": n,
                "model": self.settings.default_model_id,
            },
        )

    def _kick(self, kind: str, trigger: str) -> list[tuple[str, dict[str, Any], str]]:
        """Record a queued run of ``kind`` for every session of the round (what
        ``runs.kick`` does for a free session); return the jobs to publish."""
        from worker.domain.lifecycle import RunKind
        from worker.routing import queue_for
        from worker.task_names import TASK_FOR_KIND

        rows = self.conn.execute(
            """
            WITH ins AS (
                INSERT INTO lifecycle_runs (id, session_id, kind, trigger, state, attempts,
                    issued_version, created_at, updated_at)
                SELECT gen_random_uuid(), id, %(kind)s, %(trigger)s, 'queued', 0,
                    lifecycle_version, now(), now()
                FROM sessions WHERE user_id = %(acct)s
                RETURNING id, session_id, issued_version
            )
            SELECT ins.id, ins.session_id, ins.issued_version, s.sandbox_state
            FROM ins JOIN sessions s ON s.id = ins.session_id
            """,
            {"kind": kind, "trigger": trigger, "acct": self.account},
        ).fetchall()
        task = TASK_FOR_KIND[RunKind(kind)]
        return [
            (
                task,
                {"session_id": str(sid), "run_id": str(rid), "version": version},
                queue_for(kind, state),
            )
            for rid, sid, version, state in rows
        ]

    def _count(self, state: str, version: int) -> int:
        row = self.conn.execute(
            "SELECT count(*) FROM sessions WHERE user_id = %s AND lifecycle_state = %s "
            "AND lifecycle_version >= %s",
            (self.account, state, version),
        ).fetchone()
        return int(row[0]) if row else 0

    def _wait(self, done: Any, n: int, what: str) -> None:
        last, since = -1, time.monotonic()
        while True:
            got = done()
            if got >= n:
                return
            if got != last:
                last, since = got, time.monotonic()
            elif time.monotonic() - since > 60:
                raise RuntimeError(f"{what}: stuck at {got}/{n} for 60s\n{self._diagnose()}")
            if not self.worker.alive():
                raise RuntimeError(f"the worker exited:\n{self.worker.log_tail()}")
            time.sleep(0.01)

    def _diagnose(self) -> str:
        rows = self.conn.execute(
            "SELECT kind, state, coalesce(error, ''), count(*) FROM lifecycle_runs r "
            "JOIN sessions s ON s.id = r.session_id WHERE s.user_id = %s "
            "GROUP BY 1, 2, 3 ORDER BY 1, 2",
            (self.account,),
        ).fetchall()
        outbox = self.conn.execute(
            "SELECT count(*) FILTER (WHERE published_at IS NULL), count(*), "
            "max(attempts), max(last_error) FROM outbox"
        ).fetchone()
        queues = {
            str(k): self.redis.llen(k)
            for k in self.redis.keys("lifecycle*")
            if self.redis.type(k) == b"list"
        }
        return (
            "runs: "
            + "; ".join(f"{k}/{s} {e[:80]!r}: {c}" for k, s, e, c in rows)
            + f"\noutbox (unpublished, total, max attempts, last error): {outbox}"
            + f"\nbroker queues: {queues}, unacked: {self.redis.hlen('unacked')}"
            + f"\nworker log:\n{self.worker.log_tail(30)}"
        )

    def _publish(self, jobs: list[tuple[str, dict[str, Any], str]]) -> None:
        send = self.app.send_task
        for task, kwargs, queue in jobs:
            send(task, kwargs=kwargs, task_id=str(uuid.uuid4()), queue=queue, retry=False)

    def system_round(self, n: int) -> Round:
        """``n`` sessions through the four runs; returns the timed total."""
        self._insert_sessions(n)
        total = 0.0
        for kind, trigger, state, version in PHASES:
            jobs = self._kick(kind, trigger)
            t = time.perf_counter()
            self._publish(jobs)
            self._wait(lambda s=state, v=version: self._count(s, v), n, f"{kind} phase")
            total += time.perf_counter() - t
        self.cleanup()
        return Round(total, n)

    def cleanup(self) -> None:
        self.conn.execute("DELETE FROM sessions WHERE user_id = %s", (self.account,))
        self.conn.execute("TRUNCATE outbox")

    # ----------------------------------------------------------------- baseline
    def baseline_round(self, n: int) -> Round:
        """The same number of ``bench.noop`` tasks in the same three phases."""
        from bench.celery_noop import NOOP_TASK

        total = 0.0
        for count in (2 * n, n, n):
            key = f"bench.noop.{uuid.uuid4().hex}"
            jobs = [(NOOP_TASK, {"counter": key}, "lifecycle")] * count
            t = time.perf_counter()
            self._publish(jobs)
            self._wait(lambda k=key: int(self.redis.get(k) or 0), count, "noop phase")
            total += time.perf_counter() - t
            self.redis.delete(key)
        return Round(total, n)


def run(ctx: Context) -> list[Result]:
    servers = ctx.servers
    sizes = ctx.sizes
    n = sizes.orchestrate_sessions
    worker = start_worker(servers, ctx.work, sizes.worker_concurrency, name="worker-orchestrate")
    driver = Driver(servers, worker)
    try:
        warm = max(5, n // 5)
        driver.system_round(warm)
        driver.baseline_round(warm)
        sys_rates: list[float] = []
        raw_rates: list[float] = []
        cpu: dict[str, list[float]] = {"sys": [], "raw": []}  # worker CPU ms per session

        def measure(side: str) -> None:
            before = worker.cpu_seconds()
            got = driver.system_round(n) if side == "sys" else driver.baseline_round(n)
            cpu[side].append((worker.cpu_seconds() - before) / n * 1000)
            (sys_rates if side == "sys" else raw_rates).append(got.rate)

        for r in range(sizes.orchestrate_rounds):
            for side in ("raw", "sys") if r % 2 else ("sys", "raw"):
                measure(side)
            ctx.log(
                f"orchestrate: round {r + 1}: {sys_rates[-1]:.1f} vs {raw_rates[-1]:.1f} sessions/s"
            )
    finally:
        driver.close()
        worker.stop()
    return [
        compare(
            "orchestrate",
            "sessions/s (4 runs each)",
            "sessions/s",
            sys_rates,
            raw_rates,
            ">= 0.5",
            f"{n:,} sessions/round, worker -c {sizes.worker_concurrency} prefork",
            extra={
                "worker_cpu_ms_per_session": round(Spread.of(cpu["sys"]).median, 2),
                "worker_cpu_ms_per_4_noop_tasks": round(Spread.of(cpu["raw"]).median, 2),
            },
        )
    ]
