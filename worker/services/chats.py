"""Chats of a session: the chats themselves, their transcripts, read markers and the
stream claim that keeps a session awake while an agent turn runs.

A stream claim is a compare-and-set on ``chats.active_stream_id``: one statement takes
it when it is free, expired or already this stream's (then it is renewed), so of two
turns racing for one chat exactly one wins. Every claim has a TTL: a client that
crashes mid-turn stops renewing it, and the idle sweep may hibernate the session once
the claim has expired.

Deleting a chat deletes its transcript and read markers. A session may be left with no
chat (a client creates one when it needs one); a chat whose stream claim is live cannot
be deleted (409) — release the stream first.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, or_, select, text, update
from sqlalchemy.orm import Session

from worker.config import Settings
from worker.db.models import ChatMessageRecord, ChatReadRecord, ChatRecord, SessionRecord
from worker.domain.cursors import decode_cursor, encode_cursor
from worker.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge

MESSAGE_ROLES = ("user", "assistant", "system", "tool")
MAX_STREAM_ID_LENGTH = 200
MAX_PARTS = 200


@dataclass
class ChatView:
    """A chat as one account sees it (``unread``: messages after its read marker)."""

    chat: ChatRecord
    unread: bool


# ----------------------------------------------------------------- chats


def _unread_expr(account_id: uuid.UUID) -> Any:
    """Whether ``account_id`` has messages of the chat it has not read."""
    last_read = (
        select(func.coalesce(ChatReadRecord.last_read_message_id, 0))
        .where(ChatReadRecord.chat_id == ChatRecord.id, ChatReadRecord.account_id == account_id)
        .scalar_subquery()
    )
    newest = (
        select(func.max(ChatMessageRecord.id))
        .where(ChatMessageRecord.chat_id == ChatRecord.id)
        .scalar_subquery()
    )
    return func.coalesce(newest, 0) > func.coalesce(last_read, 0)


def list_chats(
    db: Session, session: SessionRecord, account_id: uuid.UUID, *, limit: int, cursor: str | None
) -> tuple[list[ChatView], str | None]:
    """The session's chats, newest first, keyset-paginated on (createdAt, id)."""
    stmt = select(ChatRecord, _unread_expr(account_id)).where(ChatRecord.session_id == session.id)
    if cursor:
        created, cid = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                ChatRecord.created_at < created,
                and_(ChatRecord.created_at == created, ChatRecord.id < cid),
            )
        )
    rows = db.execute(
        stmt.order_by(ChatRecord.created_at.desc(), ChatRecord.id.desc()).limit(limit + 1)
    ).all()
    views = [ChatView(chat, bool(unread)) for chat, unread in rows[:limit]]
    next_cursor = (
        encode_cursor(views[-1].chat.created_at, views[-1].chat.id) if len(rows) > limit else None
    )
    return views, next_cursor


def get_chat(
    db: Session, session: SessionRecord, chat_id: str, *, lock: bool = False
) -> ChatRecord:
    """Chat ``chat_id`` of ``session`` (404 ``Chat not found`` otherwise)."""
    try:
        cid = uuid.UUID(chat_id)
    except ValueError:
        raise NotFound("Chat not found") from None
    stmt = select(ChatRecord).where(ChatRecord.id == cid, ChatRecord.session_id == session.id)
    if lock:
        stmt = stmt.with_for_update()
    chat = db.scalars(stmt).first()
    if chat is None:
        raise NotFound("Chat not found")
    return chat


def chat_view(db: Session, chat: ChatRecord, account_id: uuid.UUID) -> ChatView:
    unread = db.execute(select(_unread_expr(account_id)).where(ChatRecord.id == chat.id)).scalar()
    return ChatView(chat, bool(unread))


def create_chat(
    db: Session, settings: Settings, session: SessionRecord, title: str | None, model_id: str | None
) -> ChatRecord:
    now = datetime.now(UTC)
    chat = ChatRecord(
        id=uuid.uuid4(),
        session_id=session.id,
        title=_title(settings, title) or "New chat",
        model_id=model_id or settings.default_model_id,
        active_stream_id=None,
        created_at=now,
        updated_at=now,
    )
    db.add(chat)
    db.flush()
    return chat


