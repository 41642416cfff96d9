"""Sessions: create (with first chat and provision job), read, update, list."""

from __future__ import annotations

import json
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db import statements
from worker.db.connection import driver
from worker.db.models import ChatRecord, LifecycleRunRecord, OutboxRecord, SessionRecord
from worker.domain.cursors import decode_cursor, encode_cursor
from worker.domain.lifecycle import (
    LifecycleState,
    RunKind,
    RunState,
    SessionStatus,
    session_timeouts,
)
from worker.errors import Conflict, Forbidden, InvalidInput, NotFound
from worker.services import accounts, outbox, runs

_ADJECTIVES = [
    "Amber",
    "Brisk",
    "Calm",
    "Clever",
    "Cobalt",
    "Crimson",
    "Daring",
    "Eager",
    "Gentle",
    "Golden",
    "Hidden",
    "Humble",
    "Ivory",
    "Jolly",
    "Keen",
    "Lively",
    "Lucky",
    "Mellow",
    "Misty",
    "Nimble",
    "Noble",
    "Olive",
    "Patient",
    "Plucky",
    "Quiet",
    "Rapid",
    "Rustic",
    "Scarlet",
    "Silent",
    "Silver",
    "Steady",
    "Sunny",
    "Swift",
    "Tidy",
    "Topaz",
    "Vivid",
    "Wandering",
    "Witty",
    "Zesty",
]
_NOUNS = [
    "Anchor",
    "Badger",
    "Beacon",
    "Birch",
    "Canyon",
    "Cedar",
    "Comet",
    "Coral",
    "Delta",
    "Falcon",
    "Fern",
    "Fjord",
    "Harbor",
    "Heron",
    "Island",
    "Juniper",
    "Lagoon",
    "Lantern",
    "Maple",
    "Meadow",
    "Meteor",
    "Orchid",
    "Otter",
    "Pebble",
    "Pine",
    "Prairie",
    "Quartz",
    "Raven",
    "Reef",
    "River",
    "Sparrow",
    "Spruce",
    "Summit",
    "Thistle",
    "Tundra",
    "Valley",
    "Willow",
    "Wren",
]


def generate_title() -> str:
    """A human-readable title; uniqueness per owner is enforced by a partial unique index."""
    return (
        f"{secrets.choice(_ADJECTIVES)} {secrets.choice(_NOUNS)} {secrets.randbelow(9000) + 1000}"
    )


@dataclass
class CreateSession:
    title: str | None = None
    organization_id: uuid.UUID | None = None
    artist_id: uuid.UUID | None = None
    idle_timeout_seconds: int | None = None
    max_lifetime_seconds: int | None = None


@dataclass
class Created:
    session: SessionRecord
    chat: ChatRecord
    outbox: list[outbox.OutboxRow] = field(default_factory=list)


def workspace_repo(
    settings: Settings, account_id: uuid.UUID, org_id: uuid.UUID | None
) -> tuple[str, str]:
    """``<owner>/<accountId>`` for a personal session, ``<owner>/<organizationId>`` for an org one."""
    return settings.workspace_owner, str(org_id or account_id)


