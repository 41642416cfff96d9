"""``lifecycle``: the operator's command line."""

from __future__ import annotations

import json
import os
import sys
import uuid
from typing import Annotated, Any

import typer

from worker.config import get_settings

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


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        _fail(f"{what} must be a UUID, got {value!r}")
        raise  # unreachable


def _db() -> Any:
    from worker.db.engine import get_sessionmaker

    return get_sessionmaker().begin()


def _domain(fn: Any) -> Any:
    from worker.errors import DomainError

    try:
        return fn()
    except DomainError as exc:
        _fail(exc.message)


@app.command()
def migrate() -> None:
    """Apply database migrations (Alembic) up to the newest."""
    from worker.db.migrate import upgrade

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
        str, typer.Argument(help="hibernate_idle | relay_outbox | reap_runs | expire_snapshots")
    ],
) -> None:
    """Run one sweep once and print what it did."""
    from worker.services import retention, sweeps, webhooks
    from worker.tasks import service

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
        _fail(f"unknown sweep {name!r}; one of: {', '.join(fns)}")
        return
    typer.echo(json.dumps(fn(service())))


@accounts_app.command("create")
def accounts_create(
    name: Annotated[str, typer.Option("--name", help="Display name")],
    org: Annotated[bool, typer.Option("--org", help="Create an organization")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create a person (or, with --org, an organization) account."""
    from worker.services import accounts

    with _db() as db:
        account = _domain(lambda: accounts.create_account(db, name, organization=org))
        account_id = str(account.id)
    typer.echo(json.dumps({"id": account_id}) if as_json else account_id)


@accounts_app.command("limits")
def accounts_limits(
    account: Annotated[str, typer.Option("--account", help="Account id")],
    max_active_sandboxes: Annotated[
        int | None, typer.Option("--max-active-sandboxes", min=0, help="Omit: the default")
    ] = None,
    max_sessions: Annotated[
        int | None, typer.Option("--max-sessions", min=0, help="Omit: the default")
    ] = None,
) -> None:
    """Set ACCOUNT's own quotas (an option left out: the operator's default applies)."""
    from worker.services import quotas

    account_id = _uuid(account, "--account")
    with _db() as db:
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
    org: Annotated[str, typer.Option("--org", help="Organization account id")],
    account: Annotated[str, typer.Option("--account", help="Member account id")],
) -> None:
    """Make ACCOUNT a member of ORG."""
    from worker.services import accounts

    org_id, account_id = _uuid(org, "--org"), _uuid(account, "--account")
    with _db() as db:
        _domain(lambda: accounts.add_member(db, org_id, account_id))
    typer.echo(f"{account_id} is a member of {org_id}")


@orgs_app.command("remove-member")
def orgs_remove_member(
    org: Annotated[str, typer.Option("--org", help="Organization account id")],
    account: Annotated[str, typer.Option("--account", help="Member account id")],
) -> None:
    """End ACCOUNT's membership of ORG: it loses the org's sessions at once."""
    from worker.services import accounts

    org_id, account_id = _uuid(org, "--org"), _uuid(account, "--account")
    with _db() as db:
        _domain(lambda: accounts.remove_member(db, org_id, account_id))
    typer.echo(f"{account_id} is no longer a member of {org_id}")


@keys_app.command("create")
def keys_create(
    account: Annotated[str, typer.Option("--account", help="Account id")],
    expires_in: Annotated[
        float | None, typer.Option("--expires-in", help="Seconds until expiry")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON")] = False,
) -> None:
    """Create an API key. The key is shown once; only its hash is stored."""
    from worker.services import accounts

    account_id = _uuid(account, "--account")
    with _db() as db:
        key = _domain(lambda: accounts.create_key(db, account_id, expires_in=expires_in))
    if as_json:
        typer.echo(json.dumps({"id": str(key.id), "key": key.key}))
    else:
        typer.echo(f"id:  {key.id}\nkey: {key.key}\n(store the key now: it is not shown again)")


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="Key id")]) -> None:
    """Revoke an API key at once."""
    from worker.services import accounts

    kid = _uuid(key_id, "key id")
    with _db() as db:
        _domain(lambda: accounts.revoke_key(db, kid))
    typer.echo(f"revoked {kid}")


@sessions_app.command("list")
def sessions_list(
    account: Annotated[str | None, typer.Option("--account", help="Only this owner")] = None,
    state: Annotated[str | None, typer.Option("--state", help="Only this lifecycleState")] = None,
    limit: Annotated[int, typer.Option(help="At most this many")] = 50,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """List sessions, newest first."""
    from sqlalchemy import select

    from worker.db.models import SessionRecord

    stmt = select(SessionRecord).order_by(SessionRecord.created_at.desc()).limit(limit)
    if account:
        stmt = stmt.where(SessionRecord.user_id == _uuid(account, "--account"))
    if state:
        stmt = stmt.where(SessionRecord.lifecycle_state == state)
    with _db() as db:
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
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "title", "state", "v", "status", "error")
    for r in rows:
        table.add_row(
            r["id"], r["title"], r["state"], str(r["version"]), r["status"], r["error"] or ""
        )
    Console().print(table)


@sessions_app.command("show")
def sessions_show(session_id: Annotated[str, typer.Argument()]) -> None:
    """Show one session and its run history as JSON."""
    from worker.db.models import SessionRecord
    from worker.services import runs
    from worker.services.views import run_dict, session_dict

    sid = _uuid(session_id, "session id")
    with _db() as db:
        record = db.get(SessionRecord, sid)
        if record is None:
            _fail("Session not found")
            return
        history = runs.history(db, sid)
        out = {"session": session_dict(record), "runs": [run_dict(r) for r in history]}
    typer.echo(json.dumps(out, indent=2))


@sessions_app.command("kick")
def sessions_kick(
    session_id: Annotated[str, typer.Argument()],
    kind: Annotated[str, typer.Argument(help="start | hibernate | snapshot | diff | archive")],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Hibernate even while a chat's stream claim is live (?force=true)"
        ),
    ] = False,
) -> None:
    """Ask for a lifecycle run, exactly as the API's kick endpoints do (the same rules:
    an archived session refuses kicks, a live stream refuses a hibernate without --force)."""
    from worker.celery_app import app as celery_app
    from worker.db.engine import get_sessionmaker
    from worker.db.models import SessionRecord
    from worker.domain.lifecycle import RunKind
    from worker.providers.broker import CeleryPublisher
    from worker.services import outbox, runs

    sid = _uuid(session_id, "session id")
    try:
        run_kind = RunKind(kind)
    except ValueError:
        _fail(f"unknown kind {kind!r}")
        return
    with _db() as db:
        record = db.get(SessionRecord, sid, with_for_update=True)
        if record is None:
            _fail("Session not found")
            return
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
        answer = {
            "run": str(result.run.id) if result.run is not None else None,
            "coalesced": result.run is not None and not result.created,
            "reason": result.reason,
            "lifecycleState": record.lifecycle_state,
        }
        jobs = result.outbox
    if jobs:
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
