"""Keyset page cursors: an opaque token for the last row of a page, ``(created_at, id)``.

Pure (no I/O): sessions, chats and commands pages all use it."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from worker.errors import InvalidInput


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The ``(created_at, id)`` a cursor names; 400 (``InvalidInput``) for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, row_id = raw.split("|", 1)
        created = datetime.fromisoformat(stamp)
        if created.tzinfo is None:
            raise ValueError
        return created, uuid.UUID(row_id)
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput("cursor is not valid", missing_fields=["cursor"]) from None
