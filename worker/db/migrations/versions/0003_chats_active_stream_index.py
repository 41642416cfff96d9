"""chats: partial index on the chats with an active stream

The idle sweep excludes sessions with a streaming chat (NOT EXISTS over chats with
``active_stream_id IS NOT NULL``). Without an index PostgreSQL answers that with a
sequential scan of every chat, so the sweep's cost grew with the table (bench: sweep).
This index holds only the chats streaming right now: tiny, and the sweep's cost follows
the due sessions again.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_chats_active_stream",
        "chats",
        ["session_id"],
        unique=False,
        postgresql_where=sa.text("active_stream_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_chats_active_stream", table_name="chats")
