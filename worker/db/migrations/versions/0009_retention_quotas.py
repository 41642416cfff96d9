"""retention and quotas: per-session auto-archive / auto-delete overrides and the time
a session's data was deleted; per-account caps on active sandboxes and sessions

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("auto_archive_after_seconds", sa.Integer(), nullable=True))
    op.add_column("sessions", sa.Column("auto_delete_after_seconds", sa.Integer(), nullable=True))
    op.add_column("sessions", sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("accounts", sa.Column("max_active_sandboxes", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("max_sessions", sa.Integer(), nullable=True))
    # Retention: resting sessions by the time that starts their clock.
    op.create_index(
        "ix_sessions_retention_hibernated",
        "sessions",
        ["updated_at"],
        postgresql_where=sa.text("lifecycle_state = 'hibernated' AND status <> 'archived'"),
    )
    op.create_index(
        "ix_sessions_retention_archived",
        "sessions",
        ["archived_at"],
        postgresql_where=sa.text("lifecycle_state = 'archived'"),
    )
    # Quotas: an organization's sessions.
    op.create_index(
        "ix_sessions_org",
        "sessions",
        ["organization_id"],
        postgresql_where=sa.text("organization_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_sessions_org", table_name="sessions")
    op.drop_index("ix_sessions_retention_archived", table_name="sessions")
    op.drop_index("ix_sessions_retention_hibernated", table_name="sessions")
    op.drop_column("accounts", "max_sessions")
    op.drop_column("accounts", "max_active_sandboxes")
    op.drop_column("sessions", "deleted_at")
    op.drop_column("sessions", "auto_delete_after_seconds")
    op.drop_column("sessions", "auto_archive_after_seconds")
