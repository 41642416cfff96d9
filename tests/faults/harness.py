"""The fault suite's harness: real processes on loopback, a driver that pushes sessions
through their lifecycle over HTTP, a poller that watches every ``lifecycleVersion``, and
the closing figures (lost, duplicated side effects, version regressions, stuck).

Every loop here is bounded (by a count or a deadline) and stops by itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from tests.support.processes import (
    LIFECYCLE,
    ROOT,
    answers_ok,
    poll,
    spawn,
    wait_until,
    worker_args,
)
from worker.ops.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port

OWNER = "recoupable"  # Settings.workspace_owner
OPEN_STATES = ("pending", "queued", "running")

# The results of every scenario run in this pytest process, for the terminal summary.
RESULTS: list[str] = []


def wait_for(
    check: Callable[[], Any], *, timeout: float, interval: float = 0.1, what: str = "condition"
) -> Any:
    """Poll ``check`` until truthy; a bounded loop (the bound only stops a broken run)."""
    return wait_until(check, timeout=timeout, interval=interval, what=what)


# --------------------------------------------------------------------------- sizes and servers


def faults_scale() -> float:
    try:
        return max(0.01, float(os.environ.get("FAULTS_SCALE", "1")))
    except ValueError:
        return 1.0


def sized(full: int, short: int, variant: str) -> int:
    """The size of ``variant`` ("full" scaled by FAULTS_SCALE, or "short")."""
    if variant == "short":
        return short
    return max(short, round(full * faults_scale()))


VARIANTS = [
    pytest.param("short", id="short"),
    pytest.param("full", id="full", marks=pytest.mark.faults),
]


@dataclass
class OwnServers:
    pg: EmbeddedPostgres
    redis: EmbeddedRedis

    def ensure_up(self) -> None:
        """Bring back whatever a scenario left stopped (e.g. after a failed assertion)."""
        if not self.pg.is_running():
            self.pg.start()
        if not self.redis.is_running():
            self.redis.start()


# --------------------------------------------------------------------------- processes


class Cluster:
    """API, worker and beat processes (``python -m worker …``) sharing one environment,
    each in its own process group so a SIGKILL takes a prefork parent and its children."""

    def __init__(self, root: Path, database_url: str, broker_url: str, env: dict[str, str]) -> None:
        self.root = root
        self.data_dir = root / "data"
        self.logs = root / "logs"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.fault_plan = root / "faults.json"
        self.database_url = database_url
        self.broker_url = broker_url
        self.port = find_free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
        self.env.update(
            {
                "LIFECYCLE_DATABASE_URL": database_url,
                "LIFECYCLE_BROKER_URL": broker_url,
                "LIFECYCLE_DATA_DIR": str(self.data_dir),
                "LIFECYCLE_FAULT_PLAN": str(self.fault_plan),
                "LIFECYCLE_LOG_JSON": "true",
                "PYTHONPATH": str(ROOT),
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.env.update(env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.kills = 0

    # -- spawning ---------------------------------------------------------------------
    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = spawn(args, {**self.env, **(env or {})}, self.logs / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start_api(self, workers: int = 1) -> None:
        """``lifecycle api``; with ``workers`` > 1 a uvicorn parent and its worker
        processes, one process group (``kill("api")`` takes them all)."""
        self._spawn("api", ["api", "--port", str(self.port), "--workers", str(workers)])
        wait_for(self._api_up, timeout=60, interval=0.2, what="the API to answer /healthz")

    def _api_up(self) -> bool:
        proc = self.procs.get("api")
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the API exited with {proc.returncode}:\n{self.log_tail('api')}")
        return answers_ok(f"{self.base_url}/healthz")

    def start_worker(self, name: str = "worker", concurrency: int = 2) -> None:
        self._spawn(name, worker_args(concurrency))

    def start_beat(self, name: str = "beat") -> None:
        # Each beat keeps its own schedule file (it lives under LIFECYCLE_DATA_DIR, which
        # a beat uses for nothing else); the sweeps themselves run in the worker.
        beat_dir = self.root / f"{name}-state"
        beat_dir.mkdir(exist_ok=True)
        self._spawn(name, ["beat"], env={"LIFECYCLE_DATA_DIR": str(beat_dir)})

    # -- stopping ---------------------------------------------------------------------
    def kill(self, name: str) -> None:
        """SIGKILL the whole process group (the prefork parent and its pool children)."""
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        self.kills += 1

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # A prefork child may outlive its parent for a moment: take the group down.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def alive(self, name: str) -> bool:
        proc = self.procs.get(name)
        return proc is not None and proc.poll() is None

    # -- helpers ----------------------------------------------------------------------
    def plan_faults(self, plan: dict[str, list[dict[str, Any]]]) -> None:
        self.fault_plan.write_text(json.dumps(plan))

    def sweep(self, name: str) -> dict[str, Any]:
        """``lifecycle sweep NAME`` once (an operator's manual run)."""
        out = subprocess.run(
            [*LIFECYCLE, "sweep", name],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]

    def log_text(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, lines: int = 40) -> str:
        return "\n".join(self.log_text(name).splitlines()[-lines:])

    def handled_task_ids(self, names: Iterable[str]) -> set[str]:
        """Task ids that a worker logged as handled (``lifecycle.run`` events)."""
        seen: set[str] = set()
        for name in names:
            for line in self.log_text(name).splitlines():
                if '"lifecycle.run"' not in line or "{" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    event = json.loads(line[line.index("{") :])
                    if event.get("task_id"):
                        seen.add(event["task_id"])
        return seen


# --------------------------------------------------------------------------- database


def make_engine(url: str) -> Engine:
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=4,
        max_overflow=4,
        pool_timeout=5,
        connect_args={"connect_timeout": 2},
    )


