"""The active-sandbox cap held inside the claim of a start: a start queued without the
API's check (the CLI's and the services' kick, a reaper re-queue, a chained start) fails
with the limit and the count instead of starting a sandbox over the cap, and 20
concurrent claims of one account with a cap of 2 start exactly 2."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

from tests.support.drains import deliver, drain, next_job
from tests.support.factories import make_caller
from tests.support.rows import sql
from tests.support.sessions import kick, load_run, load_session, new_session
from worker.domain.lifecycle import OutcomeStatus, RunKind
from worker.services import quotas
from worker.services.lifecycle import LifecycleService, Outcome

REFUSED_2 = "Active sandbox limit reached (2 of 2); hibernate one first"


def _limit(svc: LifecycleService, account: uuid.UUID, sandboxes: int | None) -> None:
    with svc.factory.begin() as db:
        quotas.set_limits(db, account, active_sandboxes=sandboxes, sessions=None)


def _hibernated(svc: LifecycleService, account: uuid.UUID) -> uuid.UUID:
    """A session provisioned, started and hibernated for real (its snapshot taken)."""
    sid = new_session(svc, account_id=account)
    drain(svc, sid)
    kick(svc, sid, RunKind.HIBERNATE)
    drain(svc, sid)
    assert load_session(svc, sid).lifecycle_state == "hibernated"
    return sid


def _refusals(sid: uuid.UUID) -> list[tuple[str, dict[str, object]]]:
    rows = sql(
        "SELECT reason, data FROM events WHERE type = 'quota.refused' AND session_id = :s",
        s=sid,
    )
    return [(r[0], r[1]) for r in rows]


def test_a_start_queued_past_the_api_fails_with_the_limit(svc: LifecycleService) -> None:
    account = make_caller().account_id
    running = [new_session(svc, account_id=account) for _ in range(2)]
    for sid in running:
        drain(svc, sid)
    waiting = _hibernated(svc, account)
    _limit(svc, account, 2)
    # As `lifecycle sessions kick ID start` queues it: no 429 up front.
    run = kick(svc, waiting, RunKind.START).run
    assert run is not None and run.state == "queued"
    job = next_job(svc, waiting)
    assert job is not None
    outcome = deliver(svc, job)
    assert outcome.status == OutcomeStatus.FAILED and outcome.reason == REFUSED_2
    finished = load_run(svc, run.id)
    assert finished.state == "failed" and finished.error == REFUSED_2
    s = load_session(svc, waiting)
    # Not left waiting: the run is over, the session rests where it was, saying why.
    assert s.lifecycle_state == "hibernated" and s.lifecycle_error == REFUSED_2
    assert s.lifecycle_version == job["version"] + 1 and s.lifecycle_run_id is None
    assert s.snapshot_url is not None
    assert _refusals(waiting) == [
        (
            f"start refused: {REFUSED_2}",
            {"at": "claim", "kind": "start", "limit": 2, "quota": "active_sandboxes", "current": 2},
        )
    ]
    # A redelivery of the finished run does nothing; with a slot free, a new start runs.
    assert deliver(svc, job).status == OutcomeStatus.SKIPPED
    kick(svc, running[0], RunKind.HIBERNATE)
    drain(svc, running[0])
    kick(svc, waiting, RunKind.START)
    assert drain(svc, waiting) == [OutcomeStatus.SUCCEEDED]
    s = load_session(svc, waiting)
    assert s.lifecycle_state == "active" and s.lifecycle_error is None


def test_20_concurrent_start_claims_with_a_cap_of_2(svc: LifecycleService) -> None:
    account = make_caller().account_id
    ids = [_hibernated(svc, account) for _ in range(20)]
    _limit(svc, account, 2)
    jobs = []
    for sid in ids:
        kick(svc, sid, RunKind.START)
        job = next_job(svc, sid)
        assert job is not None
        jobs.append(job)
    gate = threading.Barrier(len(jobs))

    def claim(job: dict[str, object]) -> Outcome:
        gate.wait()
        return deliver(svc, job)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        outcomes = list(pool.map(claim, jobs))
    statuses = sorted(o.status.value for o in outcomes)
    assert statuses == ["failed"] * 18 + ["succeeded"] * 2, statuses
    assert {o.reason for o in outcomes if o.status == OutcomeStatus.FAILED} == {REFUSED_2}
    states = sql(
        "SELECT lifecycle_state, lifecycle_error, count(*) FROM sessions WHERE user_id = :a"
        " GROUP BY 1, 2 ORDER BY 1",
        a=account,
    )
    assert [tuple(r) for r in states] == [("active", None, 2), ("hibernated", REFUSED_2, 18)]
    runs = sql(
        "SELECT state, error, count(*) FROM lifecycle_runs WHERE kind = 'start'"
        " AND trigger <> 'chain' GROUP BY 1, 2 ORDER BY 1"
    )
    assert [tuple(r) for r in runs] == [("failed", REFUSED_2, 18), ("succeeded", None, 2)]
