"""webhooks: endpoints per account, one delivery (and outbox job) per matching event,
appended by a trigger on events in the event's transaction

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every event an enabled webhook of the session's owner, its organization or a member
# of that organization asked for (all types, an exact type, or "<prefix>.*") gets a
# delivery, queued with its job in the outbox (published by the relay).
_FANOUT = """
CREATE FUNCTION webhook_fanout() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- The common case, no webhook of the owner or its organization: two index probes.
    IF NOT EXISTS (SELECT 1 FROM webhooks WHERE account_id = NEW.user_id)
       AND (NEW.organization_id IS NULL OR NOT EXISTS (
           SELECT 1 FROM webhooks WHERE account_id = NEW.organization_id
           UNION ALL
           SELECT 1 FROM webhooks AS w JOIN org_memberships AS m ON m.account_id = w.account_id
           WHERE m.org_id = NEW.organization_id)) THEN
        RETURN NULL;
    END IF;
    WITH d AS (
        INSERT INTO webhook_deliveries (webhook_id, event_id, state, attempts,
            next_attempt_at, created_at, updated_at)
        SELECT w.id, NEW.id, 'queued', 0, now(), now(), now()
        FROM webhooks AS w
        WHERE w.enabled
          AND (w.account_id = NEW.user_id
               OR w.account_id = NEW.organization_id
               OR (NEW.organization_id IS NOT NULL AND w.account_id IN (
                   SELECT m.account_id FROM org_memberships AS m
                   WHERE m.org_id = NEW.organization_id)))
          AND (cardinality(w.event_types) = 0
               OR NEW.type = ANY(w.event_types)
               OR split_part(NEW.type, '.', 1) || '.*' = ANY(w.event_types))
        RETURNING id
    )
    INSERT INTO outbox (task_name, payload, queue, created_at, claimed_until, attempts)
    SELECT 'lifecycle.webhook_deliver',
        jsonb_build_object('kwargs', jsonb_build_object('delivery_id', d.id),
                           'task_id', gen_random_uuid()::text),
        'lifecycle', now(), NULL, 0
    FROM d;
    RETURN NULL;
END $$
"""


def upgrade() -> None:
    now = sa.text("now()")
    op.create_table(
        "webhooks",
        sa.Column("id", sa.UUID(), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column(
            "event_types",
            postgresql.ARRAY(sa.Text()),
            server_default=sa.text("'{}'::text[]"),
            nullable=False,
        ),
        sa.Column("secret", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("failing_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.id"],
            name=op.f("fk_webhooks_account_id_accounts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhooks")),
    )
    op.create_index("ix_webhooks_account", "webhooks", ["account_id"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("webhook_id", sa.UUID(), nullable=False),
        sa.Column("event_id", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(length=20), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_status_code", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["webhook_id"],
            ["webhooks.id"],
            name=op.f("fk_webhook_deliveries_webhook_id_webhooks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_deliveries")),
    )
    op.create_index("ix_webhook_deliveries_webhook", "webhook_deliveries", ["webhook_id", "id"])
    op.create_index(
        "ix_webhook_deliveries_due",
        "webhook_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("state IN ('queued', 'sending', 'waiting')"),
    )
    op.create_table(
        "webhook_attempts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("attempted_at", sa.DateTime(timezone=True), server_default=now, nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["webhook_deliveries.id"],
            name=op.f("fk_webhook_attempts_delivery_id_webhook_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_webhook_attempts")),
    )
    op.create_index("ix_webhook_attempts_delivery", "webhook_attempts", ["delivery_id", "id"])
    op.execute(_FANOUT)
    op.execute(
        "CREATE TRIGGER events_webhooks AFTER INSERT ON events"
        " FOR EACH ROW EXECUTE FUNCTION webhook_fanout()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER events_webhooks ON events")
    op.execute("DROP FUNCTION webhook_fanout()")
    op.drop_table("webhook_attempts")
    op.drop_table("webhook_deliveries")
    op.drop_table("webhooks")
