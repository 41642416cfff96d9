"""``lifecycle``: the operator's command line."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from worker.config import get_settings
from worker.domain.filters import PAGE_LIMIT_MAX

T = TypeVar("T")

app = typer.Typer(
    help="Session Lifecycle Worker: run and operate the control plane.", no_args_is_help=True
)
accounts_app = typer.Typer(help="Manage accounts (people and organizations).", no_args_is_help=True)
orgs_app = typer.Typer(help="Manage organization membership.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
sessions_app = typer.Typer(help="Inspect and kick sessions.", no_args_is_help=True)
app.add_typer(accounts_app, name="accounts")
app.add_typer(orgs_app, name="orgs")
app.add_typer(keys_app, name="keys")
app.add_typer(sessions_app, name="sessions")


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _domain(fn: Callable[[], T]) -> T:
    from worker.errors import DomainError

    try:
        return fn()
    except DomainError as exc:
        _fail(exc.message, 2 if exc.status_code == 400 else 1)


# --------------------------------------------------------------------------- the database
# The admin commands (accounts, orgs, keys, sessions, sweep, migrate) act on
# LIFECYCLE_DATABASE_URL when it is set, else on the stack `lifecycle up` runs from the
# same data directory (worker.ops.target); each says which on stderr.

DataDirOption = Annotated[
    str | None,
    typer.Option(
        "--data-dir",
        help="Data directory of the `lifecycle up` stack to act on when "
        "LIFECYCLE_DATABASE_URL is not set (default: LIFECYCLE_DATA_DIR or ./.lifecycle)",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON (for scripts)")]

_target: Any = None  # the worker.ops.target.Target in use, for error messages


def _use_stack(data_dir: str | None) -> None:
    """Point this process at the database (and broker) to act on, and say which."""
    from pathlib import Path

    from worker.db.engine import reset_engine
    from worker.ops.target import TargetError, apply_target, find_target

    global _target
    root = Path(data_dir) if data_dir else get_settings().data_dir
    try:
        target = find_target(root, os.environ)
    except TargetError as exc:
        _fail(str(exc))
    before = {k: os.environ.get(k) for k in _TARGET_ENV}
    apply_target(target, root, os.environ)
    if any(os.environ.get(k) != v for k, v in before.items()):
        get_settings.cache_clear()
        reset_engine()
    _target = target
    typer.echo(target.describe(), err=True)


_TARGET_ENV = ("LIFECYCLE_DATABASE_URL", "LIFECYCLE_BROKER_URL", "LIFECYCLE_DATA_DIR")


def _explain(exc: BaseException) -> str:
    from worker.ops.target import Target, explain_database_error

    target = _target or Target(get_settings().database_url, None, "settings")
    return explain_database_error(target, exc)


@contextlib.contextmanager
def _database_errors() -> Iterator[None]:
    """A database that cannot be used ends the command with one line, no traceback."""
    from sqlalchemy.exc import DBAPIError

    try:
        yield
    except DBAPIError as exc:
        _fail(_explain(exc))


@contextlib.contextmanager
def _db() -> Iterator[Any]:
    """One transaction on the target database."""
    from worker.db.engine import get_sessionmaker

    with _database_errors(), get_sessionmaker().begin() as db:
        yield db


# --------------------------------------------------------------------------- ids
_ID_CHARS = frozenset("0123456789abcdef-")
_SHOWN_MATCHES = 5


def _resolve_id(db: Any, model: Any, value: str, what: str) -> uuid.UUID:
    """A whole id, or the start of exactly one existing id (dashes optional). Not found
    and ambiguous prefixes end the command saying so (an ambiguous one lists matches)."""
    from sqlalchemy import String, cast, func, select

    text = value.strip().lower()
    try:
        return uuid.UUID(text)
    except ValueError:
        pass
    if not text or not set(text) <= _ID_CHARS:
        _fail(f"{what} must be a UUID or the start of one, got {value!r}", 2)
    prefix = text.replace("-", "")
    column = func.replace(cast(model.id, String), "-", "")
    matches = list(
        db.scalars(
            select(model.id)
            .where(column.like(f"{prefix}%"))
            .order_by(model.id)
            .limit(_SHOWN_MATCHES + 1)
        )
    )
    if not matches:
        _fail(f"{what} not found: no {what} starts with {text}")
    if len(matches) > 1:
        shown = ", ".join(str(m) for m in matches[:_SHOWN_MATCHES])
        more = ", ..." if len(matches) > _SHOWN_MATCHES else ""
        _fail(f"{what} prefix {text} is ambiguous: it matches {shown}{more}; give more of it", 2)
    return uuid.UUID(str(matches[0]))


def _print_table(columns: list[str], rows: list[list[str]]) -> None:
    """A table whose first column (an id) is never cut: other columns wrap, and a
    terminal too narrow for that gets one block per row instead."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if console.width < 38 + 8 * (len(columns) - 1):
        for row in rows:
            console.print(row[0], soft_wrap=True, highlight=False)
            for name, cell in zip(columns[1:], row[1:], strict=True):
                if cell:
                    console.print(f"  {name}: {cell}", highlight=False, overflow="fold")
        return
    table = Table()
    table.add_column(columns[0], no_wrap=True, min_width=36)
    for name in columns[1:]:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


