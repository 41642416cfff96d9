"""Files of a session's sandbox over the API: list, read, write, delete.

A sandbox's tree lives on one worker host; the API process may run anywhere. So a file
operation travels like a command: the API records it (``file_ops``, the bytes to write
included) with its job in the outbox, in one transaction, routed to the sandbox's host
queue (:func:`worker.routing.queue_for`); the worker there claims it (``queued`` →
``running``, one statement), does it on the tree with
:mod:`worker.providers.sandbox_files` (no link ever followed) and writes the answer into
the same row. The API waits for that answer, polling the row, for at most
``file_op_timeout_seconds``; then it deletes the row. On a timeout the row is deleted
too: an operation no worker had claimed yet can never run (504, nothing changed), one
already running finishes without anyone reading its answer (504, saying it may have
happened).

Why a database row and not Celery's result backend: it works the same with Redis and
RabbitMQ as the broker, needs no result backend, carries the file's bytes in both
directions within the size limit, and is cleaned by the same sweep as everything else
(rows left by an API process that died while waiting go after an hour,
:func:`purge_stale`).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, text
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db.models import FileOpRecord, OutboxRecord, SessionRecord
from worker.domain.lifecycle import LifecycleState, sandbox_name
from worker.errors import (
    Conflict,
    DomainError,
    GatewayTimeout,
    InvalidInput,
    NotFound,
    PayloadTooLarge,
)
from worker.logging import get_logger
from worker.providers import sandbox_files
from worker.providers.base import ProviderError
from worker.providers.registry import Providers
from worker.providers.sandbox_files import Owner, TreeError, split_path
from worker.routing import queue_for
from worker.services import outbox, sessions
from worker.task_names import TASK_FILES

log = get_logger(__name__)

LIST, READ, WRITE, DELETE = "list", "read", "write", "delete"
# The sandbox kinds whose trees are directories on a worker host.
_TREE_KINDS = ("bwrap", "local")
# Rows no API process came back for (it died waiting) are purged after this long.
STALE_AFTER = timedelta(hours=1)

_STATUS_OF_KIND: dict[str, type[DomainError]] = {
    "invalid": InvalidInput,
    "link": InvalidInput,
    "not_dir": InvalidInput,
    "is_dir": InvalidInput,
    "not_regular": InvalidInput,
    "not_found": NotFound,
    "too_large": PayloadTooLarge,
    "not_empty": Conflict,
    "too_deep": Conflict,
    "gone": Conflict,
    "io": Conflict,
}


def check_path(op: str, path: str | None) -> tuple[str, ...]:
    """The path's components, or 400 naming ``path`` (the root is only listable)."""
    try:
        parts = split_path(path)
    except TreeError as exc:
        raise InvalidInput(str(exc), missing_fields=["path"]) from None
    if not parts and op != LIST:
        raise InvalidInput(
            "path must name a file or directory inside the working tree", missing_fields=["path"]
        )
    return parts


def require_tree(record: SessionRecord) -> None:
    """409 unless the session's sandbox is active and is a tree on a worker host."""
    state = record.lifecycle_state
    if state != LifecycleState.ACTIVE.value:
        raise Conflict(
            f"the session's sandbox is {state}, not active: resume it with "
            f"POST /api/sessions/{record.id}/sandbox and try again",
            lifecycleState=state,
            resume=f"/api/sessions/{record.id}/sandbox",
        )
    kind = (record.sandbox_state or {}).get("type")
    if kind not in _TREE_KINDS:
        raise Conflict(f"this session's sandbox ({kind}) has no files to reach", sandboxType=kind)


def request(
    db: Session,
    settings: Settings,
    record: SessionRecord,
    op: str,
    path: str | None,
    *,
    content: bytes | None = None,
    recursive: bool = False,
) -> tuple[FileOpRecord, OutboxRecord]:
    """Record the operation and its job (the caller commits, publishes, then
    :func:`wait`\\ s). 400 for a bad path, 409 unless the sandbox is active."""
    parts = check_path(op, path)
    require_tree(record)
    row = FileOpRecord(
        id=uuid.uuid4(),
        session_id=record.id,
        op=op,
        path="/".join(parts),
        recursive=recursive,
        content=content,
        status="queued",
        created_at=datetime.now(UTC),
    )
    db.add(row)
    sessions.record_activity(db, settings, record)
    job = outbox.add(
        db, TASK_FILES, {"op_id": str(row.id)}, queue=queue_for("files", record.sandbox_state)
    )
    return row, job


@dataclass(frozen=True)
class Answer:
    result: dict[str, Any]
    content: bytes | None


_TAKE = text(
    """
    DELETE FROM file_ops WHERE id = :id AND status = 'done'
    RETURNING result, content, error, error_kind
    """
)
_GIVE_UP = text("DELETE FROM file_ops WHERE id = :id RETURNING status")


