"""What every benchmark shares: sizes per mode, results, statistics, the servers, and
the API and worker processes (spawned exactly as an operator runs them)."""

from __future__ import annotations

import contextlib
import os
import signal
import statistics
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parents[1]
Mode = Literal["full", "quick", "tiny"]

#: The Redis database index the benchmarks own (flushed at start and between runs).
REDIS_DB = 14
#: Held in ``REDIS_DB`` while a run uses it, so two runs never flush each other's queues.
LOCK_KEY = "lifecycle-bench:owner"
LOCK_SECONDS = 120


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How big each benchmark is in one mode. ``full`` is the issue's sizes."""

    rounds: int
    create_requests: dict[int, int]  # concurrency -> requests per round
    api_workers: int
    orchestrate_sessions: int
    orchestrate_rounds: int
    worker_concurrency: int
    sweep_due: int
    sweep_small: int
    sweep_large: int
    diff_files: int
    diff_lines_per_file: int  # changed lines (added + deleted) per file
    snapshot_mb: int
    snapshot_rounds: int
    memory_sessions: int
    memory_wave: int
    commands_per_round: int = 100
    dispatch_requests: int = 100  # per round at c=1 (x4 at c=8)
    tta_sessions: int = 50  # create -> active: sessions per round
    resume_mb: int = 100  # hibernated -> active: the working tree's size


SIZES: dict[Mode, Sizes] = {
    "full": Sizes(
        rounds=5,
        create_requests={1: 200, 8: 1000, 32: 2000},
        api_workers=2,
        orchestrate_sessions=500,
        orchestrate_rounds=3,
        worker_concurrency=2,
        sweep_due=1000,
        sweep_small=100_000,
        sweep_large=1_000_000,
        diff_files=2000,
        diff_lines_per_file=100,
        snapshot_mb=500,
        snapshot_rounds=5,
        memory_sessions=10_000,
        memory_wave=1000,
    ),
    "quick": Sizes(
        rounds=3,
        create_requests={1: 20, 8: 64, 32: 128},
        api_workers=2,
        orchestrate_sessions=20,
        orchestrate_rounds=3,
        worker_concurrency=2,
        sweep_due=500,
        sweep_small=10_000,
        sweep_large=50_000,
        diff_files=300,
        diff_lines_per_file=100,
        snapshot_mb=15,
        snapshot_rounds=3,
        memory_sessions=40,
        memory_wave=20,
        commands_per_round=30,
        dispatch_requests=25,
        tta_sessions=20,
        resume_mb=20,
    ),
    "tiny": Sizes(
        rounds=2,
        create_requests={1: 20, 8: 40, 32: 64},
        api_workers=1,
        orchestrate_sessions=10,
        orchestrate_rounds=2,
        worker_concurrency=1,
        sweep_due=20,
        sweep_small=1000,
        sweep_large=2000,
        diff_files=20,
        diff_lines_per_file=20,
        snapshot_mb=2,
        snapshot_rounds=2,
        memory_sessions=20,
        memory_wave=10,
        commands_per_round=10,
        dispatch_requests=5,
        tta_sessions=5,
        resume_mb=2,
    ),
}


# --------------------------------------------------------------------------- results


@dataclass
class Spread:
    """The rounds of one figure: their median, minimum and maximum."""

    median: float
    min: float
    max: float
    values: list[float]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        vals = [float(v) for v in values]
        if not vals:
            raise ValueError("no values")
        return cls(statistics.median(vals), min(vals), max(vals), vals)

    @property
    def rel(self) -> float:
        """Half the range relative to the median (the ``±`` shown in the table)."""
        return (self.max - self.min) / 2 / self.median if self.median else 0.0


@dataclass
class Result:
    """One row of the table and of ``results.json``.

    ``ratio`` is system / baseline of the medians. ``target`` reads ``">= 0.5"`` (higher
    is better) or ``"<= 1.3"`` (lower is better) and applies to ``ratio`` unless
    ``target_on`` names another field (the memory row's target is on the growth, the
    time-to-active p50's on ``system``, in the row's unit)."""

    name: str
    metric: str
    unit: str
    system: float
    baseline: float
    ratio: float
    target: str
    met: bool | None  # None: the issue sets no target for this row (target "none")
    system_spread: Spread
    baseline_spread: Spread
    ratio_spread: Spread  # the per-round (paired) ratios
    rounds: int
    size: str
    target_on: str = "ratio"
    extra: dict[str, Any] = field(default_factory=dict)
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("system_spread", "baseline_spread", "ratio_spread"):
            data[key] = {k: _round(v) for k, v in data[key].items()}
        for key in ("system", "baseline", "ratio"):
            data[key] = _round(data[key])
        return data


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    return value


