"""The read model shared by the API and the command line: a row's wire form (camelCase,
ISO timestamps, null where unknown), and the rules of what a reader is shown.

Pure functions of the rows; no query, no commit. The API's pydantic models document
these shapes in its OpenAPI schema."""

from __future__ import annotations

from typing import Any

from worker.db.models import ChatMessageRecord, ChatRecord, LifecycleRunRecord, SessionRecord
from worker.domain.lifecycle import LifecycleState
from worker.errors import NotFound

__all__ = [
    "cached_diff",
    "chat_dict",
    "diff_is_stale",
    "message_dict",
    "run_dict",
    "session_dict",
    "stream_dict",
]


def _s(value: object) -> str | None:
    return None if value is None else str(value)


def session_dict(r: SessionRecord) -> dict[str, Any]:
    """The wire form of a session (every seed field, null where unknown)."""
    return {
        "id": str(r.id),
        "userId": str(r.user_id),
        "title": r.title,
        "isNewBranch": r.is_new_branch,
        "globalSkillRefs": r.global_skill_refs or [],
        "lifecycleVersion": r.lifecycle_version,
        "createdAt": r.created_at.isoformat(),
        "updatedAt": r.updated_at.isoformat(),
        "artistId": _s(r.artist_id),
        "organizationId": _s(r.organization_id),
        "repoOwner": r.repo_owner,
        "repoName": r.repo_name,
        "branch": r.branch,
        "cloneUrl": r.clone_url,
        "sandboxState": r.sandbox_state or {},
        "lastActivityAt": r.last_activity_at and r.last_activity_at.isoformat(),
        "sandboxExpiresAt": r.sandbox_expires_at and r.sandbox_expires_at.isoformat(),
        "hibernateAfter": r.hibernate_after and r.hibernate_after.isoformat(),
        "lifecycleRunId": _s(r.lifecycle_run_id),
        "lifecycleError": r.lifecycle_error,
        "linesAdded": r.lines_added,
        "linesRemoved": r.lines_removed,
        "snapshotUrl": r.snapshot_url,
        "snapshotCreatedAt": r.snapshot_created_at and r.snapshot_created_at.isoformat(),
        "snapshotSizeBytes": r.snapshot_size_bytes,
        "cachedDiff": r.cached_diff,
        "cachedDiffUpdatedAt": r.cached_diff_updated_at and r.cached_diff_updated_at.isoformat(),
        "status": r.status,
        "lifecycleState": r.lifecycle_state,
        "idleTimeoutSeconds": r.idle_timeout_seconds,
        "maxLifetimeSeconds": r.max_lifetime_seconds,
        "autoArchiveAfterSeconds": r.auto_archive_after_seconds,
        "autoDeleteAfterSeconds": r.auto_delete_after_seconds,
        "deletedAt": r.deleted_at and r.deleted_at.isoformat(),
    }


def chat_dict(c: ChatRecord) -> dict[str, Any]:
    return {
        "id": str(c.id),
        "sessionId": str(c.session_id),
        "title": c.title,
        "modelId": c.model_id,
        "createdAt": c.created_at.isoformat(),
        "updatedAt": c.updated_at.isoformat(),
        "activeStreamId": c.active_stream_id,
        "lastAssistantMessageAt": c.last_assistant_message_at
        and c.last_assistant_message_at.isoformat(),
    }


def message_dict(m: ChatMessageRecord) -> dict[str, Any]:
    return {
        "id": m.id,
        "chatId": str(m.chat_id),
        "role": m.role,
        "parts": m.parts,
        "accountId": _s(m.account_id),
        "createdAt": m.created_at.isoformat(),
    }


def stream_dict(c: ChatRecord) -> dict[str, Any]:
    return {
        "chatId": str(c.id),
        "streamId": c.active_stream_id,
        "claimedAt": c.stream_claimed_at and c.stream_claimed_at.isoformat(),
        "expiresAt": c.stream_expires_at and c.stream_expires_at.isoformat(),
    }


def run_dict(r: LifecycleRunRecord) -> dict[str, Any]:
    return {
        "id": str(r.id),
        "sessionId": str(r.session_id),
        "kind": r.kind,
        "trigger": r.trigger,
        "state": r.state,
        "attempts": r.attempts,
        "issuedVersion": r.issued_version,
        "fromVersion": r.from_version,
        "toVersion": r.to_version,
        "error": r.error,
        "createdAt": r.created_at.isoformat(),
        "startedAt": r.started_at and r.started_at.isoformat(),
        "finishedAt": r.finished_at and r.finished_at.isoformat(),
    }


def diff_is_stale(r: SessionRecord) -> bool:
    """The cached diff may be behind the working tree: the sandbox is live (active or
    restoring) and the session saw activity after the diff was computed, or either time
    is unknown. A resting sandbox cannot change, so its diff is never stale."""
    live = r.lifecycle_state in (LifecycleState.ACTIVE.value, LifecycleState.RESTORING.value)
    cached_at = r.cached_diff_updated_at
    return live and (
        cached_at is None or r.last_activity_at is None or r.last_activity_at > cached_at
    )


def cached_diff(r: SessionRecord) -> dict[str, Any]:
    """The session's cached diff as a reader sees it; NotFound when there is none."""
    if r.cached_diff is None:
        raise NotFound("No cached diff available")
    cached_at = r.cached_diff_updated_at
    return {
        "diff": r.cached_diff,
        "cachedAt": cached_at and cached_at.isoformat(),
        "isStale": diff_is_stale(r),
    }
