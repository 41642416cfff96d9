"""Request and response models (camelCase on the wire). They document the shapes in the
OpenAPI schema; the routes render rows with the read model, ``worker.services.views``."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel


class CamelModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class ErrorBody(BaseModel):
    status: Literal["error"] = "error"
    error: str
    missing_fields: list[str] | None = None


class SessionCreate(CamelModel):
    """All fields optional; an empty body creates a personal session."""

    title: str | None = Field(default=None, description="Display title; generated when omitted.")
    organization_id: uuid.UUID | None = Field(
        default=None, description="UUID of an organization the caller may use."
    )
    artist_id: uuid.UUID | None = Field(default=None, description="UUID of an artist account.")
    idle_timeout_seconds: int | None = Field(
        default=None, ge=1, description="Idle timeout of this session (operator default: null)."
    )
    max_lifetime_seconds: int | None = Field(
        default=None, ge=1, description="Maximum sandbox lifetime (operator default: null)."
    )
    auto_archive_after_seconds: int | None = Field(
        default=None, ge=1, description="Archive once hibernated and untouched this long."
    )
    auto_delete_after_seconds: int | None = Field(
        default=None,
        ge=1,
        description="Delete snapshots and sandbox data this long after archiving.",
    )


class SessionUpdate(CamelModel):
    """Every field optional; an empty body changes nothing."""

    title: str | None = None
    status: Literal["running", "completed", "failed", "archived"] | None = None
    lines_added: int | None = Field(default=None, ge=0)
    lines_removed: int | None = Field(default=None, ge=0)
    idle_timeout_seconds: int | None = Field(default=None, ge=1)
    max_lifetime_seconds: int | None = Field(default=None, ge=1)
    auto_archive_after_seconds: int | None = Field(default=None, ge=1)
    auto_delete_after_seconds: int | None = Field(default=None, ge=1)


class SessionRead(CamelModel):
    id: str
    user_id: str
    title: str
    is_new_branch: bool
    global_skill_refs: list[Any]
    lifecycle_version: int
    created_at: datetime
    updated_at: datetime
    artist_id: str | None
    organization_id: str | None
    repo_owner: str | None
    repo_name: str | None
    branch: str | None
    clone_url: str | None
    sandbox_state: dict[str, Any]
    last_activity_at: datetime | None
    sandbox_expires_at: datetime | None
    hibernate_after: datetime | None
    lifecycle_run_id: str | None
    lifecycle_error: str | None
    lines_added: int
    lines_removed: int
    snapshot_url: str | None
    snapshot_created_at: datetime | None
    snapshot_size_bytes: int | None
    cached_diff: dict[str, Any] | None
    cached_diff_updated_at: datetime | None
    status: str
    lifecycle_state: str
    idle_timeout_seconds: int | None
    max_lifetime_seconds: int | None
    auto_archive_after_seconds: int | None
    auto_delete_after_seconds: int | None
    deleted_at: datetime | None


class ChatRead(CamelModel):
    id: str
    session_id: str
    title: str
    model_id: str | None
    created_at: datetime
    updated_at: datetime
    active_stream_id: str | None
    last_assistant_message_at: datetime | None


class ChatListItem(ChatRead):
    unread: bool


class ChatEnvelope(BaseModel):
    chat: ChatRead


class ChatPage(BaseModel):
    chats: list[ChatListItem]
    next_cursor: str | None = Field(serialization_alias="nextCursor")


class ChatWrite(CamelModel):
    title: str | None = Field(default=None, max_length=200)
    model_id: str | None = None


class MessageWrite(CamelModel):
    role: Literal["user", "assistant", "system", "tool"]
    parts: list[dict[str, Any]] = Field(min_length=1, max_length=200)


class MessageRead(CamelModel):
    id: int
    chat_id: str
    role: str
    parts: list[dict[str, Any]]
    account_id: str | None
    created_at: datetime


class MessageEnvelope(BaseModel):
    message: MessageRead


class MessagePage(BaseModel):
    messages: list[MessageRead]
    next_after: int | None = Field(serialization_alias="nextAfter")


class ReadMarker(CamelModel):
    chat_id: str
    last_read_message_id: int | None


class StreamClaimWrite(CamelModel):
    stream_id: str = Field(min_length=1, max_length=200)
    ttl_seconds: float | None = Field(default=None, ge=1)


class StreamRelease(CamelModel):
    stream_id: str = Field(min_length=1, max_length=200)


class StreamClaimRead(CamelModel):
    chat_id: str
    stream_id: str
    claimed_at: datetime | None
    expires_at: datetime | None


class ExtendWrite(CamelModel):
    seconds: int = Field(ge=1)


class CommandWrite(CamelModel):
    """The body of ``POST /api/sessions/{id}/commands``: exactly one of ``argv`` and
    ``cmd``."""

    argv: list[str] | None = Field(None, description="the program and its arguments")
    cmd: str | None = Field(None, description="a shell command line (run by /bin/sh -c)")
    cwd: str | None = Field(None, description="working directory under /workspace")
    env: dict[str, str] | None = Field(None, description="extra environment variables")
    timeout_seconds: float | None = Field(None, description="wall time limit")
    stdin: str | None = Field(None, description="text written to the command's input")
    detached: bool = Field(False, description="runs until the sandbox ends (a server)")
    auto_resume: bool = Field(
        False,
        description="on a session that is not active: start (resume) its sandbox and run "
        "the command once it is active (status `waiting` until then) instead of 409",
    )


class SessionExtended(BaseModel):
    session: SessionRead
    extended_by: int = Field(serialization_alias="extendedBy")


class RunRead(CamelModel):
    id: str
    session_id: str
    kind: str
    trigger: str
    state: str
    attempts: int
    issued_version: int | None
    from_version: int | None
    to_version: int | None
    error: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class SessionEnvelope(BaseModel):
    session: SessionRead


class SessionCreated(BaseModel):
    session: SessionRead
    chat: ChatRead


class SessionRun(BaseModel):
    session: SessionRead
    run: RunRead | None = Field(
        description="The run that will act: new, or the open one the kick joined; null when "
        "nothing needs doing"
    )
    reason: str | None = Field(
        description="Why no new run was recorded (joined an open run, or already satisfied); "
        "null when one was"
    )


class SessionPage(BaseModel):
    sessions: list[SessionRead]
    next_cursor: str | None = Field(serialization_alias="nextCursor")


class RunList(BaseModel):
    runs: list[RunRead]


class DiffFile(BaseModel):
    """One changed file. Every key is always present."""

    path: str
    status: Literal["added", "modified", "deleted", "renamed"]
    old_path: str | None = Field(serialization_alias="oldPath", description="Set for renames")
    additions: int
    deletions: int
    binary: bool
    generated: bool = Field(description="A lock file or similar generated file")
    truncated: bool = Field(description="The patch text was cut at the size limits")
    patch: str


class DiffSummary(BaseModel):
    total_files: int = Field(serialization_alias="totalFiles")
    total_additions: int = Field(serialization_alias="totalAdditions")
    total_deletions: int = Field(serialization_alias="totalDeletions")


class Diff(BaseModel):
    files: list[DiffFile]
    summary: DiffSummary
    base_ref: str | None = Field(serialization_alias="baseRef")
    head_sha: str | None = Field(serialization_alias="headSha")


class CachedDiff(BaseModel):
    diff: Diff
    cached_at: datetime | None = Field(serialization_alias="cachedAt")
    is_stale: bool = Field(serialization_alias="isStale")


def etag_of(session: dict[str, Any]) -> str:
    """A strong validator: any visible change of the session changes it."""
    import hashlib

    digest = hashlib.sha256(json.dumps(session, sort_keys=True, default=str).encode()).hexdigest()
    return f'"{digest[:32]}"'
