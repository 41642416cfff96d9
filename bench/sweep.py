"""sweep: one idle-hibernation sweep picking the due sessions out of a large table,
against a raw ``SELECT … FOR UPDATE SKIP LOCKED`` of the same rows and one Redis push
each; and the sweep's own cost at the large table size over the small one.

Table: ``small`` (the issue: 100,000) session rows, bulk-loaded with
``INSERT … SELECT generate_series``, each with its first chat; ``due`` (1,000) of them
active and past ``hibernateAfter``, spread evenly over the table; of the rest, 20% are
active but not yet due and 80% hibernated. Then ``large - small`` more rows
(900,000: none due) are added the same way and everything is measured again.
``VACUUM ANALYZE`` after each load.

System: :func:`worker.services.sweeps.hibernate_idle` in this process (what the beat
task and ``lifecycle sweep hibernate_idle`` run): batches of ``sweep_batch_size`` (200)
candidates ``FOR UPDATE SKIP LOCKED`` over ``ix_sessions_hibernate_due``, a queued
hibernate run and an outbox record for each, commit, publish each job through Celery,
mark the outbox records published.

Baseline: one transaction with the same candidate query in raw SQL (state, due rule,
no lease, no active chat stream, no open run) ``LIMIT due``, then one ``LPUSH`` per row.

Between rounds the runs and outbox records the sweep wrote are deleted and the Redis
database flushed, so every round finds the same due rows.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from bench.common import Context, Result, Servers, Spread, celery_app, compare

RAW_SQL = """
SELECT s.id FROM sessions s
WHERE s.lifecycle_state = 'active'
  AND LEAST(s.hibernate_after, s.sandbox_expires_at) <= now() + make_interval(secs => %(guard)s)
  AND (s.hibernate_after <= now() OR s.sandbox_expires_at - make_interval(secs => %(guard)s) <= now())
  AND s.lifecycle_run_id IS NULL
  AND NOT EXISTS (SELECT 1 FROM chats c WHERE c.session_id = s.id AND c.active_stream_id IS NOT NULL)
  AND NOT EXISTS (SELECT 1 FROM lifecycle_runs r WHERE r.session_id = s.id
                  AND r.state IN ('pending', 'queued', 'running'))
ORDER BY LEAST(s.hibernate_after, s.sandbox_expires_at)
LIMIT %(limit)s
FOR UPDATE OF s SKIP LOCKED
"""


def load_rows(servers: Servers, account: uuid.UUID, start: int, stop: int, every: int) -> None:
    """Rows ``start`` .. ``stop - 1``; row ``g`` is due when ``g % every == 0``.
    Sessions and their chats, in one statement each."""
    import psycopg

    with psycopg.connect(servers.conninfo(), autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO sessions (id, user_id, title, title_generated, status, is_new_branch,
                global_skill_refs, lifecycle_state, lifecycle_version, repo_owner, repo_name,
                branch, clone_url, sandbox_state, last_activity_at, hibernate_after,
                sandbox_expires_at, provisioned_at, lines_added, lines_removed, created_at,
                updated_at)
            SELECT s.id, %(acct)s, 'sweep ' || s.g, false, 'running', true, '[]',
                CASE WHEN s.due OR s.g %% 5 = 1 THEN 'active' ELSE 'hibernated' END,
                4, 'recoupable', %(acct_s)s, 'session/' || s.id, 'file:///bench.git',
                '{"type": "local", "queue": "lifecycle.host.bench"}',
                now() - interval '2 hours',
                CASE WHEN s.due THEN now() - interval '1 minute' - (s.g || ' ms')::interval
                     ELSE now() + interval '10 minutes' + (s.g || ' ms')::interval END,
                now() + interval '3 hours', now() - interval '1 day', 10, 2,
                now() - interval '1 day', now()
            FROM (SELECT gen_random_uuid() AS id, g, g %% %(every)s = 0 AS due
                  FROM generate_series(%(start)s, %(stop)s - 1) g) s
            """,
            {"acct": account, "acct_s": str(account), "start": start, "stop": stop, "every": every},
        )
        conn.execute(
            """
            INSERT INTO chats (id, session_id, title, model_id, created_at, updated_at)
            SELECT gen_random_uuid(), s.id, 'New chat', 'm', s.created_at, s.created_at
            FROM sessions s WHERE NOT EXISTS (SELECT 1 FROM chats c WHERE c.session_id = s.id)
            """
        )
        conn.execute("VACUUM ANALYZE sessions")
        conn.execute("VACUUM ANALYZE chats")
        # Write the load's dirty pages out now, so the checkpointer does not do it while
        # the sweep is measured (it needs superuser; without it the measurement is noisier).
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")


