"""End-to-end harness: the real API process (uvicorn) and a real Celery worker process
against the real PostgreSQL and broker. Nothing in-process, nothing eager."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.factories import Caller, make_caller
from tests.support.processes import ROOT, spawn, wait_until, worker_args
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
        wait_until(self._api_up, timeout=60, what="the API to answer")

    def _api_up(self) -> bool:
        try:
            return httpx.get(f"{self.base_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

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


def _amqp_up(host: str = "127.0.0.1", port: int = 5672) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _stack(
    server_urls: dict[str, str], tmp: Path, broker_url: str, extra: dict[str, str] | None = None
) -> Stack:
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


@pytest.fixture(scope="module")
def stack(server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker (prefork, 2 processes) on Redis."""
    import redis

    redis.Redis.from_url(server_urls["broker_url"]).flushdb()
    s = _stack(server_urls, tmp_path_factory.mktemp("e2e"), server_urls["broker_url"])
    s.start_api()
    s.start_worker()
    try:
        yield s
    finally:
        s.stop_all()


@pytest.fixture(scope="module")
def rabbit_stack(
    server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The same stack with RabbitMQ as the broker: only LIFECYCLE_BROKER_URL changes."""
    url = os.environ.get("LIFECYCLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    if not _amqp_up():
        pytest.skip("no RabbitMQ answers on 127.0.0.1:5672 (set LIFECYCLE_TEST_AMQP_URL)")
    s = _stack(server_urls, tmp_path_factory.mktemp("e2e-amqp"), url)
    s.start_api()
    s.start_worker()
    try:
        yield s
    finally:
        s.stop_all()


@pytest.fixture
def caller(db_clean: dict[str, str]) -> Caller:
    return make_caller(f"e2e-{uuid.uuid4().hex[:6]}")