def check(value: float, target: str) -> bool | None:
    """Whether ``value`` meets ``target`` (``">= 0.5"`` …); None for ``"none"``."""
    if target == "none":
        return None
    op, _, number = target.partition(" ")
    limit = float(number)
    return {
        ">=": value >= limit,
        "<=": value <= limit,
        "<": value < limit,
        ">": value > limit,
    }[op]


def compare(
    name: str,
    metric: str,
    unit: str,
    system: Sequence[float],
    baseline: Sequence[float],
    target: str,
    size: str,
    *,
    note: str = "",
    extra: dict[str, Any] | None = None,
    target_on: Literal["ratio", "system"] = "ratio",
) -> Result:
    """A result from paired rounds (``system[i]`` and ``baseline[i]`` ran side by side).

    ``target_on="system"``: the target is an absolute bound on the system's median, in
    the row's unit (the time-to-active p50's ``<= 100`` ms), not on the ratio."""
    s, b = Spread.of(system), Spread.of(baseline)
    ratio = s.median / b.median if b.median else float("inf")
    paired = Spread.of(
        [x / y if y else float("inf") for x, y in zip(system, baseline, strict=False)]
    )
    return Result(
        name=name,
        metric=metric,
        unit=unit,
        system=s.median,
        baseline=b.median,
        ratio=ratio,
        target=target,
        met=check(s.median if target_on == "system" else ratio, target),
        system_spread=s,
        baseline_spread=b,
        ratio_spread=paired,
        rounds=len(system),
        size=size,
        target_on=target_on,
        note=note,
        extra=extra or {},
    )


# --------------------------------------------------------------------------- context


@dataclass
class Context:
    """What a benchmark gets: its sizes, a scratch directory, and the servers (started
    on first use, so benchmarks that need none run without them)."""

    mode: Mode
    sizes: Sizes
    work: Path
    log: Callable[[str], None]
    _servers: Servers | None = None

    @property
    def servers(self) -> Servers:
        if self._servers is None:
            self._servers = Servers.start(self.work, self.log)
        return self._servers

    def close(self) -> None:
        if self._servers is not None:
            self._servers.close()