@dataclass(frozen=True)
class Caller:
    account_id: uuid.UUID
    key: str


def make_callers(engine: Engine, count: int, prefix: str) -> list[Caller]:
    """Accounts with API keys, created through the real service code."""
    from worker.services import accounts

    factory = sessionmaker(engine, expire_on_commit=False)
    out = []
    for i in range(count):
        with factory.begin() as db:
            account = accounts.create_account(db, f"{prefix}-{i}")
            key = accounts.create_key(db, account.id)
            out.append(Caller(account.id, key.key))
    return out


@dataclass(frozen=True)
class Row:
    id: str
    state: str
    version: int
    run_id: str | None
    open_runs: int
    error: str | None


SAMPLE_SQL = text(
    """
    SELECT s.id::text, s.lifecycle_state, s.lifecycle_version, s.lifecycle_run_id::text,
           (SELECT count(*) FROM lifecycle_runs r
             WHERE r.session_id = s.id AND r.state IN ('pending', 'queued', 'running')),
           s.lifecycle_error
      FROM sessions s
    """
)


class Observer(threading.Thread):
    """Samples every session's state and ``lifecycleVersion`` on a short period and
    counts any decrease. Database errors (an outage) just skip a sample."""

    def __init__(self, engine: Engine, interval: float = 0.1) -> None:
        super().__init__(name="observer", daemon=True)
        self.engine = engine
        self.interval = interval
        self.rows: dict[str, Row] = {}
        self.max_version: dict[str, int] = {}
        self.regressions: list[tuple[str, int, int]] = []
        self.samples = 0
        self.failed_samples = 0
        self._halt = threading.Event()

    def sample(self) -> bool:
        try:
            with self.engine.connect() as conn:
                fetched = conn.execute(SAMPLE_SQL).all()
        except SQLAlchemyError:
            self.failed_samples += 1
            return False
        rows = {r[0]: Row(r[0], r[1], int(r[2]), r[3], int(r[4]), r[5]) for r in fetched}
        for sid, row in rows.items():
            seen = self.max_version.get(sid, -1)
            if row.version < seen:
                self.regressions.append((sid, seen, row.version))
            else:
                self.max_version[sid] = row.version
        self.rows = rows
        self.samples += 1
        return True

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.sample()

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpStats:
    """What the API answered. ``bad`` holds anything the suite never accepts: a 5xx other
    than 503, an error body that is not the JSON error object, a traceback."""

    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: int = 0
    bad: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str, path: str, response: httpx.Response) -> None:
        with self.lock:
            self.statuses[response.status_code] += 1
            body = response.text
            problem = None
            if "Traceback" in body or 'File "' in body:
                problem = "traceback in body"
            elif response.status_code >= 500 and response.status_code != 503:
                problem = f"status {response.status_code}"
            elif response.status_code >= 400:
                try:
                    data = response.json()
                    if data.get("status") != "error" or not isinstance(data.get("error"), str):
                        problem = "error body is not {status: error, error: str}"
                except ValueError:
                    problem = "error body is not JSON"
            if problem:
                self.bad.append(
                    f"{method} {path} -> {response.status_code} ({problem}): {body[:200]}"
                )