def patch_chat(
    db: Session, settings: Settings, chat: ChatRecord, title: str | None, model_id: str | None
) -> None:
    if title is not None:
        chat.title = _title(settings, title) or chat.title
    if model_id is not None:
        if not model_id.strip():
            raise InvalidInput("modelId must not be blank", missing_fields=["modelId"])
        chat.model_id = model_id.strip()
    if title is not None or model_id is not None:
        chat.updated_at = datetime.now(UTC)
    db.flush()


def delete_chat(db: Session, chat: ChatRecord) -> None:
    if stream_holder(chat) is not None:
        raise Conflict(
            f"Chat has an active stream ({chat.active_stream_id}); release it first",
            activeStreamId=chat.active_stream_id,
        )
    db.delete(chat)
    db.flush()


def _title(settings: Settings, title: str | None) -> str | None:
    if title is None:
        return None
    title = title.strip()
    if len(title) > settings.max_title_length:
        raise InvalidInput(
            f"title must be at most {settings.max_title_length} characters",
            missing_fields=["title"],
        )
    return title


# ----------------------------------------------------------------- messages


def validate_parts(settings: Settings, parts: Any, encoded_size: int) -> list[Any]:
    """A message's ``parts``: a non-empty JSON array of objects, bounded in size."""
    if not isinstance(parts, list) or not parts or not all(isinstance(p, dict) for p in parts):
        raise InvalidInput("parts must be a non-empty array of objects", missing_fields=["parts"])
    if len(parts) > MAX_PARTS:
        raise InvalidInput(f"parts must hold at most {MAX_PARTS} items", missing_fields=["parts"])
    if encoded_size > settings.max_message_bytes:
        raise PayloadTooLarge(
            f"Message too large (limit {settings.max_message_bytes} bytes)",
            missing_fields=["parts"],
        )
    return parts


def append_message(
    db: Session, chat: ChatRecord, account_id: uuid.UUID, role: str, parts: list[Any]
) -> ChatMessageRecord:
    """Append to the transcript; an assistant message moves ``lastAssistantMessageAt``."""
    if role not in MESSAGE_ROLES:
        raise InvalidInput(
            f"role must be one of {', '.join(MESSAGE_ROLES)}", missing_fields=["role"]
        )
    now = datetime.now(UTC)
    message = ChatMessageRecord(
        chat_id=chat.id, role=role, parts=parts, account_id=account_id, created_at=now
    )
    db.add(message)
    chat.updated_at = now
    if role == "assistant":
        chat.last_assistant_message_at = now
    db.flush()
    return message


def list_messages(
    db: Session, chat: ChatRecord, *, after: int | None, limit: int
) -> tuple[list[ChatMessageRecord], int | None]:
    """Messages in order (oldest first) after message id ``after``; the next ``after``."""
    stmt = select(ChatMessageRecord).where(ChatMessageRecord.chat_id == chat.id)
    if after is not None:
        stmt = stmt.where(ChatMessageRecord.id > after)
    rows = list(db.scalars(stmt.order_by(ChatMessageRecord.id).limit(limit + 1)))
    page = rows[:limit]
    return page, (page[-1].id if len(rows) > limit else None)


def mark_read(
    db: Session, chat: ChatRecord, account_id: uuid.UUID, message_id: int | None
) -> int | None:
    """Move ``account_id``'s read marker to ``message_id`` (default: the newest message);
    a marker never moves back. Returns the marker."""
    newest = db.execute(
        select(func.max(ChatMessageRecord.id)).where(ChatMessageRecord.chat_id == chat.id)
    ).scalar()
    if message_id is None:
        message_id = newest
    elif newest is None or not 0 < message_id <= newest:
        raise InvalidInput("messageId is not a message of this chat", missing_fields=["messageId"])
    db.execute(
        text(
            """
INSERT INTO chat_reads (chat_id, account_id, last_read_message_id, read_at)
VALUES (:chat, :account, :mid, now())
ON CONFLICT (chat_id, account_id) DO UPDATE SET
    last_read_message_id = GREATEST(
        coalesce(chat_reads.last_read_message_id, 0), coalesce(excluded.last_read_message_id, 0)
    ),
    read_at = now()
"""
        ),
        {"chat": chat.id, "account": account_id, "mid": message_id},
    )
    return message_id


# ----------------------------------------------------------------- stream claims


