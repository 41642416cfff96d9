"""Models of the events, webhooks, retention and quota tables (issue 16), kept apart
from ``models.py``; ``worker/db/__init__.py`` imports them so ``Base.metadata`` holds
every table."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from worker.db.models import NOW, Base


class EventRecord(Base):
    """One change of a session (or of an account's webhooks), appended by the triggers
    of migration 0007 in the transaction of the change.

    ``id`` is the event's identity (the webhook dedup id and the feed cursor); ``tx`` is
    the writing transaction's id, which orders the feed so that a page never skips an
    event a slower transaction commits later (see ``services/events.py``)."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    tx: Mapped[int] = mapped_column(
        BigInteger, server_default=text("(pg_current_xact_id()::text)::bigint")
    )
    type: Mapped[str] = mapped_column(String(60))
    session_id: Mapped[uuid.UUID | None]
    user_id: Mapped[uuid.UUID | None]
    organization_id: Mapped[uuid.UUID | None]
    run_id: Mapped[uuid.UUID | None]
    version: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (
        Index("ix_events_session", "session_id", "tx", "id"),
        Index("ix_events_user", "user_id", "tx", "id"),
        Index(
            "ix_events_org",
            "organization_id",
            "tx",
            "id",
            postgresql_where=text("organization_id IS NOT NULL"),
        ),
    )