class Api:
    """The API as clients see it, with client-side retries on 503 and transport errors."""

    def __init__(self, base_url: str, stats: HttpStats, timeout: float = 15.0) -> None:
        self.base_url = base_url
        self.stats = stats
        self.http = httpx.Client(
            base_url=base_url,
            timeout=timeout,
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=16),
        )

    def close(self) -> None:
        self.http.close()

    def request(
        self, method: str, path: str, caller: Caller, **kwargs: Any
    ) -> httpx.Response | None:
        headers = {"x-api-key": caller.key, **kwargs.pop("headers", {})}
        try:
            response = self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError:
            with self.stats.lock:
                self.stats.transport_errors += 1
            return None
        self.stats.record(method, path, response)
        return response

    def create(
        self,
        caller: Caller,
        *,
        deadline: float,
        on_first: Callable[[int | None], None] | None,
        attempts: list[tuple[float, int | None]] | None = None,
    ) -> dict[str, Any] | None:
        """POST /api/sessions with an Idempotency-Key, retried (same key) until answered
        200 or the deadline: the session, or None if it was never answered. A transport
        error (the connection refused or reset: the API is down or was killed mid-request)
        is retried like a 503. ``attempts`` collects (monotonic time, status or None for a
        transport error) of every try."""
        key = str(uuid.uuid4())
        first = True
        delay = 0.1
        while time.monotonic() < deadline:
            r = self.request(
                "POST", "/api/sessions", caller, json={}, headers={"Idempotency-Key": key}
            )
            if attempts is not None:
                attempts.append((time.monotonic(), None if r is None else r.status_code))
            if first and on_first is not None:
                on_first(None if r is None else r.status_code)
            first = False
            if r is not None and r.status_code == 200:
                return r.json()["session"]  # type: ignore[no-any-return]
            if r is not None and r.status_code not in (409, 503):
                return None  # an answer the client cannot retry: a failure the figures show
            time.sleep(delay)
            delay = min(1.0, delay * 2)
        return None


# --------------------------------------------------------------------------- driving

# A plan is a list of (state to wait for, action to take there); the last action is None.
Plan = list[tuple[str, str | None]]

FULL_CYCLE: Plan = [("active", "hibernate"), ("hibernated", "sandbox"), ("active", None)]