@app.command()
def migrate(data_dir: DataDirOption = None) -> None:
    """Apply database migrations (Alembic) up to the newest."""
    from worker.db.migrate import upgrade

    _use_stack(data_dir)
    with _database_errors():
        upgrade()
    typer.echo("database migrated")


@app.command()
def api(
    host: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on")] = 8000,
    workers: Annotated[int, typer.Option(help="uvicorn worker processes")] = 1,
) -> None:
    """Run the HTTP API (uvicorn)."""
    import socket

    import uvicorn
    from uvicorn.config import Config

    bind = Config.bind_socket

    def bind_tcp(config: Config) -> socket.socket:
        # With --workers N uvicorn binds the listener itself with proto 0, so asyncio never
        # sets TCP_NODELAY on accepted connections and every keep-alive response waits
        # ~40 ms for the client's delayed ACK (Kludex/uvicorn#3149). Re-wrap it as TCP.
        sock = bind(config)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.proto == 0:
            sock = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, sock.detach())
        return sock

    Config.bind_socket = bind_tcp  # type: ignore[method-assign,assignment]
    uvicorn.run(
        "api_stub.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        # httptools with limits on the request head (431 instead of buffering it).
        http="api_stub.server:HeadLimitedHttpToolsProtocol",
        log_config=None,
        access_log=False,
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(
    ctx: typer.Context,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", help="Worker processes/threads")
    ] = 2,
    pool: Annotated[str, typer.Option(help="prefork | threads | solo")] = "prefork",
    queues: Annotated[str | None, typer.Option("--queues", "-Q", help="Extra queues")] = None,
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
) -> None:
    """Run a Celery worker on the default queue and this host's own queue.

    Extra arguments are passed to ``celery worker`` unchanged."""
    from worker.celery_app import app as celery_app
    from worker.logging import configure_logging
    from worker.routing import host_queue
    from worker.task_names import DEFAULT_QUEUE

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    names = [DEFAULT_QUEUE, host_queue()] + ([q for q in queues.split(",") if q] if queues else [])
    argv = [
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={','.join(names)}",
        f"--loglevel={loglevel}",
        "--events",
        *ctx.args,
    ]
    celery_app.worker_main(argv)


@app.command()
def beat(loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO") -> None:
    """Run Celery beat (the scheduled sweeps)."""
    from worker.celery_app import app as celery_app
    from worker.logging import configure_logging
    from worker.providers.broker import survive_broker_loss

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    survive_broker_loss()
    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.start(["beat", f"--loglevel={loglevel}", f"--schedule={schedule}"])


@app.command()
def sweep(
    name: Annotated[
        str,
        typer.Argument(
            help="hibernate_idle | relay_outbox | reap_runs | expire_snapshots | retention "
            "| webhook_retries"
        ),
    ],
    data_dir: DataDirOption = None,
) -> None:
    """Run one sweep once and print what it did (JSON)."""
    from worker.services import retention, sweeps, webhooks

    fns = {
        "hibernate_idle": sweeps.hibernate_idle,
        "relay_outbox": sweeps.relay_outbox,
        "reap_runs": sweeps.reap_runs,
        "expire_snapshots": sweeps.expire_snapshots,
        "retention": retention.sweep,
        "webhook_retries": webhooks.retry_due,
    }
    fn = fns.get(name.replace("sweeps.", "").replace("-", "_"))
    if fn is None:
        _fail(f"unknown sweep {name!r}; one of: {', '.join(fns)}", 2)
    _use_stack(data_dir)
    from worker.tasks import service

    with _database_errors():
        result = fn(service())
    typer.echo(json.dumps(result))


# --------------------------------------------------------------------------- accounts, keys


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Option("--name", help="Display name")],
    org: Annotated[bool, typer.Option("--org", help="Create an organization")] = False,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Create a person (or, with --org, an organization) account; print its id."""
    from worker.services import accounts

    _use_stack(data_dir)
    with _db() as db:
        account = _domain(lambda: accounts.create_account(db, name, organization=org))
        account_id = str(account.id)
    typer.echo(json.dumps({"id": account_id}) if as_json else account_id)


@accounts_app.command("limits")
def accounts_limits(
    account: Annotated[str, typer.Option("--account", help="Account id (or its start)")],
    max_active_sandboxes: Annotated[
        int | None, typer.Option("--max-active-sandboxes", min=0, help="Omit: the default")
    ] = None,
    max_sessions: Annotated[
        int | None, typer.Option("--max-sessions", min=0, help="Omit: the default")
    ] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Set ACCOUNT's own quotas (an option left out: the operator's default applies)."""
    from worker.db.models import AccountRecord
    from worker.services import quotas

    _use_stack(data_dir)
    with _db() as db:
        account_id = _resolve_id(db, AccountRecord, account, "account")
        _domain(
            lambda: quotas.set_limits(
                db, account_id, active_sandboxes=max_active_sandboxes, sessions=max_sessions
            )
        )
    typer.echo(
        json.dumps({"maxActiveSandboxes": max_active_sandboxes, "maxSessions": max_sessions})
    )


