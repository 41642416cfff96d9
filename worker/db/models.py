"""Typed SQLAlchemy models. The schema itself is owned by Alembic migrations."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

NOW = text("now()")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        uuid.UUID: UUID(as_uuid=True),
        dict[str, Any]: JSONB,
        list[Any]: JSONB,
    }


class AccountRecord(Base):
    """A person or an organization; both can own sessions and API keys."""

    __tablename__ = "accounts"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(20))  # person | organization
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    # Quotas of this account (NULL: the operator's default), see services/quotas.py.
    max_active_sandboxes: Mapped[int | None] = mapped_column(Integer)
    max_sessions: Mapped[int | None] = mapped_column(Integer)


class OrgMembershipRecord(Base):
    __tablename__ = "org_memberships"

    org_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)


class ApiKeyRecord(Base):
    """An API key; only a SHA-256 of the secret is stored."""

    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), index=True
    )
    key_hash: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class SessionRecord(Base):
    """One agent session: its workspace branch, sandbox, snapshot, diff and lifecycle."""

    __tablename__ = "sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL")
    )
    artist_id: Mapped[uuid.UUID | None]
    title: Mapped[str] = mapped_column(Text)
    title_generated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    status: Mapped[str] = mapped_column(String(20), server_default="running")
    is_new_branch: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    global_skill_refs: Mapped[list[Any]] = mapped_column(server_default=text("'[]'::jsonb"))

    lifecycle_state: Mapped[str] = mapped_column(String(20), server_default="provisioning")
    lifecycle_version: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    lifecycle_run_id: Mapped[uuid.UUID | None]
    lease_expires_at: Mapped[datetime | None]
    lifecycle_error: Mapped[str | None] = mapped_column(Text)

    repo_owner: Mapped[str | None] = mapped_column(Text)
    repo_name: Mapped[str | None] = mapped_column(Text)
    branch: Mapped[str | None] = mapped_column(Text)
    clone_url: Mapped[str | None] = mapped_column(Text)
    provisioned_at: Mapped[datetime | None]

    sandbox_state: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    last_activity_at: Mapped[datetime | None]
    sandbox_expires_at: Mapped[datetime | None]
    hibernate_after: Mapped[datetime | None]

    lines_added: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    lines_removed: Mapped[int] = mapped_column(Integer, server_default=text("0"))

    snapshot_url: Mapped[str | None] = mapped_column(Text)
    snapshot_created_at: Mapped[datetime | None]
    snapshot_size_bytes: Mapped[int | None] = mapped_column(BigInteger)

    cached_diff: Mapped[dict[str, Any] | None]
    cached_diff_updated_at: Mapped[datetime | None]

    archived_at: Mapped[datetime | None]
    # Per-session overrides of the operator's defaults (NULL: the default).
    idle_timeout_seconds: Mapped[int | None] = mapped_column(Integer)
    max_lifetime_seconds: Mapped[int | None] = mapped_column(Integer)
    # Retention overrides (NULL: the operator's), and when auto-delete removed the
    # session's snapshots and sandbox data (services/retention.py).
    auto_archive_after_seconds: Mapped[int | None] = mapped_column(Integer)
    auto_delete_after_seconds: Mapped[int | None] = mapped_column(Integer)
    deleted_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (
        # Owner listing, newest first, keyset on (created_at, id).
        Index("ix_sessions_owner_created", "user_id", text("created_at DESC"), text("id DESC")),
        # An org's listing (``?organizationId=``), newest first, keyset on (created_at, id).
        Index(
            "ix_sessions_org_created",
            "organization_id",
            text("created_at DESC"),
            text("id DESC"),
            postgresql_where=text("organization_id IS NOT NULL"),
        ),
        # Generated titles are unique per owner (user titles may repeat).
        Index(
            "uq_sessions_owner_generated_title",
            "user_id",
            "title",
            unique=True,
            postgresql_where=text("title_generated"),
        ),
        # Idle sweep: only active sessions are candidates, ordered by their due time.
        Index(
            "ix_sessions_hibernate_due",
            text("LEAST(hibernate_after, sandbox_expires_at)"),
            postgresql_where=text("lifecycle_state = 'active'"),
        ),
        # Reaper: live leases by expiry.
        Index(
            "ix_sessions_lease_expiry",
            "lease_expires_at",
            postgresql_where=text("lifecycle_run_id IS NOT NULL"),
        ),
        # Retention and quotas (migration 0009).
        Index(
            "ix_sessions_retention_hibernated",
            "updated_at",
            postgresql_where=text("lifecycle_state = 'hibernated' AND status <> 'archived'"),
        ),
        Index(
            "ix_sessions_retention_archived",
            "archived_at",
            postgresql_where=text("lifecycle_state = 'archived'"),
        ),
        Index(
            "ix_sessions_org",
            "organization_id",
            postgresql_where=text("organization_id IS NOT NULL"),
        ),
    )


class ChatRecord(Base):
    __tablename__ = "chats"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    session_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("sessions.id", ondelete="CASCADE"), index=True
    )
    title: Mapped[str] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(Text)
    active_stream_id: Mapped[str | None] = mapped_column(Text)
    # A stream claim is live until this time unless its holder renews it (NULL: a claim
    # made without a TTL, live until released).
    stream_claimed_at: Mapped[datetime | None]
    stream_expires_at: Mapped[datetime | None]
    last_assistant_message_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (
        # Idle sweep: "no chat of this session is streaming" probes only streaming chats.
        Index(
            "ix_chats_active_stream",
            "session_id",
            postgresql_where=text("active_stream_id IS NOT NULL"),
        ),
    )


class ChatMessageRecord(Base):
    """One message of a chat's append-only transcript."""

    __tablename__ = "chat_messages"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    chat_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(20))
    parts: Mapped[list[Any]]
    account_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("accounts.id", ondelete="SET NULL")
    )
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (Index("ix_chat_messages_chat", "chat_id", "id"),)