class Driver:
    """Creates sessions and walks each through its plan: when the session rests in the
    plan's state (no lease, no open run, version past the last kick), take the action."""

    def __init__(
        self,
        api: Api,
        callers: list[Caller],
        observer: Observer,
        plan: Plan,
        *,
        workers: int = 6,
    ) -> None:
        self.api = api
        self.callers = callers
        self.observer = observer
        self.plan = plan
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="driver")
        self.lock = threading.Lock()
        self.owner: dict[str, Caller] = {}
        self.step: dict[str, int] = {}
        self.min_version: dict[str, int] = {}
        self.done: set[str] = set()
        self.inflight: set[str] = set()
        self.create_futures: list[Future[None]] = []
        self.unanswered_creates = 0
        self.first_statuses: list[tuple[float, int | None]] = []
        # Every try of each answered create, by session id (see Api.create).
        self.create_attempts: dict[str, list[tuple[float, int | None]]] = {}
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="driver", daemon=True)
        self._feeders: list[threading.Thread] = []

    # -- creating ---------------------------------------------------------------------
    def create_async(self, count: int, pace: float, create_deadline: float = 120.0) -> None:
        """Submit ``count`` creates, one every ``pace`` seconds (in a feeder thread)."""

        def feed() -> None:
            for i in range(count):
                if self._halt.is_set():
                    return
                caller = self.callers[i % len(self.callers)]
                self.create_futures.append(self.pool.submit(self._create, caller, create_deadline))
                time.sleep(pace)

        feeder = threading.Thread(target=feed, name="feeder", daemon=True)
        self._feeders.append(feeder)
        feeder.start()

    def _create(self, caller: Caller, bound: float) -> None:
        def first(status: int | None) -> None:
            with self.lock:
                self.first_statuses.append((time.monotonic(), status))

        tries: list[tuple[float, int | None]] = []
        session = self.api.create(
            caller, deadline=time.monotonic() + bound, on_first=first, attempts=tries
        )
        with self.lock:
            if session is None:
                self.unanswered_creates += 1
                return
            sid = session["id"]
            self.create_attempts[sid] = tries
            self.owner[sid] = caller
            self.step.setdefault(sid, 0)
            self.min_version.setdefault(sid, 0)

    def creates_finished(self) -> bool:
        if any(feeder.is_alive() for feeder in self._feeders):
            return False
        return all(f.done() for f in list(self.create_futures))

    # -- driving ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def halt(self) -> None:
        self._halt.set()
        self._thread.join(timeout=10)
        self.pool.shutdown(wait=True, cancel_futures=True)

    def answered(self) -> dict[str, Caller]:
        with self.lock:
            return dict(self.owner)

    def all_done(self) -> bool:
        with self.lock:
            return self.creates_finished() and self.done >= set(self.owner)

    def _loop(self) -> None:
        while not self._halt.wait(0.15):
            rows = self.observer.rows
            with self.lock:
                pending = [s for s in self.owner if s not in self.done and s not in self.inflight]
            for sid in pending:
                row = rows.get(sid)
                if row is None:
                    continue
                with self.lock:
                    i = self.step[sid]
                    state, action = self.plan[i]
                    ready = (
                        row.state == state
                        and row.run_id is None
                        and row.open_runs == 0
                        and row.version >= self.min_version[sid]
                    )
                    if not ready:
                        continue
                    if action is None:
                        self.done.add(sid)
                        continue
                    self.inflight.add(sid)
                self.pool.submit(self._act, sid, action)

    def _act(self, sid: str, action: str) -> None:
        caller = self.owner[sid]
        try:
            if action == "archive":
                r = self.api.request(
                    "PATCH", f"/api/sessions/{sid}", caller, json={"status": "archived"}
                )
                ok = r is not None and r.status_code == 200
            else:
                r = self.api.request("POST", f"/api/sessions/{sid}/{action}", caller)
                ok = r is not None and r.status_code == 202
            if ok and r is not None:
                version = int(r.json()["session"]["lifecycleVersion"])
                with self.lock:
                    self.step[sid] += 1
                    self.min_version[sid] = version + 1
        finally:
            with self.lock:
                self.inflight.discard(sid)

    def progress(self) -> str:
        with self.lock:
            return f"{len(self.done)}/{len(self.owner)} done, creates unanswered={self.unanswered_creates}"

    def wait_done(self, timeout: float) -> bool:
        """The bounded drain: until every answered session finished its plan."""
        return bool(poll(self.all_done, timeout=timeout, interval=0.25))


