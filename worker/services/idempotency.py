"""``Idempotency-Key``: the same key from the same account within the TTL replays the
first response; the same key with a different request is a conflict."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker.db.models import IdempotencyKeyRecord
from worker.errors import Conflict, InvalidInput


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: dict[str, Any]


def request_hash(method: str, path: str, body: bytes) -> str:
    return hashlib.sha256(b"\0".join([method.encode(), path.encode(), body])).hexdigest()


def begin(
    db: Session, account_id: uuid.UUID, key: str, req_hash: str, ttl_seconds: int
) -> Replay | None:
    """Reserve ``key`` in the caller's transaction. Returns the stored response when the
    key was used before (a concurrent first request holding it makes this wait for it)."""
    if not key or len(key) > 255 or "\x00" in key:  # PostgreSQL text cannot hold NUL
        raise InvalidInput("Idempotency-Key must be 1-255 characters, without NUL")
    now = datetime.now(UTC)
    # An expired key is forgotten, so it can be used again.
    db.execute(
        delete(IdempotencyKeyRecord).where(
            IdempotencyKeyRecord.account_id == account_id,
            IdempotencyKeyRecord.key == key,
            IdempotencyKeyRecord.created_at < now - timedelta(seconds=ttl_seconds),
        )
    )
    inserted = db.execute(
        insert(IdempotencyKeyRecord)
        .values(account_id=account_id, key=key, request_hash=req_hash, created_at=now)
        .on_conflict_do_nothing()
        .returning(IdempotencyKeyRecord.key)
    ).first()
    if inserted is not None:
        return None
    row = db.execute(
        select(IdempotencyKeyRecord).where(
            IdempotencyKeyRecord.account_id == account_id, IdempotencyKeyRecord.key == key
        )
    ).scalar_one()
    if row.request_hash != req_hash:
        raise Conflict("Idempotency-Key was already used with a different request")
    if row.response is None or row.status_code is None:
        raise Conflict("A request with this Idempotency-Key is still in progress")
    return Replay(row.status_code, row.response)


def finish(
    db: Session, account_id: uuid.UUID, key: str, status_code: int, body: dict[str, Any]
) -> None:
    """Store the response in the same transaction as the work it describes."""
    db.execute(
        update(IdempotencyKeyRecord)
        .where(IdempotencyKeyRecord.account_id == account_id, IdempotencyKeyRecord.key == key)
        .values(status_code=status_code, response=body)
    )
