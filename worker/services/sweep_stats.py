"""What the scheduled sweeps did, kept in the database so every process reports it.

Each sweep run upserts one row of ``sweep_runs`` (its last run and running totals);
``/metrics`` reads the table at scrape time, so the numbers are the same whichever
API process answers and whichever worker ran the sweep.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session, sessionmaker

from worker.db.models import SweepRunRecord
from worker.logging import redact_text


def items_of(result: Mapping[str, Any]) -> int:
    """The items a sweep handled: the sum of the counts in its result."""
    return sum(v for v in result.values() if isinstance(v, int) and not isinstance(v, bool))


def record(
    factory: sessionmaker[Session],
    name: str,
    *,
    started_at: datetime,
    finished_at: datetime,
    result: Mapping[str, Any] | None,
    error: str | None = None,
) -> None:
    """Add one run of sweep ``name`` to its row (one short transaction, an upsert)."""
    duration = max(0.0, (finished_at - started_at).total_seconds())
    items = items_of(result) if result is not None else 0
    failed = 1 if error is not None else 0
    last_error = redact_text(error)[:500] if error is not None else None
    table = SweepRunRecord.__table__
    stmt = insert(SweepRunRecord).values(
        name=name,
        runs_total=1,
        errors_total=failed,
        items_total=items,
        duration_seconds_total=duration,
        last_started_at=started_at,
        last_finished_at=finished_at,
        last_duration_seconds=duration,
        last_items=items,
        last_result=dict(result) if result is not None else None,
        last_error=last_error,
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[table.c.name],
        set_={
            "runs_total": table.c.runs_total + 1,
            "errors_total": table.c.errors_total + failed,
            "items_total": table.c.items_total + items,
            "duration_seconds_total": table.c.duration_seconds_total + duration,
            "last_started_at": stmt.excluded.last_started_at,
            "last_finished_at": stmt.excluded.last_finished_at,
            "last_duration_seconds": stmt.excluded.last_duration_seconds,
            "last_items": stmt.excluded.last_items,
            "last_result": stmt.excluded.last_result,
            "last_error": stmt.excluded.last_error,
        },
    )
    with factory.begin() as db:
        db.execute(stmt)


def all_sweeps(db: Session) -> list[SweepRunRecord]:
    return list(db.scalars(select(SweepRunRecord).order_by(SweepRunRecord.name)))
