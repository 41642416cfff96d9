"""The end-to-end stack: the real API process (uvicorn) and real Celery worker (and beat)
processes on the run's PostgreSQL and a broker, and the HTTP calls the e2e tests drive
it with. Nothing in-process, nothing eager."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.support.factories import Caller
from tests.support.processes import ROOT, answers_ok, spawn, wait_until, worker_args
from worker.ops.embedded import find_free_port


class Stack:
    """A running API + worker pair sharing one environment."""

    def __init__(self, env: dict[str, str], data_dir: Path, logs: Path) -> None:
        self.env = env
        self.data_dir = data_dir
        self.logs = logs
        self.port = find_free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.fault_plan = Path(env["LIFECYCLE_FAULT_PLAN"])

    def _spawn(
        self, name: str, args: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = spawn(args, {**self.env, **(env or {})}, self.logs / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start_api(self) -> None:
        self._spawn("api", ["api", "--port", str(self.port)])
        wait_until(
            lambda: answers_ok(f"{self.base_url}/healthz"), timeout=60, what="the API to answer"
        )

    def start_worker(
        self, name: str = "worker", concurrency: int = 2, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """A worker process; ``env`` overrides the stack's (another host: its own
        ``LIFECYCLE_HOSTNAME`` and ``LIFECYCLE_DATA_DIR``)."""
        return self._spawn(name, worker_args(concurrency), env)

    def start_beat(self, name: str = "beat") -> subprocess.Popen[bytes]:
        return self._spawn(name, ["beat"])

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)

    def plan_faults(self, plan: dict[str, list[dict[str, Any]]]) -> None:
        self.fault_plan.write_text(json.dumps(plan))

    def client(self, caller: Caller) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=caller.headers, timeout=30)

    def logs_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs.glob("*.log"))


def amqp_up(host: str = "127.0.0.1", port: int = 5672) -> bool:
    """Whether something accepts connections on the AMQP port."""
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def make_stack(
    server_urls: dict[str, str], tmp: Path, broker_url: str, extra: dict[str, str] | None = None
) -> Stack:
    """A stack (nothing started yet) on the run's database and ``broker_url``, with its
    data, logs and fault plan under ``tmp``; ``extra`` adds or overrides settings."""
    data_dir = tmp / "data"
    logs = tmp / "logs"
    data_dir.mkdir()
    logs.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env.update(
        {
            "LIFECYCLE_DATABASE_URL": server_urls["database_url"],
            "LIFECYCLE_BROKER_URL": broker_url,
            "LIFECYCLE_DATA_DIR": str(data_dir),
            "LIFECYCLE_FAULT_PLAN": str(tmp / "faults.json"),
            "LIFECYCLE_LOG_JSON": "true",
            "LIFECYCLE_RETRY_BACKOFF_BASE_SECONDS": "0.2",
            "LIFECYCLE_RETRY_BACKOFF_MAX_SECONDS": "2",
            "PYTHONPATH": str(ROOT),
        }
    )
    env.update(extra or {})
    return Stack(env, data_dir, logs)


@contextlib.contextmanager
def running(
    stack: Stack, *, concurrency: int = 2, beat: bool = False, flush: bool = True
) -> Iterator[Stack]:
    """Start the API, one worker (``concurrency`` prefork processes) and, with ``beat``,
    a beat; stop them all on exit. ``flush`` empties the stack's Redis database first
    (its queues from an earlier module)."""
    if flush:
        import redis

        client = redis.Redis.from_url(stack.env["LIFECYCLE_BROKER_URL"])
        try:
            client.flushdb()
        finally:
            client.close()
    try:
        stack.start_api()
        stack.start_worker(concurrency=concurrency)
        if beat:
            stack.start_beat()
        yield stack
    finally:
        stack.stop_all()


# ------------------------------------------------------------------- over HTTP
def create(client: httpx.Client, **body: Any) -> dict[str, Any]:
    """POST /api/sessions (asserting 200); the session."""
    r = client.post("/api/sessions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["session"]  # type: ignore[no-any-return]


def get(client: httpx.Client, sid: str) -> dict[str, Any]:
    """GET /api/sessions/{sid} (asserting 200); the session."""
    r = client.get(f"/api/sessions/{sid}")
    assert r.status_code == 200, r.text
    return r.json()["session"]  # type: ignore[no-any-return]


def wait_state(client: httpx.Client, sid: str, *states: str, timeout: float = 90) -> dict[str, Any]:
    """Poll the session until it is in one of ``states`` with no run holding it."""

    def reached() -> dict[str, Any] | None:
        s = get(client, sid)
        free = s["lifecycleRunId"] is None
        return s if s["lifecycleState"] in states and free else None

    return wait_until(reached, timeout=timeout, what=f"session {sid} to reach {states}")  # type: ignore[no-any-return]


def history(client: httpx.Client, sid: str) -> list[dict[str, Any]]:
    """GET /api/sessions/{sid}/runs (asserting 200); the runs."""
    r = client.get(f"/api/sessions/{sid}/runs")
    assert r.status_code == 200, r.text
    return r.json()["runs"]  # type: ignore[no-any-return]


def kick(client: httpx.Client, sid: str, what: str) -> dict[str, Any]:
    """POST /api/sessions/{sid}/{what} (asserting 202); the run."""
    r = client.post(f"/api/sessions/{sid}/{what}")
    assert r.status_code == 202, r.text
    return r.json()["run"]  # type: ignore[no-any-return]
