"""The hot path's statements agree with their Python rules (real PostgreSQL)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from worker.db import statements
from worker.db.engine import get_engine
from worker.domain.lifecycle import RunKind, hibernate_due_at


def _driver_sql(sql: str, params: dict[str, Any]) -> Any:
    with get_engine().connect() as conn:
        return conn.exec_driver_sql(sql, params).fetchone()


def test_the_sql_job_payload_is_the_one_job_for_builds(server_urls: dict[str, str]) -> None:
    sid, rid = uuid.uuid4(), uuid.uuid4()
    job = statements.job_for(RunKind.DIFF, sid, rid, 7, None)
    sql = "SELECT " + statements.JOB_PAYLOAD_SQL.format(run_id="%(rid)s")
    (payload,) = _driver_sql(sql, {"sid": sid, "rid": rid, "version": 7})
    assert payload["kwargs"] == job.kwargs
    assert set(payload) == set(job.payload)
    uuid.UUID(payload["task_id"])


NOW = datetime.now(UTC)
GUARD = timedelta(seconds=60)
CASES = [
    (NOW - timedelta(seconds=5), NOW + timedelta(hours=5)),  # idle deadline passed
    (NOW + timedelta(seconds=30), NOW + timedelta(hours=5)),  # not yet idle
    (NOW + timedelta(hours=1), NOW + timedelta(seconds=30)),  # lifetime within the guard
    (NOW + timedelta(hours=1), NOW + timedelta(seconds=120)),  # lifetime beyond the guard
    (None, NOW + timedelta(seconds=10)),
    (NOW - timedelta(seconds=1), None),
    (None, None),
]


@pytest.mark.parametrize(("hibernate_after", "expires_at"), CASES)
def test_the_sql_due_rule_is_the_domain_rule(
    server_urls: dict[str, str], hibernate_after: datetime | None, expires_at: datetime | None
) -> None:
    rule = statements.DUE_RULE.format(guard="%(guard)s")
    sql = (
        f"SELECT coalesce({rule}, false) FROM (SELECT %(ha)s::timestamptz AS hibernate_after,"
        " %(se)s::timestamptz AS sandbox_expires_at) AS s"
    )
    (due_in_sql,) = _driver_sql(sql, {"ha": hibernate_after, "se": expires_at, "guard": GUARD})
    due_at = hibernate_due_at(hibernate_after, expires_at, GUARD)
    assert due_in_sql == (due_at is not None and due_at <= datetime.now(UTC))