# --------------------------------------------------------------------------- figures


@dataclass
class Figures:
    scenario: str
    sessions: int = 0
    target_reached: int = 0
    lost: int = 0
    duplicated: int = 0
    version_regressions: int = 0
    stuck: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    must_be_zero: list[str] = field(default_factory=list)  # keys of ``extra``
    problems: list[str] = field(default_factory=list)

    def line(self) -> str:
        head = (
            f"scenario={self.scenario} sessions={self.sessions} "
            f"target_reached={self.target_reached} lost={self.lost} "
            f"duplicated={self.duplicated} version_regressions={self.version_regressions} "
            f"stuck={self.stuck}"
        )
        tail = " ".join(f"{k}={v}" for k, v in self.extra.items())
        return f"{head} {tail}".strip()

    def report(self) -> None:
        line = self.line()
        RESULTS.append(line)
        print(line, flush=True)

    def check(self) -> None:
        detail = "\n".join(self.problems[:20])
        assert (
            self.lost == 0
            and self.duplicated == 0
            and self.version_regressions == 0
            and self.stuck == 0
            and self.sessions == self.target_reached
            and all(not self.extra[k] for k in self.must_be_zero)
        ), f"{self.line()}\n{detail}"


def final_state(engine: Engine) -> dict[str, Any]:
    """Sessions and runs as they ended (read once the processes are stopped)."""
    with engine.connect() as conn:
        sessions = {
            r[0]: {
                "user_id": r[1],
                "state": r[2],
                "version": int(r[3]),
                "run_id": r[4],
                "snapshot_url": r[5],
                "provisioned": r[6],
                "error": r[7],
                "branch": r[8],
            }
            for r in conn.execute(
                text(
                    "SELECT id::text, user_id::text, lifecycle_state, lifecycle_version,"
                    " lifecycle_run_id::text, snapshot_url, provisioned_at IS NOT NULL,"
                    " lifecycle_error, branch FROM sessions"
                )
            )
        }
        runs = [
            {
                "session_id": r[0],
                "kind": r[1],
                "state": r[2],
                "trigger": r[3],
                "from_version": r[4],
                "to_version": r[5],
                "error": r[6],
                "id": r[7],
            }
            for r in conn.execute(
                text(
                    "SELECT session_id::text, kind, state, trigger, from_version, to_version,"
                    " error, id::text FROM lifecycle_runs ORDER BY created_at"
                )
            )
        ]
    return {"sessions": sessions, "runs": runs}


def side_effects(data_dir: Path, state: dict[str, Any]) -> dict[str, int]:
    """Duplicated side effects counted in the providers' own stores."""
    from worker.providers.base import PermanentProviderError
    from worker.providers.local_git import LocalGitRepoHost

    sessions = state["sessions"]
    host = LocalGitRepoHost(data_dir / "repos")
    accounts = {s["user_id"] for s in sessions.values()}
    extra_repos = max(0, host.count_repos() - len(accounts))
    extra_branches = 0
    for account in accounts:
        expected = {s["branch"] for s in sessions.values() if s["user_id"] == account}
        try:
            branches = set(host.list_branches(OWNER, account)) - {"main"}
        except PermanentProviderError:
            continue
        # Branch names are per session; anything else is a duplicate side effect.
        extra_branches += len(branches - expected)
    extra_snapshots = 0
    snap_dir = data_dir / "snapshots"
    for sid, s in sessions.items():
        files = list(snap_dir.glob(f"{sid}-*")) if snap_dir.is_dir() else []
        allowed = 1 if s["snapshot_url"] else 0
        extra_snapshots += max(0, len(files) - allowed)
    return {"repos": extra_repos, "branches": extra_branches, "snapshots": extra_snapshots}


