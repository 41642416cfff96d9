"""Rows read (and, where a test sets a scene, written) straight through the run's engine,
beside the code under test: what a request or a run left behind, counted or queried."""

from __future__ import annotations

from typing import Any

from sqlalchemy import text

#: Every table a create/patch/kick may write to.
WRITE_TABLES = ("sessions", "chats", "outbox", "lifecycle_runs", "idempotency_keys")


def row_counts() -> dict[str, int]:
    """Rows in every table a request may write to (read through a fresh connection)."""
    from worker.db.engine import get_engine

    with get_engine().connect() as conn:
        return {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in WRITE_TABLES
        }


def sql(query: str, **params: Any) -> list[Any]:
    """Run a read-only query and return its rows."""
    from worker.db.engine import get_engine

    with get_engine().connect() as conn:
        return list(conn.execute(text(query), params).all())


def sql_exec(query: str, **params: Any) -> None:
    """Run a statement in its own committed transaction (to set up a scene)."""
    from worker.db.engine import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(query), params)