class ChatReadRecord(Base):
    """How far an account has read a chat."""

    __tablename__ = "chat_reads"

    chat_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("chats.id", ondelete="CASCADE"), primary_key=True
    )
    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    last_read_message_id: Mapped[int | None] = mapped_column(BigInteger)
    read_at: Mapped[datetime] = mapped_column(server_default=NOW)


class LifecycleRunRecord(Base):
    """One lifecycle run (history): what was asked, by whom, and how it ended."""

    __tablename__ = "lifecycle_runs"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))
    trigger: Mapped[str] = mapped_column(String(20))
    state: Mapped[str] = mapped_column(String(20), server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    issued_version: Mapped[int | None] = mapped_column(Integer)
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    task_id: Mapped[str | None] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text)
    # Why the run was asked for ("idle for 1800 s", "hibernate requested by key slk_…"),
    # set on insert by a trigger unless the writer gives one (migration 0007).
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (
        Index("ix_lifecycle_runs_session_created", "session_id", "created_at"),
        Index(
            "ix_lifecycle_runs_open",
            "session_id",
            "kind",
            "updated_at",
            postgresql_where=text("state IN ('pending', 'queued', 'running')"),
        ),
    )


class OutboxRecord(Base):
    """A task to publish, written in the same transaction as the change that asks for it."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    task_name: Mapped[str] = mapped_column(Text)
    payload: Mapped[dict[str, Any]]
    queue: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    published_at: Mapped[datetime | None]
    # A publisher (the API right after commit, or the relay) holds a record until this
    # time so two publishers rarely send the same record; duplicates are harmless anyway.
    claimed_until: Mapped[datetime | None]
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_error: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        Index("ix_outbox_unpublished", "id", postgresql_where=text("published_at IS NULL")),
    )


class IdempotencyKeyRecord(Base):
    """The first response to a request carrying an ``Idempotency-Key`` (kept 24 h)."""

    __tablename__ = "idempotency_keys"

    account_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[dict[str, Any] | None]
    created_at: Mapped[datetime] = mapped_column(server_default=NOW, index=True)


class WorkerHostRecord(Base):
    """A worker host and its heartbeat (``alive`` until it misses its beats: ``lost``)."""

    __tablename__ = "worker_hosts"

    hostname: Mapped[str] = mapped_column(String(255), primary_key=True)
    queue: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(20), server_default="alive")
    started_at: Mapped[datetime] = mapped_column(server_default=NOW)
    last_beat_at: Mapped[datetime] = mapped_column(server_default=NOW)
    lost_at: Mapped[datetime | None]
    sessions_recovered: Mapped[int] = mapped_column(Integer, server_default=text("0"))


class SweepRunRecord(Base):
    """One row per scheduled sweep: its last run and running totals (for ``/metrics``).

    Every beat-driven sweep upserts its row, so any API process reads the same numbers
    however many workers ran the sweeps; the table never grows past one row per sweep."""

    __tablename__ = "sweep_runs"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    runs_total: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    errors_total: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    items_total: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    duration_seconds_total: Mapped[float] = mapped_column(server_default=text("0"))
    last_started_at: Mapped[datetime | None]
    last_finished_at: Mapped[datetime | None]
    last_duration_seconds: Mapped[float | None]
    last_items: Mapped[int | None] = mapped_column(Integer)
    last_result: Mapped[dict[str, Any] | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class CommandRecord(Base):
    """A command run in a session's sandbox: what was asked and how it ended.

    ``env`` holds the variables' values only until the command ends (they may carry the
    caller's own secrets); then only their names are kept."""

    __tablename__ = "commands"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    argv: Mapped[list[Any]]
    cwd: Mapped[str] = mapped_column(Text)
    env: Mapped[dict[str, Any]]
    timeout_seconds: Mapped[float]
    stdin: Mapped[bytes | None] = mapped_column(LargeBinary)
    detached: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    # queued | running | exited | killed | failed
    status: Mapped[str] = mapped_column(String(20), server_default="queued")
    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    killed_by: Mapped[str | None] = mapped_column(String(20))  # timeout | disk | request
    error: Mapped[str | None] = mapped_column(Text)
    duration_seconds: Mapped[float | None]
    stdout: Mapped[bytes | None] = mapped_column(LargeBinary)
    stderr: Mapped[bytes | None] = mapped_column(LargeBinary)
    stdout_bytes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    stderr_bytes: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    stdout_truncated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    stderr_truncated: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    host: Mapped[str | None] = mapped_column(String(255))
    kill_requested_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_commands_session_created", "session_id", "created_at", "id"),)


class FileOpRecord(Base):
    """A file operation on a sandbox's tree, asked by the API and done by the worker on
    the sandbox's host: the request (``op``, ``path``, ``content`` to write) and, once
    ``done``, its answer (``result``, ``content`` read, or ``error``). The API deletes
    the row once it has the answer (or gives up waiting)."""

    __tablename__ = "file_ops"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    session_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    op: Mapped[str] = mapped_column(String(10))  # list | read | write | delete
    path: Mapped[str] = mapped_column(Text)
    recursive: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    content: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(10), server_default="queued")  # running, done
    result: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    error_kind: Mapped[str | None] = mapped_column(String(20))
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    finished_at: Mapped[datetime | None]

    __table_args__ = (Index("ix_file_ops_created_at", "created_at"),)


class CommandOutputRecord(Base):
    """A piece of a command's output as the worker read it: ``stream`` (stdout or
    stderr) bytes at ``position``, the byte offset in the command's output log (both
    streams, in the order they were recorded). At most the output limit per stream."""

    __tablename__ = "command_output"

    command_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("commands.id", ondelete="CASCADE"), primary_key=True
    )
    position: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    stream: Mapped[str] = mapped_column(String(6))
    data: Mapped[bytes] = mapped_column(LargeBinary)
