"""sessions: index for listing an org's sessions

Org sessions belong to the org: its key and its members list them with
``GET /api/sessions?organizationId=``. This index serves that listing newest first
with keyset pagination, as ``ix_sessions_owner_created`` serves the creator's; it holds
only org sessions.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_sessions_org_created",
        "sessions",
        ["organization_id", sa.text("created_at DESC"), sa.text("id DESC")],
        unique=False,
        postgresql_where=sa.text("organization_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_org_created", table_name="sessions")