def create_session(
    db: Session,
    settings: Settings,
    account_id: uuid.UUID,
    data: CreateSession,
    *,
    clone_url: str,
    sandbox_type: str,
) -> Created:
    """Insert the session, its first chat, a provision run and its outbox job, in the
    caller's transaction. ``clone_url`` is where the workspace repo will be cloned from."""
    if data.organization_id is not None and not accounts.can_access_org(
        db, account_id, data.organization_id
    ):
        raise Forbidden("Access denied to specified organization_id")
    title = (data.title or "").strip()
    if len(title) > settings.max_title_length:
        raise InvalidInput(
            f"title must be at most {settings.max_title_length} characters",
            missing_fields=["title"],
        )
    validate_timeouts(settings, data.idle_timeout_seconds, data.max_lifetime_seconds)
    now = datetime.now(UTC)
    owner, name = workspace_repo(settings, account_id, data.organization_id)
    session_id = uuid.uuid4()
    values: dict[str, Any] = {
        "id": session_id,
        "user_id": account_id,
        "organization_id": data.organization_id,
        "artist_id": data.artist_id,
        "title": title,
        "title_generated": not title,
        "status": SessionStatus.RUNNING.value,
        "is_new_branch": True,
        "global_skill_refs": [],
        "lifecycle_state": LifecycleState.PROVISIONING.value,
        "lifecycle_version": 0,
        "repo_owner": owner,
        "repo_name": name,
        "branch": f"session/{session_id}",
        "clone_url": clone_url,
        "sandbox_state": {"type": sandbox_type},
        "lines_added": 0,
        "lines_removed": 0,
        "idle_timeout_seconds": data.idle_timeout_seconds,
        "max_lifetime_seconds": data.max_lifetime_seconds,
        "created_at": now,
        "updated_at": now,
    }
    chat_id, run_id = uuid.uuid4(), uuid.uuid4()
    job = statements.job_for(RunKind.PROVISION, session_id, run_id, 0, values["sandbox_state"])
    params = {
        **values,
        "sandbox_state": json.dumps(values["sandbox_state"]),
        "chat_id": chat_id,
        "model_id": settings.default_model_id,
        "run_id": run_id,
        **job.params(),
    }
    # One statement writes the session, its first chat, the queued provision run and the
    # run's outbox job. A generated title that collides with one of the owner's inserts
    # nothing (ON CONFLICT on the partial unique index) and is simply drawn again.
    with driver(db) as pg:
        for _ in range(50):
            if values["title_generated"]:
                params["title"] = values["title"] = generate_title()
            row = pg.execute(statements.CREATE_SESSION, params).fetchone()
            if row is not None:
                outbox_id = row[0]
                break
        else:  # pragma: no cover - 50 collisions in a space of millions
            raise RuntimeError("could not generate a unique session title")
    record = SessionRecord(**values)  # detached copy for the caller; the row is inserted
    chat = ChatRecord(
        id=chat_id,
        session_id=session_id,
        title="New chat",
        model_id=settings.default_model_id,
        active_stream_id=None,
        created_at=now,
        updated_at=now,
    )
    return Created(record, chat, [job.row(int(outbox_id))])


def get_owned(
    db: Session, account_id: uuid.UUID, session_id: str, *, lock: bool = False
) -> SessionRecord:
    """The session ``session_id`` if ``account_id`` may use it (:func:`can_access`):
    404 unknown or malformed, 403 otherwise."""
    try:
        sid = uuid.UUID(session_id)
    except ValueError:
        raise NotFound("Session not found") from None
    stmt = select(SessionRecord).where(SessionRecord.id == sid)
    if lock:
        stmt = stmt.with_for_update()
    record = db.scalars(stmt).first()
    if record is None:
        raise NotFound("Session not found")
    if not can_access(db, account_id, record):
        raise Forbidden("Forbidden")
    return record


def can_access(db: Session, account_id: uuid.UUID, record: SessionRecord) -> bool:
    """Who may use a session (read, change, kick, its chats), SPEC §3: a personal session
    is its creator's; an org session belongs to the org, so the org's own key and every
    current member may use it, and nobody else. Membership is read on every call: a
    member removed from the org loses the org's sessions at once, the ones it created
    included."""
    if record.organization_id is None:
        return record.user_id == account_id
    return accounts.can_access_org(db, account_id, record.organization_id)


def first_chat(db: Session, session_id: uuid.UUID) -> ChatRecord | None:
    return db.scalars(
        select(ChatRecord)
        .where(ChatRecord.session_id == session_id)
        .order_by(ChatRecord.created_at, ChatRecord.id)
        .limit(1)
    ).first()


@dataclass
class SessionPatch:
    title: str | None = None
    status: SessionStatus | None = None
    lines_added: int | None = None
    lines_removed: int | None = None
    idle_timeout_seconds: int | None = None
    max_lifetime_seconds: int | None = None