@orgs_app.command("add-member")
def orgs_add_member(
    org: Annotated[str, typer.Option("--org", help="Organization account id (or its start)")],
    account: Annotated[str, typer.Option("--account", help="Member account id (or its start)")],
    data_dir: DataDirOption = None,
) -> None:
    """Make ACCOUNT a member of ORG."""
    from worker.db.models import AccountRecord
    from worker.services import accounts

    _use_stack(data_dir)
    with _db() as db:
        org_id = _resolve_id(db, AccountRecord, org, "organization")
        account_id = _resolve_id(db, AccountRecord, account, "account")
        _domain(lambda: accounts.add_member(db, org_id, account_id))
    typer.echo(f"{account_id} is a member of {org_id}")


@orgs_app.command("remove-member")
def orgs_remove_member(
    org: Annotated[str, typer.Option("--org", help="Organization account id (or its start)")],
    account: Annotated[str, typer.Option("--account", help="Member account id (or its start)")],
    data_dir: DataDirOption = None,
) -> None:
    """End ACCOUNT's membership of ORG: it loses the org's sessions at once."""
    from worker.db.models import AccountRecord
    from worker.services import accounts

    _use_stack(data_dir)
    with _db() as db:
        org_id = _resolve_id(db, AccountRecord, org, "organization")
        account_id = _resolve_id(db, AccountRecord, account, "account")
        _domain(lambda: accounts.remove_member(db, org_id, account_id))
    typer.echo(f"{account_id} is no longer a member of {org_id}")


@keys_app.command("create")
def keys_create(
    account: Annotated[str, typer.Option("--account", help="Account id (or its start)")],
    expires_in: Annotated[
        float | None, typer.Option("--expires-in", help="Seconds until expiry")
    ] = None,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """Create an API key. The key is shown once; only its hash is stored."""
    from worker.db.models import AccountRecord
    from worker.services import accounts

    _use_stack(data_dir)
    with _db() as db:
        account_id = _resolve_id(db, AccountRecord, account, "account")
        key = _domain(lambda: accounts.create_key(db, account_id, expires_in=expires_in))
    if as_json:
        typer.echo(json.dumps({"id": str(key.id), "key": key.key}))
    else:
        typer.echo(f"id:  {key.id}\nkey: {key.key}\n(store the key now: it is not shown again)")


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="Key id (or its start)")],
    data_dir: DataDirOption = None,
) -> None:
    """Revoke an API key at once."""
    from worker.db.models import ApiKeyRecord
    from worker.services import accounts

    _use_stack(data_dir)
    with _db() as db:
        kid = _resolve_id(db, ApiKeyRecord, key_id, "key")
        _domain(lambda: accounts.revoke_key(db, kid))
    typer.echo(f"revoked {kid}")


# --------------------------------------------------------------------------- sessions

SessionIdArgument = Annotated[str, typer.Argument(help="Session id (or its start)")]


