"""The supervisor of ``lifecycle up``: child processes, each in its own session and
process group, restarted with backoff when they die and stopped as whole groups; their
output appended to ``<log_dir>/<child>.log``, rotated by size."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = ["LOG_KEEP", "LOG_ROTATE_BYTES", "STOP_GRACE", "Child", "Supervisor", "rotate_log"]

RESTART_BACKOFF_MAX = 30.0
STABLE_AFTER = 30.0  # a child that ran this long starts its backoff afresh
STOP_GRACE = 15.0


def _parent_death_signal() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child if this process dies (so a
    ``kill -9`` of ``lifecycle up`` does not leave the children running).

    libc and prctl are looked up here, in the parent: the forked child only calls an
    already-resolved function (no dlopen, no Python-level locks)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        prctl = ctypes.CDLL(name, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(pr_set_pdeathsig, sigterm, 0, 0, 0)

    return preexec


@dataclass
class Child:
    """One supervised process (its own session and process group)."""

    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0  # consecutive quick deaths, for the backoff
    restart_at: float | None = None
    reader: threading.Thread | None = None
    last_exit: int | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class Supervisor:
    """Starts children, restarts the ones that die (with backoff), stops them all."""

    def __init__(
        self,
        env: dict[str, str],
        log_dir: Path,
        *,
        echo: IO[str] | None = None,
        cwd: Path | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.env = env
        self.log_dir = log_dir
        self.echo = echo
        self.cwd = cwd
        self.say = say
        self.children: dict[str, Child] = {}
        self._echo_lock = threading.Lock()
        self._preexec = _parent_death_signal()
        self._colors = bool(echo is not None and echo.isatty())

    def add(self, name: str, argv: list[str]) -> Child:
        child = Child(name, argv)
        self.children[name] = child
        return child

    def start_all(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for child in self.children.values():
            # Appended across starts (what happened before a restart is what one looks
            # for), rotated by size.
            path = self.log_dir / f"{child.name}.log"
            rotate_log(path)
            with path.open("ab") as log:
                log.write(f"--- lifecycle up: {child.name} starting ---\n".encode())
            self._spawn(child)

    def _spawn(self, child: Child) -> None:
        child.proc = subprocess.Popen(
            child.argv,
            env=self.env,
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stopped as a whole, no terminal ^C
            preexec_fn=self._preexec,
        )
        child.started_at = time.monotonic()
        child.restart_at = None
        child.reader = threading.Thread(
            target=self._pump, args=(child.name, child.proc), daemon=True, name=f"pump-{child.name}"
        )
        child.reader.start()

    _COLORS = ("36", "35", "33", "32", "34", "31")

    def _pump(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        """Copy a child's output to its log file (and to the console, prefixed)."""
        assert proc.stdout is not None
        index = list(self.children).index(name) if name in self.children else 0
        color = self._COLORS[index % len(self._COLORS)]
        prefix = f"\x1b[{color}m{name:>6} |\x1b[0m " if self._colors else f"{name:>6} | "
        path = self.log_dir / f"{name}.log"
        log = path.open("ab")
        try:
            for line in iter(proc.stdout.readline, b""):
                log.write(line)
                log.flush()
                if log.tell() >= LOG_ROTATE_BYTES:
                    log.close()
                    rotate_log(path)
                    log = path.open("ab")
                if self.echo is not None:
                    text = line.decode(errors="replace").rstrip("\n")
                    with self._echo_lock, contextlib.suppress(OSError, ValueError):
                        self.echo.write(prefix + text + "\n")
                        self.echo.flush()
        finally:
            log.close()
        proc.stdout.close()

    def poll(self) -> None:
        """Restart children that died, after their backoff."""
        now = time.monotonic()
        for child in self.children.values():
            proc = child.proc
            if proc is not None and proc.poll() is not None:
                code = proc.returncode
                child.last_exit = code
                _kill_group(proc.pid, signal.SIGKILL)  # whatever it left behind
                lived = now - child.started_at
                child.failures = 1 if lived >= STABLE_AFTER else child.failures + 1
                delay = min(RESTART_BACKOFF_MAX, 2.0 ** (child.failures - 1))
                child.proc = None
                child.restart_at = now + delay
                self.say(
                    f"{child.name} exited with code {code} after {lived:.1f}s; "
                    f"restarting in {delay:.0f}s"
                )
            elif child.proc is None and child.restart_at is not None and now >= child.restart_at:
                child.restarts += 1
                self._spawn(child)

    def stop_all(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every child, wait up to ``grace`` seconds, then SIGKILL each whole
        process group (pool processes, uvicorn workers) so nothing is left."""
        running = [c for c in self.children.values() if c.proc is not None]
        for child in running:
            assert child.proc is not None
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in running:
            assert child.proc is not None
            try:
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"{child.name} did not stop within {grace:.0f}s; killing it")
        for child in running:
            assert child.proc is not None
            _kill_group(child.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
            _wait_group_gone(child.proc.pid, 5.0)
            if child.reader is not None:
                child.reader.join(timeout=2)
            child.proc = None
            child.restart_at = None


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _wait_group_gone(pgid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


#: A child's log file is rotated when it reaches this size; ``LOG_KEEP`` older
#: generations (``<child>.log.1`` newest) are kept.
LOG_ROTATE_BYTES = 10 * 1024 * 1024
LOG_KEEP = 3


def rotate_log(path: Path, limit: int = LOG_ROTATE_BYTES, keep: int = LOG_KEEP) -> bool:
    """Shift ``path`` to ``path.1`` (and so on, dropping the oldest) once it has reached
    ``limit`` bytes. Returns whether it rotated."""
    try:
        if path.stat().st_size < limit:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))
    return True
