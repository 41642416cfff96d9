"""The supervisor of ``lifecycle up`` with real processes: restarts with backoff, stops
whole process groups (even what ignores SIGTERM), and children die with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.processes import wait_until
from worker.ops.stack import (
    DevCredentials,
    StackError,
    data_dir_lock,
    read_credentials,
    write_credentials,
)
from worker.ops.supervisor import Supervisor


def _wait(check: Callable[[], object], timeout: float = 10.0) -> None:
    wait_until(check, timeout=timeout, interval=0.05)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_dead_child_is_restarted_with_backoff(tmp_path: Path) -> None:
    messages: list[str] = []
    sup = Supervisor(dict(os.environ), tmp_path / "logs", say=messages.append)
    child = sup.add("flaky", ["sh", "-c", "echo started; exit 3"])
    sup.start_all()
    try:
        first = child.pid
        _wait(lambda: (sup.poll(), child.restarts >= 1)[1], timeout=10)
        assert child.last_exit == 3 and child.pid != first
        assert "flaky exited with code 3" in messages[0] and "restarting in 1s" in messages[0]
        _wait(lambda: (sup.poll(), child.restarts >= 2)[1], timeout=10)
        assert any("restarting in 2s" in m for m in messages)  # backing off
    finally:
        sup.stop_all(grace=1)
    assert (tmp_path / "logs" / "flaky.log").read_text().count("started") >= 2


def test_stop_takes_the_whole_process_group(tmp_path: Path) -> None:
    sup = Supervisor(dict(os.environ), tmp_path / "logs", say=lambda _m: None)
    # A grandchild that ignores SIGTERM, as a stuck pool process would.
    script = "(trap '' TERM; sleep 300) & echo $! > grandchild.pid; wait"
    child = sup.add("stubborn", ["sh", "-c", script])
    sup.cwd = tmp_path
    sup.start_all()
    pid_file = tmp_path / "grandchild.pid"
    _wait(lambda: pid_file.exists() and pid_file.read_text().strip())
    grandchild = int(pid_file.read_text())
    leader = child.pid
    assert leader is not None and not _gone(grandchild)
    started = time.monotonic()
    sup.stop_all(grace=0.5)
    assert time.monotonic() - started < 10
    assert _gone(leader) and _gone(grandchild)
    assert child.proc is None


def test_children_die_with_the_supervisor(tmp_path: Path) -> None:
    """Even a ``kill -9`` of ``lifecycle up`` leaves no child running (parent-death signal)."""
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from pathlib import Path
        from worker.ops.supervisor import Supervisor
        sup = Supervisor(dict(os.environ), Path({str(tmp_path / "logs")!r}), say=print)
        child = sup.add("sleeper", ["sleep", "300"])
        sup.start_all()
        print(child.pid, flush=True)
        time.sleep(300)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert parent.stdout is not None
        child_pid = int(parent.stdout.readline())
        assert not _gone(child_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        _wait(lambda: _gone(child_pid), timeout=10)
    finally:
        if parent.poll() is None:
            parent.kill()


def test_credentials_file_is_private_and_round_trips(tmp_path: Path) -> None:
    creds = DevCredentials("acc", "kid", "slk_secret", "http://127.0.0.1:9000")
    write_credentials(tmp_path, creds)
    path = tmp_path / "dev-credentials.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_credentials(tmp_path) == creds
    path.write_text("{not json")
    assert read_credentials(tmp_path) is None


def test_one_up_per_data_dir(tmp_path: Path) -> None:
    with data_dir_lock(tmp_path):
        probe = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys; from pathlib import Path; from worker.ops.stack import data_dir_lock\n"
                "with data_dir_lock(Path(sys.argv[1])): pass",
                str(tmp_path),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert probe.returncode != 0 and StackError.__name__ in probe.stderr
        assert "another `lifecycle up`" in probe.stderr
        assert str(os.getpid()) in probe.stderr
    with data_dir_lock(tmp_path):  # released: can be taken again
        pass


@pytest.fixture(autouse=True)
def _no_stray_processes() -> Iterator[None]:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    after = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not [p for p in after if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
