"""``lifecycle``: the operator's command line."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated, Any

import typer

from worker.config import get_settings
from worker.ops.cli_admin import (
    DataDirOption,
    _database_errors,
    _fail,
    _use_stack,
    accounts_app,
    keys_app,
    orgs_app,
    sessions_app,
)

app = typer.Typer(
    help="Session Lifecycle Worker: run and operate the control plane.", no_args_is_help=True
)


app.add_typer(accounts_app, name="accounts")
app.add_typer(orgs_app, name="orgs")
app.add_typer(keys_app, name="keys")
app.add_typer(sessions_app, name="sessions")


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
    quiet: Annotated[
        bool,
        typer.Option(help="No Celery banner, no superuser warning (lifecycle up explains both)"),
    ] = False,
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
    if quiet:
        import warnings

        from celery.exceptions import SecurityWarning

        warnings.filterwarnings("ignore", category=SecurityWarning)
    argv = [
        *(["--quiet"] if quiet else []),
        "worker",
        f"--concurrency={concurrency}",
        f"--pool={pool}",
        f"--queues={','.join(names)}",
        f"--loglevel={loglevel}",
        "--events",
        *ctx.args,
    ]
    celery_app.start(argv)


@app.command()
def beat(
    loglevel: Annotated[str, typer.Option("--loglevel", "-l")] = "INFO",
    quiet: Annotated[bool, typer.Option(help="No Celery banner")] = False,
) -> None:
    """Run Celery beat (the scheduled sweeps)."""
    from worker.celery_app import app as celery_app
    from worker.logging import configure_logging
    from worker.providers.broker import survive_broker_loss

    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    survive_broker_loss()
    schedule = settings.data_dir / "celerybeat-schedule"
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    celery_app.start(
        [
            *(["--quiet"] if quiet else []),
            "beat",
            f"--loglevel={loglevel}",
            f"--schedule={schedule}",
        ]
    )


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