def stream_holder(chat: ChatRecord, now: datetime | None = None) -> str | None:
    """The stream holding ``chat``'s claim right now, if any."""
    if chat.active_stream_id is None:
        return None
    expires = chat.stream_expires_at
    if expires is not None and expires <= (now or datetime.now(UTC)):
        return None
    return chat.active_stream_id


def validate_stream_id(stream_id: Any) -> str:
    if (
        not isinstance(stream_id, str)
        or not stream_id.strip()
        or len(stream_id) > MAX_STREAM_ID_LENGTH
        or any(ord(ch) < 32 for ch in stream_id)
    ):
        raise InvalidInput(
            f"streamId must be a non-empty string of at most {MAX_STREAM_ID_LENGTH} characters",
            missing_fields=["streamId"],
        )
    return stream_id


def claim_ttl(settings: Settings, ttl: Any) -> float:
    if ttl is None:
        return settings.stream_claim_ttl_seconds
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not ttl >= 1:
        raise InvalidInput("ttlSeconds must be a number >= 1", missing_fields=["ttlSeconds"])
    if ttl > settings.max_stream_claim_ttl_seconds:
        raise InvalidInput(
            f"ttlSeconds must be at most {settings.max_stream_claim_ttl_seconds:g}",
            missing_fields=["ttlSeconds"],
        )
    return float(ttl)


def claim_stream(db: Session, chat: ChatRecord, stream_id: str, ttl_seconds: float) -> ChatRecord:
    """Take (or renew) ``chat``'s stream claim for ``stream_id``, by compare-and-set:
    it succeeds when the claim is free, expired or already this stream's. 409 naming the
    holder otherwise."""
    now = datetime.now(UTC)
    expires = now + timedelta(seconds=ttl_seconds)
    free = or_(
        ChatRecord.active_stream_id.is_(None),
        ChatRecord.active_stream_id == stream_id,
        ChatRecord.stream_expires_at <= func.now(),
    )
    row = db.execute(
        update(ChatRecord)
        .where(ChatRecord.id == chat.id, free)
        .values(
            active_stream_id=stream_id,
            stream_claimed_at=_claimed_at(stream_id, now),
            stream_expires_at=expires,
            updated_at=now,
        )
        .returning(ChatRecord.id)
        .execution_options(synchronize_session=False)
    ).first()
    db.refresh(chat)
    if row is None:
        holder = stream_holder(chat) or chat.active_stream_id
        raise Conflict(
            f"Chat is already streaming ({holder})",
            activeStreamId=holder,
            streamExpiresAt=chat.stream_expires_at and chat.stream_expires_at.isoformat(),
        )
    return chat


def _claimed_at(stream_id: str, now: datetime) -> Any:
    """Keep the claim time when the same stream renews; else now."""
    return case(
        (
            and_(
                ChatRecord.active_stream_id == stream_id,
                or_(
                    ChatRecord.stream_expires_at.is_(None),
                    ChatRecord.stream_expires_at > func.now(),
                ),
            ),
            func.coalesce(ChatRecord.stream_claimed_at, now),
        ),
        else_=now,
    )


def release_stream(db: Session, chat: ChatRecord, stream_id: str) -> bool:
    """Release ``chat``'s claim if ``stream_id`` holds it (True). Nothing held: False.
    Held by another live stream: 409."""
    result = db.execute(
        update(ChatRecord)
        .where(ChatRecord.id == chat.id, ChatRecord.active_stream_id == stream_id)
        .values(active_stream_id=None, stream_claimed_at=None, stream_expires_at=None)
        .returning(ChatRecord.id)
        .execution_options(synchronize_session=False)
    ).first()
    db.refresh(chat)
    if result is not None:
        return True
    holder = stream_holder(chat)
    if holder is not None:
        raise Conflict(
            f"Chat is streaming {holder}, not {stream_id}; only the holder may release it",
            activeStreamId=holder,
        )
    return False


def session_has_live_stream(db: Session, session_id: uuid.UUID) -> str | None:
    """The stream id of a live claim on any chat of the session, if any."""
    now = datetime.now(UTC)
    return db.execute(
        select(ChatRecord.active_stream_id)
        .where(
            ChatRecord.session_id == session_id,
            ChatRecord.active_stream_id.is_not(None),
            or_(ChatRecord.stream_expires_at.is_(None), ChatRecord.stream_expires_at > now),
        )
        .limit(1)
    ).scalar()