def patch_session(
    db: Session, settings: Settings, record: SessionRecord, patch: SessionPatch
) -> list[OutboxRecord]:
    """Apply ``patch`` to the locked ``record``. Archiving kicks the archive run;
    ``archived`` -> ``running`` un-archives (the sandbox returns on the next start)."""
    jobs: list[OutboxRecord] = []
    changed = False
    if patch.title is not None:
        title = patch.title.strip()
        if not title:
            raise InvalidInput("title must not be blank", missing_fields=["title"])
        if len(title) > settings.max_title_length:
            raise InvalidInput(f"title must be at most {settings.max_title_length} characters")
        record.title, record.title_generated, changed = title, False, True
    for attr in ("lines_added", "lines_removed"):
        value = getattr(patch, attr)
        if value is not None:
            setattr(record, attr, value)
            changed = True
    if patch.status is not None and patch.status.value != record.status:
        previous = record.status
        record.status = patch.status.value
        changed = True
        if patch.status is SessionStatus.ARCHIVED:
            record.archived_at = datetime.now(UTC)
            jobs += runs.kick(db, record, RunKind.ARCHIVE, "api").outbox
        elif previous == SessionStatus.ARCHIVED.value:
            record.archived_at = None
            jobs += _withdraw_archive(db, record)
            if record.lifecycle_state == LifecycleState.ARCHIVED.value:
                # Un-archive is a lifecycle transition of its own: archived -> hibernated.
                record.lifecycle_state = LifecycleState.HIBERNATED.value
                record.lifecycle_version += 1
    if patch.idle_timeout_seconds is not None or patch.max_lifetime_seconds is not None:
        _apply_timeouts(settings, record, patch.idle_timeout_seconds, patch.max_lifetime_seconds)
        changed = True
    if changed:
        record.updated_at = datetime.now(UTC)
    db.flush()
    return jobs


def validate_timeouts(settings: Settings, idle: int | None, lifetime: int | None) -> None:
    """Per-session timeouts are whole seconds within the operator's maxima."""
    for value, field_name, maximum in (
        (idle, "idleTimeoutSeconds", settings.max_idle_timeout_seconds),
        (lifetime, "maxLifetimeSeconds", settings.max_lifetime_limit_seconds),
    ):
        if value is not None and not 1 <= value <= maximum:
            raise InvalidInput(
                f"{field_name} must be an integer from 1 to {maximum}",
                missing_fields=[field_name],
            )


def _sandbox_started_at(record: SessionRecord) -> datetime | None:
    started = (record.sandbox_state or {}).get("startedAt")
    try:
        return datetime.fromisoformat(started) if isinstance(started, str) else None
    except ValueError:
        return None


def _apply_timeouts(
    settings: Settings, record: SessionRecord, idle: int | None, lifetime: int | None
) -> None:
    """Set the overrides; on a live sandbox move its deadlines to match at once."""
    validate_timeouts(settings, idle, lifetime)
    if idle is not None:
        record.idle_timeout_seconds = idle
    if lifetime is not None:
        record.max_lifetime_seconds = lifetime
    if record.lifecycle_state != LifecycleState.ACTIVE.value:
        return  # the next start computes them
    idle_s, lifetime_s = session_timeouts(
        settings, record.idle_timeout_seconds, record.max_lifetime_seconds
    )
    if idle is not None:
        base = record.last_activity_at or datetime.now(UTC)
        record.hibernate_after = base + timedelta(seconds=idle_s)
    started = _sandbox_started_at(record)
    if lifetime is not None and started is not None:
        record.sandbox_expires_at = started + timedelta(seconds=lifetime_s)


