"""The admin commands of ``lifecycle`` (accounts, orgs, keys, sessions) and what every
command shares: finding the stack's database, one-line failures, id prefixes, tables."""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from worker.config import get_settings
from worker.domain.filters import PAGE_LIMIT_MAX

T = TypeVar("T")

accounts_app = typer.Typer(help="Manage accounts (people and organizations).", no_args_is_help=True)
orgs_app = typer.Typer(help="Manage organization membership.", no_args_is_help=True)
keys_app = typer.Typer(help="Manage API keys.", no_args_is_help=True)
sessions_app = typer.Typer(help="Inspect and kick sessions.", no_args_is_help=True)


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


OrgOption = Annotated[str, typer.Option("--org", help="Organization account id (or its start)")]
MemberOption = Annotated[str, typer.Option("--account", help="Member account id (or its start)")]


def _change_membership(org: str, account: str, data_dir: str | None, add: bool) -> None:
    from worker.db.models import AccountRecord
    from worker.services import accounts

    _use_stack(data_dir)
    with _db() as db:
        org_id = _resolve_id(db, AccountRecord, org, "organization")
        account_id = _resolve_id(db, AccountRecord, account, "account")
        change = accounts.add_member if add else accounts.remove_member
        _domain(lambda: change(db, org_id, account_id))
    typer.echo(f"{account_id} is {'' if add else 'no longer '}a member of {org_id}")


@orgs_app.command("add-member")
def orgs_add_member(org: OrgOption, account: MemberOption, data_dir: DataDirOption = None) -> None:
    """Make ACCOUNT a member of ORG."""
    _change_membership(org, account, data_dir, add=True)


@orgs_app.command("remove-member")
def orgs_remove_member(
    org: OrgOption, account: MemberOption, data_dir: DataDirOption = None
) -> None:
    """End ACCOUNT's membership of ORG: it loses the org's sessions at once."""
    _change_membership(org, account, data_dir, add=False)


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