def version_gaps(state: dict[str, Any]) -> list[str]:
    """Sessions whose history does not step 0 → 1 → … → final by exactly one."""
    by_session: dict[str, list[dict[str, Any]]] = {}
    for run in state["runs"]:
        by_session.setdefault(run["session_id"], []).append(run)
    bad = []
    for sid, s in state["sessions"].items():
        moved = [r for r in by_session.get(sid, []) if r["to_version"] is not None]
        steps_ok = all(r["to_version"] == r["from_version"] + 1 for r in moved)
        ordered = sorted(r["to_version"] for r in moved) == list(range(1, s["version"] + 1))
        if not (steps_ok and ordered):
            bad.append(f"{sid}: versions {[(r['from_version'], r['to_version']) for r in moved]}")
    return bad


def compute_figures(
    name: str,
    *,
    driver: Driver,
    observer: Observer,
    engine: Engine,
    data_dir: Path,
    target: str,
) -> Figures:
    """The closing figures of a scenario (see the module doc of ``test_faults``)."""
    fig = Figures(name)
    answered = driver.answered()
    state = final_state(engine)
    sessions = state["sessions"]
    open_by_session = Counter(r["session_id"] for r in state["runs"] if r["state"] in OPEN_STATES)
    observer.sample()  # one last sample after the drain
    fig.sessions = len(answered)
    fig.version_regressions = len(observer.regressions)
    for sid, old, new in observer.regressions[:10]:
        fig.problems.append(f"version regression {sid}: {old} -> {new}")
    for sid in answered:
        s = sessions.get(sid)
        if s is None:
            fig.lost += 1
            fig.problems.append(f"lost {sid}: answered 200 but no row")
            continue
        step = driver.step.get(sid, 0)
        reached = (
            step == len(driver.plan) - 1
            and s["state"] == target
            and s["run_id"] is None
            and open_by_session[sid] == 0
            and s["version"] >= driver.min_version.get(sid, 0)
        )
        if reached:
            fig.target_reached += 1
            continue
        waiting = driver.plan[step][0]
        idle = s["run_id"] is None and open_by_session[sid] == 0
        if idle and s["state"] not in ("failed", waiting):
            # Nothing will ever move it again: its job was dropped.
            fig.lost += 1
            kind = "lost"
        else:
            fig.stuck += 1
            kind = "stuck"
        last = [r for r in state["runs"] if r["session_id"] == sid][-3:]
        fig.problems.append(
            f"{kind} {sid}: state={s['state']} v{s['version']} lease={s['run_id']} "
            f"open_runs={open_by_session[sid]} error={s['error']!r} waiting_for={waiting} "
            f"last_runs={[(r['kind'], r['state'], r['trigger'], r['error']) for r in last]}"
        )
    dup = side_effects(data_dir, state)
    dup["rows"] = len(set(sessions) - set(answered))  # rows beyond the answered creates
    fig.duplicated = sum(dup.values())
    if fig.duplicated:
        fig.problems.append(f"duplicated side effects: {dup}")
    gaps = version_gaps(state)
    fig.extra["version_gaps"] = len(gaps)
    fig.problems += gaps[:5]
    fig.must_be_zero.append("version_gaps")
    fig.extra["creates_unanswered"] = driver.unanswered_creates
    fig.extra["runs"] = len(state["runs"])
    fig.extra["abandoned"] = sum(1 for r in state["runs"] if r["state"] == "abandoned")
    fig.extra["skipped"] = sum(1 for r in state["runs"] if r["state"] == "skipped")
    fig.extra["failed_runs"] = sum(1 for r in state["runs"] if r["state"] == "failed")
    return fig


def random_delays(calls: Iterable[str], count: int, delay: float, share: float) -> dict[str, Any]:
    """A fault plan that slows a share of the first ``count`` calls of each kind."""
    rng = random.Random(count)
    return {
        call: [{"delay": delay} if rng.random() < share else {"delay": 0} for _ in range(count)]
        for call in calls
    }


#: What the ``make_cluster`` fixture is: (scenario name, extra environment) -> a Cluster.
MakeCluster = Callable[[str, dict[str, str]], Cluster]