def extend_session(db: Session, settings: Settings, record: SessionRecord, seconds: int) -> int:
    """Move an active sandbox's ``sandboxExpiresAt`` out by ``seconds``, never past its
    start + the operator's ``max_lifetime_limit_seconds``. Returns the seconds added
    (409 when the session is not active or already at the limit)."""
    if record.lifecycle_state != LifecycleState.ACTIVE.value:
        raise Conflict(
            f"Session is {record.lifecycle_state}; start it before extending its lifetime",
            lifecycleState=record.lifecycle_state,
        )
    started = _sandbox_started_at(record)
    current = record.sandbox_expires_at
    if started is None or current is None:
        raise Conflict("Session has no sandbox lifetime to extend")
    limit = started + timedelta(seconds=settings.max_lifetime_limit_seconds)
    new = min(current + timedelta(seconds=seconds), limit)
    added = int((new - current).total_seconds())
    if added <= 0:
        raise Conflict(
            f"Session is already at the maximum lifetime ({settings.max_lifetime_limit_seconds} s)",
            sandboxExpiresAt=current.isoformat(),
        )
    record.sandbox_expires_at = new
    record.updated_at = datetime.now(UTC)
    sandbox_state = dict(record.sandbox_state or {})
    sandbox_state["expiresAt"] = new.isoformat()
    record.sandbox_state = sandbox_state
    db.flush()
    return added


def _withdraw_archive(db: Session, record: SessionRecord) -> list[OutboxRecord]:
    """Un-archiving withdraws an archive run that has not started (pending, or queued
    with its job out: the worker skips a run that is no longer queued). A run a worker
    is claiming right now (row locked) is skipped here, not waited for: the worker locks
    the run before the session, and this transaction already holds the session.
    When the withdrawn run was next in line, the run waiting behind it is dispatched."""
    now = datetime.now(UTC)
    head_withdrawn = False
    waiting = db.scalars(
        select(LifecycleRunRecord)
        .where(
            LifecycleRunRecord.session_id == record.id,
            LifecycleRunRecord.kind == RunKind.ARCHIVE.value,
            LifecycleRunRecord.state.in_([RunState.PENDING.value, RunState.QUEUED.value]),
        )
        .with_for_update(skip_locked=True)
    )
    for run in waiting:
        head_withdrawn |= run.state == RunState.QUEUED.value
        run.state = RunState.SKIPPED.value
        run.error = "withdrawn: the session was un-archived before the archive ran"
        run.finished_at = run.updated_at = now
    db.flush()
    if head_withdrawn and record.lifecycle_run_id is None:
        return runs.dispatch_next(db, record)
    return []


def list_sessions(
    db: Session,
    account_id: uuid.UUID,
    *,
    status: SessionStatus | None,
    limit: int,
    cursor: str | None,
    organization_id: uuid.UUID | None = None,
) -> tuple[list[SessionRecord], str | None]:
    """The caller's sessions, newest first, keyset-paginated on (createdAt, id); with
    ``organization_id``, every session of that org instead (403 when the caller is
    neither the org nor a member)."""
    if organization_id is None:
        stmt = select(SessionRecord).where(SessionRecord.user_id == account_id)
    elif accounts.can_access_org(db, account_id, organization_id):
        stmt = select(SessionRecord).where(SessionRecord.organization_id == organization_id)
    else:
        raise Forbidden("Access denied to specified organization_id")
    if status is not None:
        stmt = stmt.where(SessionRecord.status == status.value)
    if cursor:
        created, sid = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                SessionRecord.created_at < created,
                and_(SessionRecord.created_at == created, SessionRecord.id < sid),
            )
        )
    rows = list(
        db.scalars(
            stmt.order_by(SessionRecord.created_at.desc(), SessionRecord.id.desc()).limit(limit + 1)
        )
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, next_cursor


def record_activity(db: Session, settings: Settings, record: SessionRecord) -> bool:
    """The client's heartbeat: while the sandbox is active, push ``hibernateAfter`` out.
    Returns whether anything changed (an inactive sandbox is left alone)."""
    now = datetime.now(UTC)
    result = db.execute(
        update(SessionRecord)
        .where(
            SessionRecord.id == record.id,
            SessionRecord.lifecycle_state == LifecycleState.ACTIVE.value,
        )
        .values(
            last_activity_at=now,
            hibernate_after=now
            + timedelta(
                seconds=session_timeouts(
                    settings, record.idle_timeout_seconds, record.max_lifetime_seconds
                )[0]
            ),
            updated_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    if result.rowcount:  # type: ignore[attr-defined]
        db.refresh(record)
        return True
    return False
