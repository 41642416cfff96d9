"""``lifecycle up``: the whole system on one machine, supervised by one process.

With no ``LIFECYCLE_DATABASE_URL`` / ``LIFECYCLE_BROKER_URL`` in the environment it
starts an embedded PostgreSQL and an embedded Redis under the data directory (with
them set, it uses those servers), applies migrations, makes sure a development
account and API key exist, and runs the API, a worker, beat and Flower as child
processes. A child that dies is restarted with backoff; SIGINT or SIGTERM stops every
child (its whole process group), then the embedded servers, and leaves no process.
The children's supervision is :mod:`worker.ops.supervisor`; the servers are
:mod:`worker.ops.embedded`.

Layout under the data directory (besides the providers' ``repos/``, ``sandboxes/``,
``snapshots/``)::

    postgres/                 embedded PostgreSQL (see worker.ops.embedded)
    redis/                    embedded Redis, with an append-only file
    logs/<child>.log          each child's output, appended across starts, rotated at 10 MiB (3 kept)
    dev-credentials.json      the development account and API key (mode 0600)
    stack.json                the running stack's database, broker and API URLs (mode 0600),
                              which the admin commands act on (worker.ops.target)
    up.lock                   held while a ``lifecycle up`` runs on this directory
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from worker.logging import redact_text
from worker.ops.ports import LOOPBACK, port_is_free
from worker.ops.supervisor import STOP_GRACE, Supervisor
from worker.ops.target import StackFile, write_stack_file
from worker.providers.bwrap import find_bwrap
from worker.routing import this_host

CREDENTIALS_FILE = "dev-credentials.json"
DEV_ACCOUNT_NAME = "Development"


class StackError(RuntimeError):
    """``lifecycle up`` cannot start."""


# --------------------------------------------------------------------------- credentials


@dataclass(frozen=True)
class DevCredentials:
    account_id: str
    key_id: str
    key: str
    api_url: str = f"http://{LOOPBACK}:8000"

    def to_json(self) -> dict[str, str]:
        return {
            "account_id": self.account_id,
            "key_id": self.key_id,
            "key": self.key,
            "api_url": self.api_url,
        }


def credentials_path(data_dir: Path) -> Path:
    return data_dir / CREDENTIALS_FILE


def read_credentials(data_dir: Path) -> DevCredentials | None:
    """The development credentials saved by ``lifecycle up``, if any."""
    try:
        raw = json.loads(credentials_path(data_dir).read_text())
        return DevCredentials(
            account_id=str(raw["account_id"]),
            key_id=str(raw["key_id"]),
            key=str(raw["key"]),
            api_url=str(raw.get("api_url") or DevCredentials.api_url),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_credentials(data_dir: Path, creds: DevCredentials) -> None:
    """Write the file readable by its owner only (created 0600, then renamed into place)."""
    path = credentials_path(data_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(creds.to_json(), fh, indent=2)
        fh.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def ensure_dev_credentials(data_dir: Path, api_url: str) -> tuple[DevCredentials, bool]:
    """Reuse the saved key if the database still accepts it; else create an account and
    key. Returns (credentials, created)."""
    from worker.db.engine import get_sessionmaker
    from worker.errors import DomainError
    from worker.services import accounts

    saved = read_credentials(data_dir)
    factory = get_sessionmaker()
    if saved is not None:
        try:
            with factory() as db:
                account = accounts.authenticate(db, saved.key)
            if str(account) == saved.account_id:
                creds = DevCredentials(saved.account_id, saved.key_id, saved.key, api_url)
                if creds != saved:
                    write_credentials(data_dir, creds)
                return creds, False
        except DomainError:
            pass  # another database, or the key was revoked: make a new one
    with factory.begin() as db:
        account_record = accounts.create_account(db, DEV_ACCOUNT_NAME)
        key = accounts.create_key(db, account_record.id)
        creds = DevCredentials(str(account_record.id), str(key.id), key.key, api_url)
    write_credentials(data_dir, creds)
    return creds, True


# --------------------------------------------------------------------------- the stack


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """Held for the life of one ``lifecycle up``: a second one on the same directory
    while the first runs is refused instead of fighting over ports and servers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "up.lock"
    with path.open("a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "?"
            raise StackError(
                f"another `lifecycle up` (pid {holder}) is running on {data_dir}"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@dataclass
class StackOptions:
    data_dir: Path
    api_port: int = 8000
    flower_port: int = 5555
    concurrency: int = 2
    echo: bool = True
    flower: bool = True
    ready_timeout: float = 120.0


@dataclass
class StackInfo:
    api_url: str
    flower_url: str | None
    database_url: str
    broker_url: str
    embedded_database: bool
    embedded_broker: bool
    credentials: DevCredentials
    credentials_created: bool
    flower_authenticated: bool
    sandbox_provider: str = "local"
    concurrency: int = 2
    hostname: str = ""


class Stack:
    """Everything ``lifecycle up`` runs; :meth:`run` blocks until a stop signal."""

    def __init__(self, options: StackOptions, say: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.data_dir = options.data_dir.absolute()
        self.say = say or (lambda msg: print(f"[up] {msg}", file=sys.stderr, flush=True))
        self._stop = threading.Event()
        self._signals = 0
        self._postgres: Any = None
        self._redis: Any = None
        self.supervisor: Supervisor | None = None
        self.info: StackInfo | None = None

    # signals ------------------------------------------------------------------------
    def _on_signal(self, _signum: int, _frame: Any) -> None:
        self._signals += 1
        self._stop.set()

    def request_stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # the run ------------------------------------------------------------------------
    def run(self, on_ready: Callable[[StackInfo], None] | None = None) -> int:
        """Start, supervise until SIGINT/SIGTERM, stop. Returns the exit code."""
        previous = {
            sig: signal.signal(sig, self._on_signal)
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        }
        try:
            with data_dir_lock(self.data_dir):
                try:
                    info = self._start()
                    if info is None:
                        return 0  # stopped while starting
                    if on_ready is not None:
                        on_ready(info)
                    while not self._stop.wait(0.25):
                        assert self.supervisor is not None
                        self.supervisor.poll()
                    self.say("stopping …")
                    return 0
                finally:
                    self._shutdown()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start(self) -> StackInfo | None:  # noqa: C901 -- start-up steps in order, each reported
        opts = self.options
        wanted = [("API", "api", opts.api_port)]
        if opts.flower:
            wanted.append(("Flower", "flower", opts.flower_port))
        busy = [
            f"port {port} for the {what} is in use (pick another with --{flag}-port, "
            f"or make run {flag.upper()}_PORT=...)"
            for what, flag, port in wanted
            if not port_is_free(port)
        ]
        if busy:  # every busy port at once, not one per attempt
            raise StackError("; ".join(busy))
        database_url = os.environ.get("LIFECYCLE_DATABASE_URL")
        broker_url = os.environ.get("LIFECYCLE_BROKER_URL")
        from worker.ops.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServerError

        try:
            if not database_url:
                self.say(f"starting embedded PostgreSQL in {self.data_dir / 'postgres'}")
                self._postgres = EmbeddedPostgres(self.data_dir / "postgres", database="lifecycle")
                self._postgres.start()
                database_url = str(self._postgres.url)
            if not broker_url and not self.stopping:
                self.say(f"starting embedded Redis in {self.data_dir / 'redis'}")
                self._redis = EmbeddedRedis(self.data_dir / "redis", appendonly=True)
                self._redis.start()
                broker_url = str(self._redis.url)
        except EmbeddedServerError as exc:
            raise StackError(str(exc)) from exc
        if self.stopping or not database_url or not broker_url:
            return None

        # This process and every child use the same settings.
        os.environ["LIFECYCLE_DATABASE_URL"] = database_url
        os.environ["LIFECYCLE_BROKER_URL"] = broker_url
        os.environ["LIFECYCLE_DATA_DIR"] = str(self.data_dir)
        if "LIFECYCLE_SANDBOX_PROVIDER" not in os.environ:
            # Agents' commands need bubblewrap; without it sandboxes are plain directories.
            os.environ["LIFECYCLE_SANDBOX_PROVIDER"] = "bwrap" if find_bwrap() else "local"
        from worker.config import get_settings
        from worker.db.engine import reset_engine
        from worker.db.migrate import upgrade

        get_settings.cache_clear()
        reset_engine()
        self.say("applying migrations")
        api_url = f"http://{LOOPBACK}:{opts.api_port}"
        try:
            upgrade(database_url)
            creds, created = ensure_dev_credentials(self.data_dir, api_url)
        except SQLAlchemyError as exc:
            reason = redact_text(str(getattr(exc, "orig", None) or exc)).strip().splitlines()
            raise StackError(
                f"cannot use the database at {redact_text(database_url)}: "
                + (reason[0] if reason else type(exc).__name__)
            ) from exc
        finally:
            reset_engine()  # children have their own connections; hold none while supervising
        if self.stopping:
            return None

        flower_auth = bool(get_settings().flower_basic_auth)
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        if "LIFECYCLE_LOG_JSON" not in env and self.options.echo and sys.stderr.isatty():
            env["LIFECYCLE_LOG_JSON"] = "false"  # a person is reading: console lines
        lifecycle = [sys.executable, "-m", "worker"]
        sup = self.supervisor = Supervisor(
            env,
            self.data_dir / "logs",
            echo=sys.stderr if opts.echo else None,
            say=self.say,
        )
        sup.add("api", [*lifecycle, "api", "--host", LOOPBACK, "--port", str(opts.api_port)])
        # Celery's banners and its superuser warning would push the key off the screen;
        # the banner below says what they said (see ``banner``).
        sup.add("worker", [*lifecycle, "worker", "--concurrency", str(opts.concurrency), "--quiet"])
        sup.add("beat", [*lifecycle, "beat", "--quiet"])
        flower_url: str | None = None
        if opts.flower:
            argv = [
                *lifecycle,
                "flower",
                "--port",
                str(opts.flower_port),
                "--address",
                LOOPBACK,
            ]
            if not flower_auth:
                argv.append("--unauthenticated-api")  # loopback only; see worker.ops.monitor
            sup.add("flower", argv)
            flower_url = f"http://{LOOPBACK}:{opts.flower_port}"
        sup.start_all()
        self.info = StackInfo(
            api_url=api_url,
            flower_url=flower_url,
            database_url=database_url,
            broker_url=broker_url,
            embedded_database=self._postgres is not None,
            embedded_broker=self._redis is not None,
            credentials=creds,
            credentials_created=created,
            flower_authenticated=flower_auth,
            sandbox_provider=get_settings().sandbox_provider,
            concurrency=opts.concurrency,
            hostname=this_host(),
        )
        # Admin commands run from the same data directory act on this stack.
        write_stack_file(
            self.data_dir, StackFile(database_url, broker_url, api_url, pid=os.getpid())
        )
        if not self._wait_ready(api_url):
            return None
        return self.info

    def _wait_ready(self, api_url: str) -> bool:
        import httpx

        deadline = time.monotonic() + self.options.ready_timeout
        while not self._stop.wait(0.25):
            assert self.supervisor is not None
            self.supervisor.poll()
            try:
                if httpx.get(f"{api_url}/readyz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise StackError(
                    f"the API did not become ready within {self.options.ready_timeout:.0f}s; "
                    f"see {self.data_dir / 'logs'}"
                )
        return False

    def _shutdown(self) -> None:
        # Further signals only hurry things up; they never interrupt the cleanup.
        if self.supervisor is not None:
            self.supervisor.stop_all(grace=2.0 if self._signals > 1 else STOP_GRACE)
        for server, what in ((self._redis, "Redis"), (self._postgres, "PostgreSQL")):
            if server is None:
                continue
            try:
                server.stop()
            except Exception as exc:
                self.say(f"could not stop embedded {what}: {exc}")
        self.say("stopped")


def lifecycle_command() -> str:
    """How to type ``lifecycle`` in another terminal: the bare name when it is on the
    PATH, else its path (``make run`` installs into ``.venv``, which is not)."""
    import shutil

    beside = Path(sys.executable).parent / "lifecycle"
    if not beside.exists() or shutil.which("lifecycle") == str(beside):
        return "lifecycle"
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def banner(info: StackInfo, data_dir: Path) -> str:
    creds = info.credentials
    db = redact_text(info.database_url) + ("  (embedded)" if info.embedded_database else "")
    broker = redact_text(info.broker_url) + ("  (embedded)" if info.embedded_broker else "")
    lines = [
        "",
        "Session Lifecycle Worker is up",
        f"  API       {info.api_url}   (docs {info.api_url}/docs, metrics {info.api_url}/metrics)",
    ]
    if info.flower_url:
        note = "basic auth" if info.flower_authenticated else "API open on 127.0.0.1 only"
        lines.append(f"  Flower    {info.flower_url}   ({note})")
    lines += [
        f"  Database  {db}",
        f"  Broker    {broker}",
        f"  Data      {data_dir}   (logs in {data_dir / 'logs'})",
        "  Worker    "
        + f"{info.concurrency} processes on queues lifecycle and lifecycle.host.{info.hostname}"
        + ("   (as root: Celery's superuser warning is silenced)" if os.geteuid() == 0 else ""),
        "  Sandboxes "
        + (
            "bwrap (agents' commands run confined by bubblewrap)"
            if info.sandbox_provider == "bwrap"
            else f"{info.sandbox_provider} (plain directories: no commands; for them install "
            "bubblewrap: apt-get install -y bubblewrap)"
        ),
        f"  Dev key   {creds.key}",
        f"            account {creds.account_id}"
        + ("" if not info.credentials_created else "  (new)")
        + f", saved in {credentials_path(data_dir)}",
        "",
        f"Try it:    {lifecycle_command()} demo          (in another terminal)",
        f"           curl -H 'x-api-key: {creds.key}' -X POST {info.api_url}/api/sessions",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)
