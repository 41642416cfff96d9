"""sweep_runs: last run and running totals of each scheduled sweep (for /metrics)

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "sweep_runs",
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("runs_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("errors_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("items_total", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "duration_seconds_total", sa.Float(), server_default=sa.text("0"), nullable=False
        ),
        sa.Column("last_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_duration_seconds", sa.Float(), nullable=True),
        sa.Column("last_items", sa.Integer(), nullable=True),
        sa.Column("last_result", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_sweep_runs")),
    )


def downgrade() -> None:
    op.drop_table("sweep_runs")
