"""``lifecycle up`` as a newcomer runs it: no database or broker configured, so it
starts embedded PostgreSQL and Redis; then ``lifecycle demo``, Flower's API, ``/metrics``
against the database, a child restart, and a Ctrl-C that leaves no process behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.processes import LIFECYCLE, ROOT, wait_until
from worker.ops.embedded import find_free_port

pytestmark = pytest.mark.e2e


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    output: Path
    api_url: str
    flower_url: str

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def _env(data_dir: Path) -> dict[str, str]:
    # Nothing configured: ``up`` must bring its own servers.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env.update(
        {"LIFECYCLE_DATA_DIR": str(data_dir), "LIFECYCLE_LOG_JSON": "true", "PYTHONPATH": str(ROOT)}
    )
    return env


def start_up(base: Path, name: str, *extra: str) -> Up:
    api_port, flower_port = find_free_port(), find_free_port()
    data_dir = base / "data"
    output = base / f"{name}.out"
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [
                *LIFECYCLE,
                "up",
                "--api-port",
                str(api_port),
                "--flower-port",
                str(flower_port),
                *extra,
            ],
            env=_env(data_dir),
            cwd=base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Up(
        proc, data_dir, output, f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{flower_port}"
    )


def wait_ready(up: Up) -> None:
    def ready() -> bool:
        assert up.proc.poll() is None, f"`lifecycle up` exited early:\n{up.text()}"
        try:
            return httpx.get(f"{up.api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, timeout=90, interval=0.25, what="/readyz to answer 200")
    wait_until(lambda: "Ctrl-C stops everything" in up.text(), timeout=10, what="the banner")


def stop_up(up: Up, sig: int = signal.SIGINT) -> int:
    if up.proc.poll() is None:
        up.proc.send_signal(sig)
    try:
        return up.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(up.proc.pid, signal.SIGKILL)
        up.proc.wait(timeout=10)
        raise AssertionError(f"`lifecycle up` did not stop on signal {sig}:\n{up.text()}") from None


def descendants(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def db_conninfo(data_dir: Path) -> str:
    port = int((data_dir / "postgres" / "port").read_text().split()[0])
    return f"postgresql://postgres@127.0.0.1:{port}/lifecycle"


def scrape(api_url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Metric samples by sample name, then by sorted labels."""
    r = httpx.get(f"{api_url}/metrics", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(r.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("up")


@pytest.fixture(scope="module")
def first_up(base: Path) -> Iterator[Up]:
    up = start_up(base, "first")
    try:
        yield up
    finally:
        if up.proc.poll() is None:
            stop_up(up)


def test_up_runs_the_demo_and_stops_cleanly(first_up: Up, base: Path) -> None:
    up = first_up
    wait_ready(up)
    banner = up.text()
    creds = json.loads((up.data_dir / "dev-credentials.json").read_text())
    assert creds["key"] in banner and "(embedded)" in banner
    # bubblewrap present (make test installs it): commands are on, and the banner says so.
    import shutil

    expected = "Sandboxes bwrap" if shutil.which("bwrap") else "Sandboxes local"
    assert expected in banner
    # Start-up noise: Celery's banners and its superuser warning are gone; the banner
    # says what they said, once.
    assert "SecurityWarning" not in banner and "celery beat v" not in banner
    assert "-------------- [queues]" not in banner
    assert "  Worker    2 processes on queues lifecycle and lifecycle.host." in banner
    assert (up.data_dir / "dev-credentials.json").stat().st_mode & 0o777 == 0o600
    assert (up.data_dir / "postgres" / "pgdata" / "PG_VERSION").exists()
    assert (up.data_dir / "redis" / "redis.pid").exists()

    # 1. The demo, against the stack, with the key `up` saved (found through the data dir).
    demo = subprocess.run(
        [*LIFECYCLE, "demo", "--api-url", up.api_url, "--timeout", "60"],
        env=_env(up.data_dir),
        cwd=base,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert demo.returncode == 0, demo.stdout + demo.stderr
    timeline = demo.stdout
    for step in (
        "created",
        "provisioned",
        "active",
        "file written",
        "commands",
        "diff",
        "snapshot",
        "hibernated",
        "resumed",
        "file intact",
    ):
        assert f"✓ {step}" in timeline, timeline
    assert "Demo summary" in timeline and "demo passed" in timeline
    assert "+4 -0" in timeline  # the demo file's four lines, counted by the diff
    if shutil.which("bwrap"):
        # The file went in through the files API; commands ran through the commands API,
        # their output in the timeline; the file was read back by `cat` after the resume.
        assert "via PUT …/files/content" in timeline and "via POST …/commands" in timeline
        assert "$ git status --short" in timeline and "?? DEMO.md" in timeline, timeline
        assert "DEMO.md has 4 lines, python 3." in timeline, timeline
        assert "read by `cat` in the sandbox" in timeline
    else:
        assert "skipped: commands need bubblewrap" in timeline

    with psycopg.connect(db_conninfo(up.data_dir)) as conn:
        (session_id,) = conn.execute("SELECT id::text FROM sessions").fetchone() or ("",)

    # 2. Flower's HTTP API (open on 127.0.0.1 only) lists the demo's tasks and the worker.
    workers = wait_until(
        lambda: httpx.get(f"{up.flower_url}/api/workers?refresh=1", timeout=10).json(),
        timeout=30,
        interval=0.5,
        what="Flower to list the worker",
    )
    assert any(name.startswith("celery@") for name in workers), workers

    def demo_tasks() -> dict[str, dict[str, Any]] | None:
        tasks: dict[str, dict[str, Any]] = httpx.get(
            f"{up.flower_url}/api/tasks", timeout=10
        ).json()
        mine = {t["uuid"]: t for t in tasks.values() if session_id in str(t.get("kwargs"))}
        names = {t["name"] for t in mine.values()}
        wanted = {
            "lifecycle.provision",
            "lifecycle.start",
            "lifecycle.diff",
            "lifecycle.snapshot",
            "lifecycle.hibernate",
        }
        return mine if wanted <= names else None

    tasks = wait_until(demo_tasks, timeout=30, interval=0.5, what="Flower to list the tasks")
    assert all(t["state"] == "SUCCESS" for t in tasks.values()), tasks
    assert all(t["worker"].startswith("celery@") for t in tasks.values())

    # 3. /metrics parses and its numbers are the database's.
    samples = scrape(up.api_url)
    with psycopg.connect(db_conninfo(up.data_dir)) as conn:
        states = dict(
            conn.execute("SELECT lifecycle_state, count(*) FROM sessions GROUP BY 1").fetchall()
        )
        runs = {
            (k, s): n
            for k, s, n in conn.execute(
                "SELECT kind, state, count(*) FROM lifecycle_runs GROUP BY 1, 2"
            ).fetchall()
        }
        timed = dict(
            conn.execute(
                "SELECT kind, count(*) FROM lifecycle_runs WHERE state IN ('succeeded', 'failed')"
                " AND started_at IS NOT NULL AND finished_at IS NOT NULL GROUP BY 1"
            ).fetchall()
        )
        (backlog,) = conn.execute(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL"
        ).fetchone() or (0,)
    assert states == {"active": 1}
    sessions = samples["lifecycle_sessions"]
    for state in ("provisioning", "active", "hibernated", "failed", "archived"):
        assert sessions[(("state", state),)] == states.get(state, 0)
    finished = samples["lifecycle_runs_total"]
    for (kind, state), n in runs.items():
        if state in ("succeeded", "failed", "skipped", "abandoned"):
            assert finished[(("kind", kind), ("outcome", state))] == n, (kind, state)
    assert sum(finished.values()) == sum(
        n for (_, s), n in runs.items() if s in ("succeeded", "failed", "skipped", "abandoned")
    )
    assert finished[(("kind", "start"), ("outcome", "succeeded"))] == 2  # start, resume
    counts = samples["lifecycle_run_duration_seconds_count"]
    for kind, n in timed.items():
        assert counts[(("kind", kind),)] == n
        assert (
            samples["lifecycle_run_duration_seconds_bucket"][(("kind", kind), ("le", "+Inf"))] == n
        )
    assert samples["lifecycle_outbox_backlog"][()] == backlog
    assert samples["lifecycle_database_up"][()] == 1
    assert samples["lifecycle_broker_up"][()] == 1
    assert (("queue", "lifecycle"),) in samples["lifecycle_broker_queue_length"]
    assert samples["lifecycle_leases_live"][()] == 0
    # beat runs the relay every few seconds; its runs are recorded for every process to see
    sweeps = wait_until(
        lambda: scrape(up.api_url).get("lifecycle_sweep_duration_seconds_count"),
        timeout=30,
        interval=0.5,
        what="sweep metrics",
    )
    assert sweeps[(("sweep", "sweeps.relay_outbox"),)] >= 1

    # 4. A child that dies is restarted.
    children = descendants(up.proc.pid)
    beat = next(p for p in children if "beat" in p.cmdline() and "worker" in p.cmdline())
    beat.kill()
    wait_until(
        lambda: any(
            "beat" in p.cmdline() and p.pid != beat.pid and alive(p)
            for p in descendants(up.proc.pid)
        ),
        timeout=30,
        interval=0.25,
        what="beat to be restarted",
    )

    # 5. A second `up` on the same data directory while this one runs is refused.
    second = subprocess.run(
        [*LIFECYCLE, "up", "--api-port", str(find_free_port()), "--flower-port", "0"],
        env=_env(up.data_dir),
        cwd=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert "another `lifecycle up`" in second.stderr

    # 6. Ctrl-C stops everything: children, their pool processes, both servers.
    stack = [p for p in descendants(up.proc.pid) if alive(p)]
    names = " ".join(" ".join(p.cmdline()) for p in stack)
    assert "postgres" in names and "redis-server" in names and "flower" in names
    assert stop_up(up) == 0
    left = [p for p in stack if alive(p)]
    assert not left, [(p.pid, p.cmdline()) for p in left]
    assert not (up.data_dir / "postgres" / "pgdata" / "postmaster.pid").exists()
    assert not (up.data_dir / "redis" / "redis.pid").exists()
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{up.api_url}/healthz", timeout=2)


def test_a_second_up_reuses_the_data_dir(first_up: Up, base: Path) -> None:
    if first_up.proc.poll() is None:
        pytest.skip("the first stack is still running")
    creds = json.loads((first_up.data_dir / "dev-credentials.json").read_text())
    up = start_up(base, "second", "--no-flower", "--concurrency", "1")
    try:
        wait_ready(up)
        again = json.loads((up.data_dir / "dev-credentials.json").read_text())
        assert again["key"] == creds["key"] and again["account_id"] == creds["account_id"]
        assert again["api_url"] == up.api_url
        assert "(new)" not in up.text()
        headers = {"x-api-key": creds["key"]}
        listed = httpx.get(f"{up.api_url}/api/sessions", headers=headers, timeout=10)
        assert listed.status_code == 200
        assert [s["title"] for s in listed.json()["sessions"]] == ["lifecycle demo"]
        stack = [p for p in descendants(up.proc.pid) if alive(p)]
    finally:
        code = stop_up(up, signal.SIGTERM)
    assert code == 0
    assert not [p for p in stack if alive(p)]