def run(ctx: Context) -> list[Result]:
    import psycopg
    import redis

    from worker.config import get_settings
    from worker.db.engine import get_sessionmaker
    from worker.providers.broker import CeleryPublisher
    from worker.providers.registry import build_providers
    from worker.services import accounts, sweeps
    from worker.services.lifecycle import LifecycleService

    servers = ctx.servers
    sizes = ctx.sizes
    settings = get_settings().model_copy(update={"provider_set": "noop"})
    svc = LifecycleService(
        settings,
        get_sessionmaker(),
        build_providers(settings),
        CeleryPublisher(celery_app()),
        hostname_queue="lifecycle.host.bench",
    )
    client = redis.Redis.from_url(servers.broker_url)
    raw = psycopg.connect(servers.conninfo())
    admin = psycopg.connect(servers.conninfo(), autocommit=True)
    with get_sessionmaker().begin() as db:
        account = accounts.create_account(db, "bench-sweep").id
    due = sizes.sweep_due
    guard = settings.hibernate_guard_seconds

    def reset() -> None:
        admin.execute("TRUNCATE lifecycle_runs, outbox")
        servers.flush_redis()

    def system() -> float:
        reset()
        t = time.perf_counter()
        got = sweeps.hibernate_idle(svc)
        elapsed = time.perf_counter() - t
        if got["queued"] != due:
            raise RuntimeError(f"the sweep queued {got['queued']} sessions, expected {due}")
        return elapsed

    def baseline() -> float:
        reset()
        message = b"x" * 900  # the size of a Celery task message
        t = time.perf_counter()
        with raw.transaction():
            ids = [row[0] for row in raw.execute(RAW_SQL, {"guard": guard, "limit": due})]
            for sid in ids:
                client.lpush("bench.raw.sweep", message + str(sid).encode())
        elapsed = time.perf_counter() - t
        if len(ids) != due:
            raise RuntimeError(f"the raw query found {len(ids)} rows, expected {due}")
        return elapsed

    def measure(rows: int) -> tuple[list[float], list[float]]:
        system()
        baseline()  # warm-up
        sys_t: list[float] = []
        raw_t: list[float] = []
        for r in range(sizes.rounds):
            if r % 2:
                raw_t.append(baseline())
                sys_t.append(system())
            else:
                sys_t.append(system())
                raw_t.append(baseline())
        ctx.log(
            f"sweep: {rows:,} rows: {Spread.of(sys_t).median * 1000:.0f} ms vs "
            f"{Spread.of(raw_t).median * 1000:.0f} ms"
        )
        return sys_t, raw_t

    try:
        small, large = sizes.sweep_small, sizes.sweep_large
        t = time.monotonic()
        load_rows(servers, account, 0, small, small // due)
        ctx.log(f"sweep: loaded {small:,} rows in {time.monotonic() - t:.1f}s")
        small_sys, small_raw = measure(small)
        t = time.monotonic()
        load_rows(servers, account, small, large, large + 1)
        ctx.log(f"sweep: loaded {large - small:,} more rows in {time.monotonic() - t:.1f}s")
        large_sys, large_raw = measure(large)
    finally:
        reset()
        raw.close()
        admin.execute("TRUNCATE sessions, chats, lifecycle_runs, outbox CASCADE")
        admin.close()
        client.close()
    results = [
        compare(
            "sweep",
            f"sweep time, {rows:,} rows",
            "s",
            sys_t,
            raw_t,
            "<= 2.0",
            f"{due:,} due of {rows:,} rows",
        )
        for rows, sys_t, raw_t in ((small, small_sys, small_raw), (large, large_sys, large_raw))
    ]
    # The sweep's cost as the table grows: large-table rounds over small-table rounds.
    scale = compare(
        "sweep",
        f"sweep time {large:,} / {small:,} rows",
        "s",
        large_sys,
        small_sys,
        "<= 1.3",
        f"{due:,} due; baseline = the sweep at {small:,} rows",
        note="the baseline of this row is the sweep itself on the smaller table",
    )
    results.append(scale)
    return results
