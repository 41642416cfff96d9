"""chats: messages, read markers, expiring stream claims; per-session timeouts

* ``chat_messages``: the append-only transcript of a chat.
* ``chat_reads``: how far each account has read each chat (``unread`` in lists).
* ``chats.stream_expires_at``: a stream claim lives until then unless renewed, so a
  crashed client cannot keep a sandbox awake; ``stream_claimed_at`` when it was taken.
* ``sessions.idle_timeout_seconds`` / ``max_lifetime_seconds``: per-session overrides of
  the operator's defaults (NULL: the default).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("idle_timeout_seconds", sa.Integer(), nullable=True))
    op.add_column("sessions", sa.Column("max_lifetime_seconds", sa.Integer(), nullable=True))
    op.add_column(
        "chats", sa.Column("stream_claimed_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.add_column(
        "chats", sa.Column("stream_expires_at", sa.DateTime(timezone=True), nullable=True)
    )
    op.create_table(
        "chat_messages",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("chat_id", sa.UUID(), nullable=False),
        sa.Column("role", sa.String(length=20), nullable=False),
        sa.Column("parts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_chat_messages_chat", "chat_messages", ["chat_id", "id"], unique=False)
    op.create_table(
        "chat_reads",
        sa.Column("chat_id", sa.UUID(), nullable=False),
        sa.Column("account_id", sa.UUID(), nullable=False),
        sa.Column("last_read_message_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "read_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("chat_id", "account_id"),
    )


def downgrade() -> None:
    op.drop_table("chat_reads")
    op.drop_index("ix_chat_messages_chat", table_name="chat_messages")
    op.drop_table("chat_messages")
    op.drop_column("chats", "stream_expires_at")
    op.drop_column("chats", "stream_claimed_at")
    op.drop_column("sessions", "max_lifetime_seconds")
    op.drop_column("sessions", "idle_timeout_seconds")