def wait(factory: sessionmaker[Session], op_id: uuid.UUID, timeout: float) -> Answer:
    """The worker's answer to operation ``op_id`` (its row then deleted), or the
    operation's refusal as the matching ``DomainError``; 504 after ``timeout``."""
    deadline = time.monotonic() + timeout
    pause = 0.002
    while True:
        with factory.begin() as db:
            row = db.execute(_TAKE, {"id": op_id}).first()
            if row is None and time.monotonic() >= deadline:
                status = db.scalar(_GIVE_UP, {"id": op_id})
                break
        if row is not None:
            result, content, error, kind = row
            if kind is not None:
                extra = {k: v for k, v in (result or {}).items() if v is not None}
                raise _STATUS_OF_KIND.get(kind, Conflict)(error, reason=kind, **extra)
            return Answer(result or {}, content)
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.05)
    if status == "running":
        message = (
            f"the sandbox's host did not answer within {timeout:g} s; the operation was "
            "running there and may still complete"
        )
    else:
        message = (
            f"the sandbox's host did not answer within {timeout:g} s (is its worker up?); "
            "nothing was changed"
        )
    raise GatewayTimeout(message, started=status == "running")


def purge_stale(db: Session, now: datetime | None = None) -> int:
    """Delete operations nobody waits for any more (their API process died)."""
    cutoff = (now or datetime.now(UTC)) - STALE_AFTER
    result = db.execute(
        delete(FileOpRecord)
        .where(FileOpRecord.created_at < cutoff)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------- the worker side

_CLAIM = text(
    """
    UPDATE file_ops SET status = 'running'
    WHERE id = :id AND status = 'queued'
    RETURNING session_id, op, path, recursive, content
    """
)
_ANSWER = text(
    """
    UPDATE file_ops SET status = 'done', result = CAST(:result AS jsonb), content = :content,
        error = :error, error_kind = :kind, finished_at = now()
    WHERE id = :id
    """
)


def execute(
    factory: sessionmaker[Session], settings: Settings, providers: Providers, op_id: uuid.UUID
) -> str:
    """Do one file operation (the task's body) and record the answer. Returns ``done``,
    the refusal's kind, or ``skipped`` (a duplicate, or the API stopped waiting)."""
    import json

    with factory.begin() as db:
        row = db.execute(_CLAIM, {"id": op_id}).first()
    if row is None:
        return "skipped"
    session_id, op, path, recursive, content = row
    result: dict[str, Any] | None = None
    data: bytes | None = None
    error: str | None = None
    kind: str | None = None
    try:
        result, data = _do(
            settings, providers, sandbox_name(session_id), op, path, recursive, content
        )
    except TreeError as exc:
        error, kind, result = str(exc), exc.kind, exc.extra
    except (OSError, ProviderError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        error, kind = f"could not {op} {path or '.'}: {reason}", "io"
    with factory.begin() as db:
        db.execute(
            _ANSWER,
            {
                "id": op_id,
                "result": json.dumps(result) if result is not None else None,
                "content": data,
                "error": error,
                "kind": kind,
            },
        )
    log.info("sandbox.files", op_id=str(op_id), op=op, refused=kind)
    return kind or "done"


def _do(
    settings: Settings,
    providers: Providers,
    name: str,
    op: str,
    path: str,
    recursive: bool,
    content: bytes | None,
) -> tuple[dict[str, Any], bytes | None]:
    sandbox = providers.sandbox
    if not sandbox.exists(name):
        raise TreeError(
            "gone", "the sandbox is not on this host any more (it is stopping or has stopped)"
        )
    root = sandbox.workdir(name)
    parts = split_path(path)
    if op == LIST:
        return sandbox_files.list_dir(root, parts, max_entries=settings.file_list_max_entries), None
    if op == READ:
        data = sandbox_files.read_file(root, parts, max_bytes=settings.file_max_bytes)
        return {"path": path, "size": len(data)}, data
    if op == WRITE:
        result = sandbox_files.write_file(
            root,
            parts,
            content or b"",
            owner=_owner(sandbox, name),
            disk_limit=settings.sandbox_disk_bytes,
        )
        return result, None
    if op == DELETE:
        return sandbox_files.delete(root, parts, recursive=recursive), None
    raise TreeError("invalid", f"unknown file operation {op!r}")


def _owner(sandbox: Any, name: str) -> Owner | None:
    """The sandbox's own host uid (bwrap provider, worker as root), if it has one."""
    user_for = getattr(sandbox, "user_for", None)
    user = user_for(name) if callable(user_for) else None
    return None if user is None else Owner(user.uid, user.gid)
