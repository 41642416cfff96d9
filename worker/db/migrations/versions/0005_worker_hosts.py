"""worker_hosts: each worker host's heartbeat, so a host that dies is noticed

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "worker_hosts",
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("queue", sa.Text(), nullable=False),
        sa.Column("state", sa.String(length=20), server_default="alive", nullable=False),
        sa.Column(
            "started_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "last_beat_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lost_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sessions_recovered", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.PrimaryKeyConstraint("hostname"),
    )


def downgrade() -> None:
    op.drop_table("worker_hosts")
