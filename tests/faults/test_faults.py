"""Fault scenarios (issue 4): nothing is lost, nothing is done twice, versions never go
back, nothing is left stuck, whatever crashes, restarts or repeats.

Every scenario runs real processes on loopback (the API, a prefork Celery worker, a
``lifecycle beat``) against the suite's own PostgreSQL and Redis, drives sessions over
HTTP, and ends with one line of figures::

    scenario=<name> sessions=N target_reached=N lost=N duplicated=N version_regressions=N stuck=N …

- **sessions**: creates answered 200 (clients retry a 503, or a connection refused or
  reset, with the same Idempotency-Key).
- **lost**: an answered create whose row is missing, or whose session rests short of its
  target with nothing left that would move it (a dropped job).
- **duplicated**: side effects beyond one: repositories beyond one per account, branches
  beyond one per session, snapshot files beyond one per session holding a snapshot
  (``<sid>-*`` in the store), session rows beyond the answered creates.
- **version_regressions**: decreases of a session's ``lifecycleVersion`` seen by a poller
  sampling every session every 100 ms during the whole run.
- **stuck**: not at its target after the bounded drain.

Each has a short variant (``make test``) and a full one marked ``faults``
(``make test-faults``; ``FAULTS_SCALE`` scales it).
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, text

from tests.faults.harness import (
    FULL_CYCLE,
    VARIANTS,
    Api,
    Cluster,
    Driver,
    Figures,
    HttpStats,
    MakeCluster,
    Observer,
    OwnServers,
    Plan,
    compute_figures,
    make_callers,
    make_engine,
    random_delays,
    sized,
    wait_for,
)
from tests.support.processes import poll

BASE_ENV = {
    "LIFECYCLE_LEASE_SECONDS": "4",
    "LIFECYCLE_RETRY_BACKOFF_BASE_SECONDS": "0.2",
    "LIFECYCLE_RETRY_BACKOFF_MAX_SECONDS": "2",
    "LIFECYCLE_SWEEP_INTERVAL_SECONDS": "1",
    "LIFECYCLE_RELAY_INTERVAL_SECONDS": "1",
    "LIFECYCLE_REAP_INTERVAL_SECONDS": "1",
    # Only scenario 4 lets the idle sweep act; elsewhere sessions are driven by kicks.
    "LIFECYCLE_IDLE_TIMEOUT_SECONDS": "3600",
}
ACCOUNTS = 3


@dataclass
class Run:
    cluster: Cluster
    engine: Engine
    observer: Observer
    stats: HttpStats
    api: Api
    driver: Driver
    started: float

    def figures(self, name: str, target: str) -> Figures:
        fig = compute_figures(
            name,
            driver=self.driver,
            observer=self.observer,
            engine=self.engine,
            data_dir=self.cluster.data_dir,
            target=target,
        )
        fig.extra["bad_responses"] = len(self.stats.bad)
        fig.must_be_zero.append("bad_responses")
        fig.problems += self.stats.bad[:10]
        return fig


@contextmanager
def running(cluster: Cluster, plan: Plan, *, clients: int = 6) -> Iterator[Run]:
    """Observer + driver (``clients`` requests at once at most) around a started
    cluster; threads halted on the way out."""
    engine = make_engine(cluster.database_url)
    callers = make_callers(engine, ACCOUNTS, cluster.root.name)
    observer = Observer(engine)
    stats = HttpStats()
    api = Api(cluster.base_url, stats)
    driver = Driver(api, callers, observer, plan, workers=clients)
    observer.start()
    driver.start()
    try:
        yield Run(cluster, engine, observer, stats, api, driver, time.monotonic())
    finally:
        driver.halt()
        observer.halt()
        api.close()
        engine.dispose()


def finish(run: Run, name: str, target: str, **extra: Any) -> Figures:
    """Stop every process, then count (the figures are read from a quiet system)."""
    elapsed = time.monotonic() - run.started
    run.driver.halt()
    run.cluster.stop_all()
    fig = run.figures(name, target)
    fig.extra.update(extra)
    # A delivery Celery gave up on is dropped (only the reaper would ever redo it).
    logs = "".join(run.cluster.log_text(p.stem) for p in run.cluster.logs.glob("worker*.log"))
    fig.extra["deliveries_given_up"] = logs.count("MaxRetriesExceededError")
    fig.must_be_zero.append("deliveries_given_up")
    fig.extra["elapsed_s"] = round(elapsed, 1)
    return fig


def start_all(cluster: Cluster, beats: int = 1) -> None:
    cluster.start_api()
    cluster.start_worker()
    for i in range(beats):
        cluster.start_beat(f"beat{i}")


# --------------------------------------------------------------------------- 1


@pytest.mark.parametrize("variant", VARIANTS)
def test_worker_sigkill(make_cluster: MakeCluster, variant: str) -> None:
    """SIGKILL the worker (prefork parent and children) at random moments while sessions
    go create → active → hibernate → resume; restart it each time."""
    n = sized(200, 20, variant)
    kills = sized(12, 4, variant)
    cluster = make_cluster("sigkill", BASE_ENV)
    # Slow some provider calls so a kill lands mid-task more often.
    calls = ["sandbox.start_from_clone", "sandbox.start_from_snapshot", "snapshots.save"]
    cluster.plan_faults(random_delays(calls, count=n, delay=0.6, share=0.25))
    start_all(cluster)
    rng = random.Random()
    mid_task = 0
    with running(cluster, FULL_CYCLE) as run:
        # Creates at a pace the (repeatedly killed) worker can follow; the kills are
        # spread over the same window, so they hit every phase of the lifecycle.
        window = n * 0.6
        run.driver.create_async(n, pace=window / n)
        since = _db_now(run.engine)
        for _ in range(kills):  # bounded: a fixed number of kills
            time.sleep(rng.uniform(0.3, 1.2) * window / kills)
            # Aim at a moment when a run holds a lease (a bounded wait).
            mid_task += _wait_busy(run.engine, since, timeout=10.0)
            cluster.kill("worker")
            since = _db_now(run.engine)
            time.sleep(rng.uniform(0.0, 1.0))
            cluster.start_worker()
        run.driver.wait_done(timeout=120 + n * 1.0)
        fig = finish(run, "worker_sigkill", "active", kills=cluster.kills, kills_mid_task=mid_task)
    fig.report()
    fig.check()


def _db_now(engine: Engine) -> Any:
    with engine.connect() as conn:
        return conn.execute(text("SELECT now()")).scalar_one()


def _row_appears(engine: Engine, query: Any, params: dict[str, Any], timeout: float) -> bool:
    """Wait (bounded) until ``query`` returns a row; a failed query counts as none (the
    database may be the thing under fault)."""

    def found() -> bool:
        try:
            with engine.connect() as conn:
                return conn.execute(query, params).first() is not None
        except Exception:
            return False

    return bool(poll(found, timeout=timeout, interval=0.02))


def _wait_busy(engine: Engine, since: Any, timeout: float) -> bool:
    """Wait (bounded) until a run claimed after ``since`` holds a lease: the worker
    started after the last kill is mid-task (a lease left by the killed one does not
    count)."""
    lease = float(BASE_ENV["LIFECYCLE_LEASE_SECONDS"])
    query = text(
        "SELECT 1 FROM sessions WHERE lifecycle_run_id IS NOT NULL"
        " AND lease_expires_at > :since + make_interval(secs => :lease) LIMIT 1"
    )
    return _row_appears(engine, query, {"since": since, "lease": lease}, timeout)


def _wait_leased_in(engine: Engine, state: str, timeout: float) -> bool:
    """Wait (bounded) until a session shows ``state`` under a live lease."""
    query = text(
        "SELECT 1 FROM sessions WHERE lifecycle_state = :state"
        " AND lifecycle_run_id IS NOT NULL AND lease_expires_at > now() LIMIT 1"
    )
    return _row_appears(engine, query, {"state": state}, timeout)


# --------------------------------------------------------------------------- 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_redis_outage(make_cluster: MakeCluster, own_servers: OwnServers, variant: str) -> None:
    """Stop and restart Redis while sessions are created and driven: creates keep
    answering 200 (the outbox holds the jobs), and afterwards every session gets there."""
    n = sized(100, 20, variant)
    outages = 2 if variant == "full" else 1
    down_for = 6.0 if variant == "full" else 4.0
    cluster = make_cluster("redis", BASE_ENV)
    start_all(cluster)
    windows: list[tuple[float, float]] = []
    with running(cluster, FULL_CYCLE) as run:
        run.driver.create_async(n, pace=(outages * (down_for + 4) + 4) / n)
        for _ in range(outages):
            time.sleep(3.0)
            t0 = time.monotonic()
            own_servers.redis.stop()
            time.sleep(down_for)
            own_servers.redis.start()
            windows.append((t0, time.monotonic()))
        run.driver.wait_done(timeout=120 + n * 1.0)
        with run.driver.lock:
            firsts = list(run.driver.first_statuses)
        during = [s for t, s in firsts if any(a <= t <= b for a, b in windows)]
        fig = finish(
            run,
            "redis_outage",
            "active",
            outages=outages,
            creates_while_down=len(during),
            non200_creates=sum(1 for _, s in firsts if s != 200),
        )
    fig.must_be_zero.append("non200_creates")
    fig.report()
    fig.check()
    assert fig.extra["creates_while_down"] > 0, "no create landed during the outage"


# --------------------------------------------------------------------------- 3


def _prober(run: Run, halt: threading.Event) -> None:
    """Reads and creates while PostgreSQL may be down: every answer is 200 or 503 JSON."""
    caller = run.driver.callers[0]
    while not halt.wait(0.05):
        owned = [s for s, c in run.driver.answered().items() if c == caller]
        if owned:
            run.api.request("GET", f"/api/sessions/{random.choice(owned)}", caller)
        run.api.request("GET", "/api/sessions", caller, params={"limit": "5"})


@pytest.mark.parametrize("variant", VARIANTS)
def test_postgres_outage(make_cluster: MakeCluster, own_servers: OwnServers, variant: str) -> None:
    """Stop (and, in the full run, also crash) PostgreSQL while the API takes requests
    and workers run: 503 with the JSON error body during the outage, never a 500 or a
    traceback; recovery by itself; every session answered 200 reaches its target."""
    n = sized(100, 20, variant)  # plus 3 created during each outage
    modes = ["fast", "kill"] if variant == "full" else ["fast"]
    down_for = 6.0 if variant == "full" else 4.0
    cluster = make_cluster("postgres", BASE_ENV)
    # Slow the snapshot saves, and start each outage while a hibernate run is in one:
    # the run then finishes its provider work while the database is away.
    cluster.plan_faults({"snapshots.save": [{"delay": 1.5}] * n})
    start_all(cluster)
    mid_hibernate = 0
    with running(cluster, FULL_CYCLE) as run:
        run.driver.create_async(n, pace=(len(modes) * (down_for + 4) + 4) / n)
        halt = threading.Event()
        prober = threading.Thread(target=_prober, args=(run, halt), daemon=True)
        prober.start()
        try:
            for mode in modes:
                time.sleep(3.0)
                mid_hibernate += _wait_leased_in(run.engine, "hibernating", timeout=60.0)
                time.sleep(0.5)
                if mode == "kill":
                    own_servers.pg.kill()
                else:
                    own_servers.pg.stop(mode="fast")
                # Clients keep creating while it is down (answered once it is back).
                run.driver.create_async(3, pace=down_for / 4)
                time.sleep(down_for)
                own_servers.pg.start()
            time.sleep(2.0)
        finally:
            halt.set()
            prober.join(timeout=20)
        run.driver.wait_done(timeout=120 + n * 1.0)
        fig = finish(
            run,
            "postgres_outage",
            "active",
            outages=len(modes),
            outages_mid_hibernate=mid_hibernate,
            answered_503=run.stats.statuses[503],
            answered_500=sum(v for k, v in run.stats.statuses.items() if k >= 500 and k != 503),
        )
    unhandled = cluster.log_text("api").count('"api.unhandled"')
    fig.extra["api_unhandled_logged"] = unhandled
    fig.must_be_zero += ["answered_500", "api_unhandled_logged"]
    fig.report()
    fig.check()
    assert fig.extra["answered_503"] > 0, "the API never answered 503 during the outage"


# --------------------------------------------------------------------------- 4


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_beats(make_cluster: MakeCluster, variant: str) -> None:
    """Two ``lifecycle beat`` processes at once for several sweep intervals, idle timeout
    2 s: the idle sweep hibernates every session exactly once."""
    n = sized(100, 20, variant)
    env = {
        **BASE_ENV,
        "LIFECYCLE_IDLE_TIMEOUT_SECONDS": "2",
        "LIFECYCLE_SWEEP_INTERVAL_SECONDS": "1",
    }
    cluster = make_cluster("beats", env)
    start_all(cluster, beats=2)
    with running(cluster, [("hibernated", None)]) as run:
        run.driver.create_async(n, pace=0.05)
        run.driver.wait_done(timeout=90 + n * 1.0)
        # Both beats keep sweeping for several more intervals over the hibernated rows.
        time.sleep(6.0)
        assert cluster.alive("beat0") and cluster.alive("beat1"), "a beat process died"
        fig = finish(run, "two_beats", "hibernated")
        with run.engine.connect() as conn:
            runs = conn.execute(
                text(
                    "SELECT session_id::text, trigger, count(*) FROM lifecycle_runs"
                    " WHERE kind = 'hibernate' AND state = 'succeeded'"
                    " GROUP BY session_id, trigger"
                )
            ).all()
    per_session = Counter[str]()
    for sid, trigger, count in runs:
        per_session[sid] += count
        if trigger != "sweep":
            fig.problems.append(f"{sid}: hibernated by {trigger!r}, not the sweep")
    excess = sum(max(0, c - 1) for c in per_session.values())
    fig.duplicated += excess
    fig.extra["hibernations"] = sum(per_session.values())
    fig.extra["excess_hibernations"] = excess
    fig.extra["not_by_sweep"] = sum(c for _, t, c in runs if t != "sweep")
    fig.must_be_zero.append("not_by_sweep")
    fig.report()
    fig.check()
    assert all(per_session[sid] == 1 for sid in run.driver.answered())


# --------------------------------------------------------------------------- 5

DELIVERY_PLAN: Plan = [
    ("active", "snapshots"),
    ("active", "diff"),
    ("active", "hibernate"),
    ("hibernated", "sandbox"),
    ("active", "archive"),
    ("archived", None),
]
TASKS = {
    "provision": "lifecycle.provision",
    "start": "lifecycle.start",
    "hibernate": "lifecycle.hibernate",
    "snapshot": "lifecycle.snapshot",
    "diff": "lifecycle.diff",
    "archive": "lifecycle.archive",
}


class Replayer:
    """Publishes lifecycle messages straight to the broker, as a redelivering or
    misbehaving broker would: the same run again (same run id and version), old runs
    after newer transitions, finished runs at the session's current version, and runs
    that never existed."""

    def __init__(self, broker_url: str, engine: Engine) -> None:
        import redis

        from worker.celery_app import create_celery
        from worker.config import Settings

        self.app = create_celery(Settings(broker_url=broker_url))
        self.redis = redis.Redis.from_url(broker_url)
        self.engine = engine
        self.sent: list[str] = []
        self.kinds = Counter[str]()
        self.live_copies = 0  # copies of runs still queued or running when sent

    def send(self, kind: str, session_id: str, run_id: str, version: int) -> str:
        task_id = str(uuid.uuid4())
        self.app.send_task(
            TASKS[kind],
            kwargs={"session_id": session_id, "run_id": run_id, "version": version},
            task_id=task_id,
            queue="lifecycle",
        )
        self.sent.append(task_id)
        self.kinds[kind] += 1
        return task_id

    def runs(self, where: str, limit: int) -> list[Any]:
        with self.engine.connect() as conn:
            return list(
                conn.execute(
                    text(
                        "SELECT r.kind, r.session_id::text, r.id::text, r.issued_version,"
                        " s.lifecycle_version FROM lifecycle_runs r"
                        " JOIN sessions s ON s.id = r.session_id"
                        f" WHERE r.issued_version IS NOT NULL AND {where}"
                        " ORDER BY random() LIMIT :limit"
                    ),
                    {"limit": limit},
                ).all()
            )

    def storm(self, halt: threading.Event, deadline: float) -> None:
        """During the live flow: duplicates of open runs (racing their own delivery) and
        of finished ones, stale versions, unknown runs. Bounded by ``deadline``."""
        while not halt.wait(0.05) and time.monotonic() < deadline:
            # Keep the queue short, so extra copies race the live ones instead of
            # burying them under a backlog.
            if int(self.redis.llen("lifecycle")) > 30:
                continue
            try:
                live = self.runs("r.state IN ('queued', 'running')", 4)
                old = self.runs("r.state NOT IN ('pending', 'queued', 'running')", 4)
            except Exception:
                continue
            for kind, sid, rid, issued, _current in live:
                self.send(kind, sid, rid, issued)
                self.live_copies += 1
            for kind, sid, rid, issued, current in old:
                self.send(kind, sid, rid, issued)
                self.send(kind, sid, rid, current)
            if live or old:
                kind, sid, _rid, _issued, current = random.choice(live or old)
                self.send(kind, sid, str(uuid.uuid4()), current)

    def replay_everything(self) -> list[str]:
        """After the flow: every run again, at its own version and at the current one."""
        ids = []
        for kind, sid, rid, issued, current in self.runs("true", 100000):
            ids.append(self.send(kind, sid, rid, issued))
            ids.append(self.send(kind, sid, rid, current))
        return ids


def _world(cluster: Cluster, engine: Engine) -> dict[str, Any]:
    """Everything a delivery could change: rows, run history, files on disk."""
    from tests.faults.harness import final_state, side_effects

    state = final_state(engine)
    snaps = sorted(p.name for p in (cluster.data_dir / "snapshots").glob("*"))
    sandboxes = sorted(p.name for p in (cluster.data_dir / "sandboxes").glob("s-*"))
    repos = sorted(str(p) for p in (cluster.data_dir / "repos").glob("*/*.git"))
    return {
        "state": state,
        "files": (snaps, sandboxes, repos),
        "dup": side_effects(cluster.data_dir, state),
    }


@pytest.mark.parametrize("variant", VARIANTS)
def test_duplicate_and_out_of_order_deliveries(make_cluster: MakeCluster, variant: str) -> None:
    """Every task kind delivered again and out of order, during the live flow and after
    it: nothing changes (versions, states, snapshots, branches)."""
    n = sized(60, 10, variant)
    cluster = make_cluster("deliveries", BASE_ENV)
    start_all(cluster)
    with running(cluster, DELIVERY_PLAN) as run:
        replayer = Replayer(cluster.broker_url, run.engine)
        halt = threading.Event()
        storm = threading.Thread(
            target=replayer.storm,
            args=(halt, time.monotonic() + 120 + n * 2.0),
            daemon=True,
        )
        run.driver.create_async(n, pace=0.1)
        storm.start()
        try:
            run.driver.wait_done(timeout=120 + n * 2.0)
        finally:
            halt.set()
            storm.join(timeout=30)
        live_sent = len(replayer.sent)
        # Let the storm's messages run out, then replay every run once more and compare.
        wait_for(
            lambda: set(replayer.sent) <= cluster.handled_task_ids(["worker"]),
            timeout=120,
            interval=0.5,
            what="the live storm's deliveries to be handled",
        )
        before = _world(cluster, run.engine)
        replayed = replayer.replay_everything()
        wait_for(
            lambda: set(replayed) <= cluster.handled_task_ids(["worker"]),
            timeout=120,
            interval=0.5,
            what="the replayed deliveries to be handled",
        )
        after = _world(cluster, run.engine)
        fig = finish(
            run,
            "duplicate_deliveries",
            "archived",
            storm_sent=live_sent,
            live_copies=replayer.live_copies,
            replayed=len(replayed),
            kinds=",".join(f"{k}:{v}" for k, v in sorted(replayer.kinds.items())),
        )
    changed = 0
    if after["state"] != before["state"]:
        changed += 1
        fig.problems.append("rows or run history changed by the replay")
    if after["files"] != before["files"]:
        changed += 1
        fig.problems.append("files on disk changed by the replay")
    fig.extra["changed_by_replay"] = changed
    fig.must_be_zero.append("changed_by_replay")
    missing = set(TASKS) - set(replayer.kinds)
    fig.extra["kinds_not_replayed"] = len(missing)
    fig.must_be_zero.append("kinds_not_replayed")
    fig.report()
    fig.check()


# --------------------------------------------------------------------------- 6


@pytest.mark.parametrize("variant", VARIANTS)
def test_api_sigkill(make_cluster: MakeCluster, variant: str) -> None:
    """SIGKILL the API (the uvicorn parent and its two workers) at random moments while
    clients create sessions, several at once, and restart it each time. Clients retry a
    refused or reset connection with the same Idempotency-Key. A create committed by a
    killed API is answered by the replay, and its provision job, which the killed
    process's publisher never sent, is published by the outbox relay once the row's claim
    (``CLAIM_SECONDS``) expires: every answered session gets to ``active``, once.

    The lease is longer than the whole run here (as in production, 15 min against the
    30 s claim): otherwise the reaper would re-publish the stranded queued runs after one
    lease, before the relay, and a relay that drops rows would go unnoticed."""
    from worker.db.statements import CLAIM_SECONDS

    kills = sized(10, 3, variant)
    burst = 16  # creates sent together before each kill: in flight when it lands
    trickle = sized(100, 20, variant)  # and a steady trickle around them
    cluster = make_cluster("api-sigkill", {**BASE_ENV, "LIFECYCLE_LEASE_SECONDS": "300"})
    cluster.start_api(workers=2)
    cluster.start_worker()
    cluster.start_beat()
    rng = random.Random()
    killed_at: list[tuple[float, Any]] = []  # (monotonic just before, database time after)
    aimed = 0
    with running(cluster, [("active", None)], clients=burst) as run:
        run.driver.create_async(trickle, pace=kills * 2.5 / trickle)
        since = _db_now(run.engine)
        for _ in range(kills):  # bounded: a fixed number of kills
            time.sleep(rng.uniform(0.5, 2.0))
            run.driver.create_async(burst, pace=0.0)
            # A random moment inside the burst (before a commit, between a commit and
            # its answer, between an answer and the publish, or after), then aim at one
            # when a committed job is not yet marked published (a bounded wait).
            time.sleep(rng.uniform(0.0, 0.1))
            aimed += _wait_unmarked(run.engine, since, timeout=2.0)
            before = time.monotonic()
            cluster.kill("api")
            killed_at.append((before, _db_now(run.engine)))
            time.sleep(rng.uniform(0.0, 1.0))
            cluster.start_api(workers=2)
            since = _db_now(run.engine)
        run.driver.wait_done(timeout=CLAIM_SECONDS + 120 + (trickle + kills * burst) * 0.5)
        # The relay also publishes the rows a killed publisher sent but never marked (a
        # duplicate delivery, which the worker skips): wait for the outbox to empty.
        poll(lambda: _outbox_unpublished(run.engine) == 0, timeout=CLAIM_SECONDS + 30)
        unpublished = _outbox_unpublished(run.engine)
        fig = finish(run, "api_sigkill", "active", kills=cluster.kills, kills_mid_create=aimed)
        relay = _relayed_provisions(run.engine)
        created = _created_at(run.engine)
    attempts = run.driver.create_attempts
    reset = {sid for sid, tries in attempts.items() if any(s is None for _, s in tries)}
    replayed = set()
    for sid in reset:
        first_error = next(t for t, s in attempts[sid] if s is None)
        # The kill that failed this create's first try: was the session committed by
        # the killed process (answered only by the replay after the restart)?
        before_kill = [db for mono, db in killed_at if mono <= first_error]
        if before_kill and sid in created and created[sid] < before_kill[-1]:
            replayed.add(sid)
    relay_only = {sid for sid, only in relay.items() if only}
    fig.extra.update(
        transport_errors=run.stats.transport_errors,
        creates_retried=len(reset),
        replayed_after_kill=len(replayed),  # committed, killed before the answer
        relay_published=len(relay),  # provision jobs the relay published (attempts > 0)
        relay_only=len(relay_only),  # ... that the API's publisher never sent
        answered_unpublished=len(relay_only - replayed),  # killed between answer and publish
        outbox_unpublished=unpublished,
    )
    fig.must_be_zero += ["creates_unanswered", "outbox_unpublished"]
    fig.report()
    fig.check()
    assert fig.extra["relay_published"] > 0, "no kill landed between a commit and its publish"


# --------------------------------------------------------------------------- 7


@pytest.mark.parametrize("variant", VARIANTS)
def test_relay_sigkill(make_cluster: MakeCluster, own_servers: OwnServers, variant: str) -> None:
    """SIGKILL the worker while its outbox relay publishes a backlog. Sessions are
    created while Redis is down (the API records them, its publisher cannot send), so
    every provision job waits for the relay; once Redis is back the relay claims the
    backlog and publishes it, and the worker running it is killed mid-publish (rows
    claimed, not yet marked), then again each time the relay takes the rows over after
    the claim (``CLAIM_SECONDS``) ran out. Nothing is lost: every answered session gets
    to ``active``, once, and the outbox ends empty."""
    from worker.db.statements import CLAIM_SECONDS

    n = sized(400, 120, variant)
    kills = sized(3, 1, variant)
    cluster = make_cluster("relay-sigkill", {**BASE_ENV, "LIFECYCLE_LEASE_SECONDS": "300"})
    start_all(cluster)
    mid_relay = 0
    with running(cluster, [("active", None)], clients=8) as run:
        own_servers.redis.stop()
        try:
            run.driver.create_async(n, pace=0.0)
            poll(lambda: len(run.driver.answered()) >= n, timeout=60 + n * 0.2)
        finally:
            own_servers.redis.start()
        for attempt in range(1, kills + 1):  # bounded: a fixed number of kills
            # The relay's claim of the backlog (its attempt-th), not yet marked published.
            mid_relay += _wait_relaying(run.engine, attempt, timeout=CLAIM_SECONDS + 30)
            cluster.kill("worker")
            time.sleep(0.5)
            cluster.start_worker()
        run.driver.wait_done(timeout=CLAIM_SECONDS * (kills + 1) + 120 + n * 0.5)
        poll(lambda: _outbox_unpublished(run.engine) == 0, timeout=CLAIM_SECONDS + 30)
        unpublished = _outbox_unpublished(run.engine)
        fig = finish(run, "relay_sigkill", "active", kills=cluster.kills, kills_mid_relay=mid_relay)
        relay = _relayed_provisions(run.engine)
    fig.extra.update(relay_published=len(relay), outbox_unpublished=unpublished)
    fig.must_be_zero += ["creates_unanswered", "outbox_unpublished"]
    fig.report()
    fig.check()
    assert fig.extra["relay_published"] > 0, "the relay published nothing"
    assert mid_relay > 0, "no kill landed while the relay held claimed, unpublished rows"


def _wait_relaying(engine: Engine, attempt: int, timeout: float) -> bool:
    """Wait (bounded) until the relay holds rows of its ``attempt``-th claim, not yet
    marked published."""
    query = text(
        "SELECT 1 FROM outbox WHERE published_at IS NULL AND attempts >= :attempt"
        " AND claimed_until > now() LIMIT 1"
    )
    return _row_appears(engine, query, {"attempt": attempt}, timeout)


def _wait_unmarked(engine: Engine, since: Any, timeout: float) -> bool:
    """Wait (bounded) until a job written after ``since`` (by the API running now, not
    one a killed API left claimed) is committed but not yet marked published."""
    query = text(
        "SELECT 1 FROM outbox WHERE published_at IS NULL AND attempts = 0"
        " AND created_at > :since LIMIT 1"
    )
    return _row_appears(engine, query, {"since": since}, timeout)


def _outbox_unpublished(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            ).scalar_one()
        )


def _created_at(engine: Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(text("SELECT id::text, created_at FROM sessions")).all())


def _relayed_provisions(engine: Engine) -> dict[str, bool]:
    """Sessions whose provision job the relay published (the API's publisher did not mark
    it), and whether the worker got it only from the relay: its run started in the second
    half of the wait from the create to the relay's publish, not right after the create
    (a row the killed publisher sent but never marked)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT r.session_id::text,"
                " r.started_at > o.created_at + (o.published_at - o.created_at) / 2"
                " FROM outbox o JOIN lifecycle_runs r"
                " ON r.id = (o.payload -> 'kwargs' ->> 'run_id')::uuid"
                " WHERE o.task_name = 'lifecycle.provision' AND o.attempts > 0"
                " AND o.published_at IS NOT NULL"
            )
        ).all()
    return {sid: bool(only) for sid, only in rows}