@dataclass
class Servers:
    """The machine's PostgreSQL and Redis (or embedded ones): a fresh database for this
    run and Redis database ``REDIS_DB``, flushed. The bench process's own settings point
    at them (``LIFECYCLE_*`` environment variables), as do the processes it spawns."""

    admin_url: str
    database_url: str
    broker_url: str
    db_name: str
    data_dir: Path
    _stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def start(cls, work: Path, log: Callable[[str], None]) -> Servers:
        from tests.support import servers

        state = Path(os.environ.get("LIFECYCLE_TEST_STATE_DIR", "/tmp/lifecycle-test-servers"))
        state.mkdir(parents=True, exist_ok=True)
        admin = servers.ensure_postgres(os.environ.get("LIFECYCLE_DATABASE_URL"), state / "pg")
        redis_url = servers.ensure_redis(os.environ.get("LIFECYCLE_BROKER_URL"), state / "redis")
        name = f"lifecycle_bench_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        database_url = servers.create_fresh_database(admin, name)
        from worker.db.migrate import upgrade

        upgrade(database_url)
        broker_url = servers.redis_db(redis_url, REDIS_DB)
        data_dir = work / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        os.environ["LIFECYCLE_DATABASE_URL"] = database_url
        os.environ["LIFECYCLE_BROKER_URL"] = broker_url
        os.environ["LIFECYCLE_DATA_DIR"] = str(data_dir)
        from worker.config import get_settings
        from worker.db.engine import reset_engine

        get_settings.cache_clear()
        reset_engine()
        found = cls(admin, database_url, broker_url, name, data_dir)
        try:
            found.claim_redis()
        except BaseException:
            servers.drop_database(admin, name)
            raise
        found.flush_redis()
        log(f"servers: database {name} (fresh, migrated), redis db {REDIS_DB}")
        return found

    def claim_redis(self) -> None:
        """Refuse to share Redis database ``REDIS_DB`` with another benchmark run (each
        flushes it, which would silently drop the other's task messages)."""
        import redis

        client = redis.Redis.from_url(self.broker_url)
        try:
            if not client.set(LOCK_KEY, self.db_name, nx=True, ex=LOCK_SECONDS):
                other = client.get(LOCK_KEY)
                raise RuntimeError(
                    f"another benchmark run ({other!r}) is using Redis db {REDIS_DB}; "
                    f"wait for it, or delete the key {LOCK_KEY!r} if it is stale"
                )
        finally:
            client.close()

        def keep() -> None:
            while not self._stop.wait(LOCK_SECONDS / 4):
                client = redis.Redis.from_url(self.broker_url)
                try:
                    client.set(LOCK_KEY, self.db_name, ex=LOCK_SECONDS)
                except redis.RedisError:
                    pass
                finally:
                    client.close()

        threading.Thread(target=keep, daemon=True).start()

    def flush_redis(self, *, release: bool = False) -> None:
        """Empty the benchmark's Redis database (keeping this run's claim on it)."""
        import redis

        client = redis.Redis.from_url(self.broker_url)
        try:
            client.flushdb()
            if not release:
                client.set(LOCK_KEY, self.db_name, ex=LOCK_SECONDS)
        finally:
            client.close()

    def conninfo(self) -> str:
        from tests.support.servers import conninfo

        return conninfo(self.database_url)

    def reset_tables(self) -> None:
        """Empty every session table and the broker database (between benchmarks)."""
        import psycopg

        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(
                "TRUNCATE outbox, idempotency_keys, lifecycle_runs, chats, sessions "
                "RESTART IDENTITY CASCADE"
            )
        self.flush_redis()

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a spawned API or worker process."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
        env.update(
            {
                "LIFECYCLE_DATABASE_URL": self.database_url,
                "LIFECYCLE_BROKER_URL": self.broker_url,
                "LIFECYCLE_DATA_DIR": str(self.data_dir),
                "LIFECYCLE_LOG_JSON": "true",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(extra)
        return env

    def close(self) -> None:
        from tests.support import servers
        from worker.db.engine import reset_engine

        reset_engine()
        self._stop.set()
        with contextlib.suppress(Exception):
            self.flush_redis(release=True)
        try:
            servers.drop_database(self.admin_url, self.db_name)
        except Exception as exc:  # a later run never reuses the name
            print(f"could not drop {self.db_name}: {exc}", file=sys.stderr)


# --------------------------------------------------------------------------- processes


class Proc:
    """A spawned ``python -m worker …`` process group (API or worker)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.log_path = logs / f"{name}.log"
        from tests.support.processes import spawn

        self.popen = spawn(args, env, self.log_path)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def cpu_seconds(self) -> float:
        """CPU time (user + system) used so far by the process and its descendants."""
        import psutil

        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0
        total = 0.0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the process and all its descendants (pool processes)."""
        import psutil

        try:
            root = psutil.Process(self.popen.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += p.memory_info().rss
        return total


def wait_for(
    check: Callable[[], Any], *, timeout: float, what: str, proc: Proc | None = None
) -> Any:
    """Poll ``check`` until truthy (the bound only stops a broken run from hanging)."""
    from tests.support.processes import wait_until

    def alive() -> str | None:
        if proc is None or proc.alive():
            return None
        return f"{proc.name} exited:\n{proc.log_tail()}"

    return wait_until(
        check, timeout=timeout, interval=0.05, what=what, alive=alive, error=RuntimeError
    )


@contextlib.contextmanager
def api_process(servers: Servers, work: Path, workers: int) -> Iterator[tuple[str, int, Proc]]:
    """The real API (uvicorn, ``lifecycle api --workers N``); yields (host, port, process)."""
    import http.client

    from worker.ops.embedded import find_free_port

    port = find_free_port()
    proc = Proc(
        "api", ["api", "--port", str(port), "--workers", str(workers)], servers.env(), work / "logs"
    )

    def up() -> bool:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    try:
        wait_for(up, timeout=60, what="the API to answer", proc=proc)
        yield "127.0.0.1", port, proc
    finally:
        proc.stop()


def start_worker(
    servers: Servers,
    work: Path,
    concurrency: int,
    name: str = "worker",
    args: tuple[str, ...] = (),
    **env: str,
) -> Proc:
    """The real worker (``lifecycle worker``, prefork) with the no-op provider set, also
    loading the ``bench.noop`` task; returns once it answers a ping. ``args``: more
    worker options; ``env``: more environment (``BENCH_RECEIPTS``: see
    ``bench/celery_noop.py``)."""
    from tests.support.processes import worker_args

    proc = Proc(
        name,
        worker_args(concurrency, "--include", "bench.celery_noop", *args),
        servers.env(LIFECYCLE_PROVIDER_SET="noop", **env),
        work / "logs",
    )
    return answering(proc)


def answering(proc: Proc) -> Proc:
    """``proc`` (a worker just spawned) once it answers a ping; stopped if it never does."""
    app = celery_app()
    try:
        wait_for(
            lambda: app.control.ping(timeout=0.5), timeout=90, what="the worker to start", proc=proc
        )
    except BaseException:
        proc.stop()
        raise
    return proc


_app_lock = threading.Lock()
_app: Any = None


def celery_app() -> Any:
    """A Celery app on the benchmark's broker (the same settings the system uses)."""
    global _app
    with _app_lock:
        if _app is None:
            from worker.celery_app import create_celery
            from worker.config import get_settings

            _app = create_celery(get_settings())
        return _app


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