@sessions_app.command("list")
def sessions_list(
    account: Annotated[
        str | None, typer.Option("--account", help="Only this owner (id or its start)")
    ] = None,
    state: Annotated[
        str | None,
        typer.Option("--state", help="Only this lifecycleState (active, hibernated, ...)"),
    ] = None,
    status: Annotated[
        str | None,
        typer.Option("--status", help="Only this status (running, completed, failed, archived)"),
    ] = None,
    limit: Annotated[
        int, typer.Option(help=f"At most this many (1-{PAGE_LIMIT_MAX}, as the API)")
    ] = 50,
    as_json: JsonOption = False,
    data_dir: DataDirOption = None,
) -> None:
    """List sessions, newest first. Filters are checked as the API checks them."""
    from sqlalchemy import select

    from worker.db.models import AccountRecord, SessionRecord
    from worker.domain import filters

    wanted_state = _domain(lambda: filters.parse_lifecycle_state(state))
    wanted_status = _domain(lambda: filters.parse_status(status))
    size = _domain(lambda: filters.parse_limit(limit))
    _use_stack(data_dir)
    stmt = select(SessionRecord).order_by(SessionRecord.created_at.desc()).limit(size)
    if wanted_state is not None:
        stmt = stmt.where(SessionRecord.lifecycle_state == wanted_state.value)
    if wanted_status is not None:
        stmt = stmt.where(SessionRecord.status == wanted_status.value)
    with _db() as db:
        if account:
            owner = _resolve_id(db, AccountRecord, account, "account")
            stmt = stmt.where(SessionRecord.user_id == owner)
        rows = [
            {
                "id": str(s.id),
                "title": s.title,
                "state": s.lifecycle_state,
                "version": s.lifecycle_version,
                "status": s.status,
                "error": s.lifecycle_error,
            }
            for s in db.scalars(stmt)
        ]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    _print_table(
        ["id", "title", "state", "v", "status", "error"],
        [
            [r["id"], r["title"], r["state"], str(r["version"]), r["status"], r["error"] or ""]
            for r in rows
        ],
    )


@sessions_app.command("show")
def sessions_show(session_id: SessionIdArgument, data_dir: DataDirOption = None) -> None:
    """Show one session and its run history as JSON (the API's read model)."""
    from worker.db.models import SessionRecord
    from worker.services import runs
    from worker.services.views import run_dict, session_dict

    _use_stack(data_dir)
    with _db() as db:
        sid = _resolve_id(db, SessionRecord, session_id, "session")
        record = db.get(SessionRecord, sid)
        if record is None:
            _fail("Session not found")
        history = runs.history(db, sid)
        out = {"session": session_dict(record), "runs": [run_dict(r) for r in history]}
    typer.echo(json.dumps(out, indent=2))


@sessions_app.command("kick")
def sessions_kick(
    session_id: SessionIdArgument,
    kind: Annotated[str, typer.Argument(help="start | hibernate | snapshot | diff | archive")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Hibernate even while a chat's stream claim is live (?force=true)"
        ),
    ] = False,
    data_dir: DataDirOption = None,
) -> None:
    """Ask for a lifecycle run under the API's kick rules (services.runs.request_run) and
    print the answer as JSON: {"run", "coalesced", "reason", "lifecycleState"}. "run" is
    null when the session is already there ("reason" says so); a kick that cannot act
    (archived; no live sandbox for hibernate, snapshot, diff; a live stream without
    --force) fails saying how to get there. "archive" sets the session's status to
    archived first, as the API's PATCH does."""
    from worker.celery_app import app as celery_app
    from worker.db.engine import get_sessionmaker
    from worker.db.models import SessionRecord
    from worker.domain.lifecycle import RunKind, SessionStatus
    from worker.providers.broker import CeleryPublisher
    from worker.services import outbox, runs, sessions

    try:
        run_kind = RunKind(kind)
    except ValueError:
        kinds = ", ".join(k.value for k in RunKind if k is not RunKind.PROVISION)
        _fail(f"unknown kind {kind!r}; one of: {kinds}", 2)
    _use_stack(data_dir)
    with _db() as db:
        sid = _resolve_id(db, SessionRecord, session_id, "session")
        record = db.get(SessionRecord, sid, with_for_update=True)
        if record is None:
            _fail("Session not found")
        jobs = []
        archiving = run_kind is RunKind.ARCHIVE and record.status != SessionStatus.ARCHIVED.value
        if archiving:
            # Archiving is the status change, as the API's PATCH {"status": "archived"}.
            patch = sessions.SessionPatch(status=SessionStatus.ARCHIVED)
            jobs += _domain(lambda: sessions.patch_session(db, get_settings(), record, patch))
        result = _domain(
            lambda: runs.request_run(
                db,
                record,
                run_kind,
                "cli",
                force=force,
                force_hint="--force",
                start_hint=f"lifecycle sessions kick {sid} start",
            )
        )
        joined = result.run is not None and not result.created and not archiving
        answer = {
            "run": str(result.run.id) if result.run is not None else None,
            "coalesced": joined,
            "reason": result.reason if joined or result.satisfied else None,
            "lifecycleState": record.lifecycle_state,
        }
        jobs += result.outbox
    if jobs:
        with _database_errors():
            outbox.publish_now(get_sessionmaker(), jobs, CeleryPublisher(celery_app))
    typer.echo(json.dumps(answer))


