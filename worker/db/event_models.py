"""Models of the events, webhooks, retention and quota tables (issue 16), kept apart
from ``models.py``; ``worker/db/__init__.py`` imports them so ``Base.metadata`` holds
every table."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.dialects.postgresql import ARRAY
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
        # The events /metrics counts (migration 0013).
        Index(
            "ix_events_counted",
            "type",
            postgresql_where=text("type IN ('quota.refused', 'sweep.auto_delete')"),
        ),
    )


class WebhookRecord(Base):
    """An account's webhook endpoint. ``secret`` signs deliveries (it must be kept to
    sign, so it is stored as given; the API shows it once, on create)."""

    __tablename__ = "webhooks"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    account_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("accounts.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(Text)
    # Empty: every event; else exact types or "<prefix>.*".
    event_types: Mapped[list[str]] = mapped_column(ARRAY(Text), server_default=text("'{}'::text[]"))
    secret: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    # The first failed attempt since the last success (NULL: not failing).
    failing_since: Mapped[datetime | None]
    disabled_at: Mapped[datetime | None]
    disabled_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)

    __table_args__ = (Index("ix_webhooks_account", "account_id"),)


class WebhookDeliveryRecord(Base):
    """One event for one webhook: ``queued`` (its job is in the outbox or the broker),
    ``sending`` (a worker holds it until ``lease_until``), ``waiting`` (until
    ``next_attempt_at``, after a failed attempt), then ``succeeded``, ``failed`` (retries
    used up) or ``cancelled`` (the webhook was disabled or deleted)."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(20))
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime | None]
    lease_until: Mapped[datetime | None]
    last_status_code: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(server_default=NOW)
    updated_at: Mapped[datetime] = mapped_column(server_default=NOW)
    delivered_at: Mapped[datetime | None]

    __table_args__ = (
        Index("ix_webhook_deliveries_webhook", "webhook_id", "id"),
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("state IN ('queued', 'sending', 'waiting')"),
        ),
    )


class WebhookAttemptRecord(Base):
    """One HTTP attempt of a delivery and its answer (status code, or the error)."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE")
    )
    attempted_at: Mapped[datetime] = mapped_column(server_default=NOW)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[float | None]

    __table_args__ = (Index("ix_webhook_attempts_delivery", "delivery_id", "id"),)
