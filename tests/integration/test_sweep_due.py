"""The idle sweep takes exactly the due sessions, over its index, once even when two
sweeps run at the same time."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects import postgresql

from tests.support.factories import make_account
from tests.support.lifecycle import make_service
from worker.config import get_settings
from worker.db.engine import get_sessionmaker
from worker.db.models import LifecycleRunRecord
from worker.services.sweeps import due_candidates_query, hibernate_idle


def _seed(total: int, due: int) -> set[uuid.UUID]:
    """``total`` active sessions, of which ``due`` are past their idle deadline."""
    owner = make_account("sweep-owner")
    with get_sessionmaker().begin() as db:
        db.execute(
            text(
                """
                INSERT INTO sessions (id, user_id, title, lifecycle_state, lifecycle_version,
                    repo_owner, repo_name, branch, sandbox_state, last_activity_at,
                    hibernate_after, sandbox_expires_at, created_at, updated_at)
                SELECT gen_random_uuid(), :owner, 'bulk ' || g, 'active', 2,
                    'recoupable', :owner_text, 'session/' || g, '{"type": "local"}',
                    now() - interval '1 hour',
                    CASE WHEN g <= :due THEN now() - interval '1 minute' * g
                         ELSE now() + interval '1 hour' END,
                    now() + interval '4 hours', now(), now()
                FROM generate_series(1, :total) AS g
                """
            ),
            {"owner": owner, "owner_text": str(owner), "due": due, "total": total},
        )
        # Noise the sweep must ignore: hibernated and provisioning sessions past the deadline.
        db.execute(
            text(
                """
                INSERT INTO sessions (id, user_id, title, lifecycle_state, lifecycle_version,
                    hibernate_after, created_at, updated_at)
                SELECT gen_random_uuid(), :owner, 'resting ' || g,
                    CASE WHEN g % 2 = 0 THEN 'hibernated' ELSE 'provisioning' END, 3,
                    now() - interval '1 day', now(), now()
                FROM generate_series(1, 500) AS g
                """
            ),
            {"owner": owner},
        )
        db.execute(text("ANALYZE sessions"))
        rows = db.execute(
            text(
                "SELECT id FROM sessions WHERE lifecycle_state = 'active' AND hibernate_after <= now()"
            )
        )
        return {r[0] for r in rows}


def _hibernate_runs() -> list[Any]:
    with get_sessionmaker()() as db:
        return list(
            db.execute(
                select(LifecycleRunRecord.session_id, LifecycleRunRecord.trigger).where(
                    LifecycleRunRecord.kind == "hibernate"
                )
            )
        )


def test_one_sweep_takes_the_due_sessions_and_no_others(
    db_clean: dict[str, str], redis_client: Any
) -> None:
    due = _seed(10_000, 100)
    assert len(due) == 100
    result = hibernate_idle(make_service())
    assert result == {"queued": 100}
    runs = _hibernate_runs()
    assert {r.session_id for r in runs} == due
    assert {r.trigger for r in runs} == {"sweep"}
    assert redis_client.llen("lifecycle") == 100  # type: ignore[attr-defined]
    # Nothing more is due while those runs are open.
    assert hibernate_idle(make_service()) == {"queued": 0}
    assert len(_hibernate_runs()) == 100


def test_the_due_query_uses_its_index(db_clean: dict[str, str]) -> None:
    _seed(10_000, 100)
    settings = get_settings()
    stmt = due_candidates_query(settings.hibernate_guard_seconds, settings.sweep_batch_size)
    sql = str(stmt.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True}))
    with get_sessionmaker()() as db:
        plan = "\n".join(r[0] for r in db.execute(text("EXPLAIN " + sql)))
    assert "ix_sessions_hibernate_due" in plan, plan
    assert "Seq Scan on sessions" not in plan, plan


def test_two_sweeps_at_once_queue_each_session_once(
    db_clean: dict[str, str], redis_client: Any
) -> None:
    due = _seed(2_000, 300)
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(2)

    def sweep() -> None:
        svc = make_service()
        barrier.wait()
        results.append(hibernate_idle(svc))

    threads = [threading.Thread(target=sweep) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(r["queued"] for r in results) == 300
    runs = _hibernate_runs()
    assert len(runs) == 300 and {r.session_id for r in runs} == due
    with get_sessionmaker()() as db:
        assert db.scalar(select(func.count()).select_from(LifecycleRunRecord)) == 300


def test_the_sweep_skips_live_stream_claims_and_takes_expired_ones(
    db_clean: dict[str, str], redis_client: Any
) -> None:
    due = sorted(_seed(3, 3))
    live, expired, renewed = due
    with get_sessionmaker().begin() as db:
        for sid, expires in (
            (live, "now() + interval '1 minute'"),
            (expired, "now() - interval '1 second'"),
            (renewed, "now() + interval '30 seconds'"),
        ):
            db.execute(
                text(
                    "INSERT INTO chats (id, session_id, title, active_stream_id,"
                    " stream_claimed_at, stream_expires_at, created_at, updated_at)"
                    f" VALUES (gen_random_uuid(), :sid, 'c', 'turn', now(), {expires},"
                    " now(), now())"
                ),
                {"sid": sid},
            )
    # A claim never released expires: the session is taken. Live claims keep theirs.
    assert hibernate_idle(make_service()) == {"queued": 1}
    assert {r.session_id for r in _hibernate_runs()} == {expired}
    # The claim that kept its heartbeat stops doing so: it expires, and the next sweep
    # takes that session too.
    with get_sessionmaker().begin() as db:
        db.execute(
            text(
                "UPDATE chats SET stream_expires_at = now() - interval '1 second'"
                " WHERE session_id = :sid"
            ),
            {"sid": renewed},
        )
    assert hibernate_idle(make_service()) == {"queued": 1}
    assert {r.session_id for r in _hibernate_runs()} == {expired, renewed}