def main() -> None:  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app(prog_name="lifecycle")
    sys.exit(0)


# --------------------------------------------------------------------------- operations


@app.command()
def up(
    api_port: Annotated[
        int, typer.Option("--api-port", "--port", help="Port of the API on 127.0.0.1")
    ] = 8000,
    flower_port: Annotated[int, typer.Option(help="Port of Flower on 127.0.0.1")] = 5555,
    concurrency: Annotated[int, typer.Option(help="Worker processes")] = 2,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Data directory (default: LIFECYCLE_DATA_DIR or ./.lifecycle)"),
    ] = None,
    flower: Annotated[bool, typer.Option(help="Also run Flower")] = True,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="Do not echo the children's logs")
    ] = False,
) -> None:
    """Run the whole system on this machine: PostgreSQL and Redis (embedded unless
    LIFECYCLE_DATABASE_URL / LIFECYCLE_BROKER_URL are set), migrations, a development
    API key, and the API, a worker, beat and Flower, supervised until Ctrl-C."""
    from pathlib import Path

    from worker.ops.stack import Stack, StackError, StackOptions, banner

    root = Path(data_dir) if data_dir else get_settings().data_dir
    if data_dir:
        os.environ["LIFECYCLE_DATA_DIR"] = str(Path(data_dir).absolute())
    options = StackOptions(
        data_dir=root.absolute(),
        api_port=api_port,
        flower_port=flower_port,
        concurrency=concurrency,
        echo=not quiet,
        flower=flower,
    )
    stack = Stack(options)

    def ready(info: Any) -> None:
        typer.echo(banner(info, options.data_dir))

    try:
        code = stack.run(on_ready=ready)
    except StackError as exc:
        _fail(str(exc))
        return
    raise typer.Exit(code)


@app.command()
def demo(
    api_url: Annotated[
        str | None,
        typer.Option(help="API of the stack (default: the one `lifecycle up` saved)"),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            envvar="LIFECYCLE_API_KEY",
            help="API key (default: the development key in the data directory)",
        ),
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step")] = 90.0,
    data_dir: Annotated[
        str | None,
        typer.Option(
            help="Data directory of the stack (default: LIFECYCLE_DATA_DIR or ./.lifecycle)"
        ),
    ] = None,
) -> None:
    """Drive one session through its whole lifecycle, with a live timeline."""
    from pathlib import Path

    from worker.ops.demo import run_demo
    from worker.ops.stack import credentials_path, read_credentials

    root = Path(data_dir) if data_dir else get_settings().data_dir
    saved = read_credentials(root)
    if key is None:
        if saved is None:
            _fail(
                f"no API key: pass --key, or start the stack with `lifecycle up` "
                f"(it saves one in {credentials_path(root)})"
            )
            return
        key = saved.key
    url = api_url or (saved.api_url if saved else "http://127.0.0.1:8000")
    raise typer.Exit(run_demo(url.rstrip("/"), key, timeout=timeout))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def flower(
    ctx: typer.Context,
    port: Annotated[int, typer.Option(help="Port to listen on")] = 5555,
    address: Annotated[str, typer.Option(help="Interface to bind")] = "127.0.0.1",
    unauthenticated_api: Annotated[
        bool,
        typer.Option(
            "--unauthenticated-api",
            help="Open Flower's HTTP API without credentials (loopback addresses only)",
        ),
    ] = False,
) -> None:
    """Run Flower on the project's Celery app (task events on).

    Credentials come from LIFECYCLE_FLOWER_BASIC_AUTH (user:password). Without them
    Flower starts only on a loopback address and only with --unauthenticated-api.
    Extra arguments are passed to Flower unchanged."""
    from worker.celery_app import app as celery_app
    from worker.logging import configure_logging
    from worker.ops.monitor import FlowerConfigError, apply_env, plan_flower
    from worker.providers.broker import survive_broker_loss

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    survive_broker_loss()
    auth = settings.flower_basic_auth.get_secret_value() if settings.flower_basic_auth else None
    try:
        plan = plan_flower(
            port=port,
            address=address,
            basic_auth=auth,
            unauthenticated_api=unauthenticated_api,
            extra_args=list(ctx.args),
        )
    except FlowerConfigError as exc:
        _fail(str(exc))
        return
    apply_env(plan, os.environ)
    celery_app.start(plan.argv)
