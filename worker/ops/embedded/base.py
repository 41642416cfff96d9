"""What both embedded servers share: :class:`ServerProcess`, one child process under a
data directory, and the process and file helpers it stands on."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from worker.ops.ports import LOOPBACK, find_free_port, port_is_free

__all__ = ["EmbeddedServerError", "ServerProcess"]


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


# --------------------------------------------------------------------------- helpers


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    # "pid (comm) S ..." -- comm may contain spaces or parentheses
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def read_port_file(path: Path) -> int | None:
    port = read_int(path)
    return port if port is not None and 0 < port < 65536 else None


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def dir_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (flock) around start/stop of one data directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def wait_for_exit(proc: subprocess.Popen[bytes] | None, pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone (reaping it if it is our child). True if it exited."""
    deadline = time.monotonic() + timeout
    if proc is not None and proc.pid == pid:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def send_signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def choose_port(requested: int | None, port_file: Path) -> int:
    """Explicit port, else the remembered one if free, else a new free port."""
    if requested is not None:
        if not port_is_free(requested):
            raise EmbeddedServerError(f"port {requested} on {LOOPBACK} is already in use")
        return requested
    remembered = read_port_file(port_file)
    if remembered is not None and port_is_free(remembered):
        return remembered
    return find_free_port()


# --------------------------------------------------------------------------- the base


class ServerProcess(ABC):
    """A server run as a direct child in its own session, its files under ``data_dir``.

    ``start()`` is a no-op when the server already runs (this process's child or one
    found through its files); otherwise it prepares the directory, picks the port
    (the requested one, else the one remembered in ``data_dir/port`` when free, else a
    new one), launches the server and waits, bounded, until it answers. ``stop()``
    signals it and waits, then SIGKILLs it. Start and stop hold an flock on
    ``data_dir/.lock``, so processes sharing the directory take turns.
    """

    #: The program's name in messages.
    program: str = "server"
    #: What the readiness probe waits for, in the timeout message.
    ready_means: str = "answer"
    #: The probe's last failure before any probe ran, in the timeout message.
    no_answer_yet: str = ""
    #: Seconds between readiness probes.
    probe_interval: float = 0.05

    def __init__(self, data_dir: Path, port: int | None, startup_timeout: float) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._port: int | None = port
        self._proc: subprocess.Popen[bytes] | None = None

    # what each server says ------------------------------------------------------------

    @property
    @abstractmethod
    def log_file(self) -> Path:
        """Where the server's output goes."""

    @property
    @abstractmethod
    def url(self) -> str:
        """How a client reaches the running server."""

    @abstractmethod
    def stop(self) -> None:
        """Stop the server if it runs; wait for its exit."""

    @abstractmethod
    def _command(self, port: int) -> list[str]:
        """The server's command line, listening on 127.0.0.1:``port``."""

    @abstractmethod
    def _probe(self, port: int) -> str | None:
        """None once the server answers on ``port``, else what went wrong."""

    @abstractmethod
    def _pid_on_disk(self) -> int | None:
        """The pid of a live server started by another process, found through its files."""

    def _popen_options(self) -> dict[str, Any]:
        """Extra :class:`subprocess.Popen` arguments (environment, user)."""
        return {}

    def _discover_port(self) -> int | None:
        """The port when none was requested or chosen yet."""
        return read_port_file(self._port_file)

    def _adopt_running(self) -> None:
        """``start()`` found the server running: take its port."""
        self._port = read_port_file(self._port_file) or self._port

    def _prepare(self) -> None:
        """Before the port is chosen: directories, ownership, initialisation."""
        return None  # nothing by default

    @abstractmethod
    def _clear_stale_files(self) -> None:
        """Before the launch: drop files a dead server left that would stop a new one."""

    def _after_start(self) -> None:
        """After the launch, outside the lock."""
        return None  # nothing by default

    def _after_stop(self) -> None:
        """After the server stopped, inside the lock."""
        return None  # nothing by default

    # shared ----------------------------------------------------------------------------

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "port"

    @property
    def port(self) -> int:
        """The TCP port: the running server's, else the requested or remembered one."""
        if self._port is None:
            self._port = self._discover_port()
        if self._port is None:
            raise EmbeddedServerError(f"{self.data_dir}: no port yet; call start() first")
        return self._port

    def is_running(self) -> bool:
        return self._running_pid() is not None

    def start(self) -> bool:
        """Start the server; True if started, False if it was already running (no-op)."""
        with dir_lock(self.data_dir / ".lock"):
            if self.is_running():
                self._adopt_running()
                return False
            self._prepare()
            port = choose_port(self._requested_port, self._port_file)
            self._port = port
            self._port_file.write_text(f"{port}\n")
            self._clear_stale_files()
            self._launch(port)
        self._after_start()
        return True

    def kill(self) -> None:
        """SIGKILL the server (a crash, for fault tests)."""
        pid = self._running_pid()
        if pid is not None:
            self._kill_pid(pid)
        self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.data_dir)!r}, port={self._port})"

    # internals -------------------------------------------------------------------------

    def _stop(self, sig: signal.Signals, timeout: float) -> None:
        """Send ``sig``, wait up to ``timeout`` seconds, then SIGKILL."""
        with dir_lock(self.data_dir / ".lock"):
            pid = self._running_pid()
            if pid is None:
                return
            send_signal(pid, sig)
            if not wait_for_exit(self._proc, pid, timeout):
                self._kill_pid(pid)
            self._proc = None
            self._after_stop()

    def _kill_pid(self, pid: int) -> None:
        send_signal(pid, signal.SIGKILL)
        wait_for_exit(self._proc, pid, 10.0)

    def _running_pid(self) -> int | None:
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None
        return self._pid_on_disk()

    def _launch(self, port: int) -> None:
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                self._command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.data_dir,
                **self._popen_options(),
            )
        self._wait_ready(self._proc, port)

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        failure = self.no_answer_yet
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._proc = None
                raise EmbeddedServerError(
                    f"{self.program} exited with {proc.returncode} while starting; "
                    f"log {self.log_file}:\n" + log_tail(self.log_file)
                )
            answer = self._probe(port)
            if answer is None:
                return
            failure = answer
            time.sleep(self.probe_interval)
        self.kill()
        raise EmbeddedServerError(
            f"{self.program} did not {self.ready_means} on port {port} within "
            f"{self.startup_timeout}s ({failure}); log:\n{log_tail(self.log_file)}"
        )
