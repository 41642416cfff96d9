"""``GET /metrics`` reads its numbers from the database at scrape time, so they are the
same from any API process; a scrape never fails because PostgreSQL or Redis is away."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.orm import sessionmaker

from api_stub.routes.metrics import registry_for
from tests.support.api import create
from tests.support.drains import drain
from tests.support.events import session_for
from tests.support.factories import Caller
from tests.support.rows import sql, sql_exec
from tests.support.sessions import kick
from tests.support.webhooks import Receiver
from worker.config import Settings, get_settings
from worker.db.engine import get_sessionmaker
from worker.domain.lifecycle import OutcomeStatus, RunKind
from worker.services import quotas, retention, sweep_stats, webhooks
from worker.services.lifecycle import LifecycleService

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def parse(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def scrape(client: TestClient) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse(r.text)


def test_numbers_come_from_the_database(client: TestClient, caller: Caller) -> None:
    sql_exec("DELETE FROM sweep_runs")
    ids = [create(client, caller)["session"]["id"] for _ in range(4)]
    # Their provision jobs are published by the process's publisher thread.
    assert client.app.state.background_publisher.flush(timeout=30)  # type: ignore[attr-defined]
    lease = get_settings().lease_seconds
    now = datetime.now(UTC)
    # active with a live lease taken 40 s ago; failed; active with an expired lease; one
    # left provisioning
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', lifecycle_run_id = gen_random_uuid(),"
        " lease_expires_at = :exp WHERE id = :id",
        exp=now + timedelta(seconds=lease - 40),
        id=ids[0],
    )
    sql_exec("UPDATE sessions SET lifecycle_state = 'failed' WHERE id = :id", id=ids[1])
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', lifecycle_run_id = gen_random_uuid(),"
        " lease_expires_at = :exp WHERE id = :id",
        exp=now - timedelta(seconds=5),
        id=ids[2],
    )
    # runs: a provision that took 0.3 s, one that failed after 7 s, one skipped, one queued
    durations = {ids[0]: ("succeeded", 0.3), ids[1]: ("failed", 7.0), ids[2]: ("skipped", None)}
    for sid, (state, seconds) in durations.items():
        sql_exec(
            "UPDATE lifecycle_runs SET state = :state, started_at = :start, finished_at = :end"
            " WHERE session_id = :sid",
            state=state,
            start=now - timedelta(seconds=10) if seconds is not None else None,
            end=now - timedelta(seconds=10 - seconds) if seconds is not None else now,
            sid=sid,
        )
    # an outbox record the broker never took, two minutes old
    sql_exec(
        "INSERT INTO outbox (task_name, payload, created_at, attempts)"
        " VALUES ('lifecycle.start', '{}'::jsonb, :at, 0)",
        at=now - timedelta(seconds=120),
    )
    factory = get_sessionmaker()
    for items in (3, 4):
        sweep_stats.record(
            factory,
            "sweeps.relay_outbox",
            started_at=now - timedelta(seconds=1),
            finished_at=now - timedelta(seconds=0.75),
            result={"published": items, "failed": 0},
        )
    sweep_stats.record(
        factory,
        "sweeps.reap_runs",
        started_at=now,
        finished_at=now,
        result=None,
        error="OperationalError: cannot reach postgresql://u:hunter2@db/x",
    )

    m = scrape(client)
    assert m["lifecycle_database_up"][()] == 1
    states = {labels[0][1]: v for labels, v in m["lifecycle_sessions"].items()}
    assert states["active"] == 2 and states["failed"] == 1 and states["provisioning"] == 1
    assert states["hibernated"] == 0 and sum(states.values()) == 4

    runs = m["lifecycle_runs_total"]
    assert runs[(("kind", "provision"), ("outcome", "succeeded"))] == 1
    assert runs[(("kind", "provision"), ("outcome", "failed"))] == 1
    assert runs[(("kind", "provision"), ("outcome", "skipped"))] == 1
    assert m["lifecycle_runs_open"][(("kind", "provision"), ("state", "queued"))] == 1
    by_db = dict(sql("SELECT state, count(*) FROM lifecycle_runs GROUP BY state"))
    assert sum(runs.values()) == sum(v for k, v in by_db.items() if k != "queued")

    buckets = m["lifecycle_run_duration_seconds_bucket"]
    assert buckets[(("kind", "provision"), ("le", "0.25"))] == 0
    assert buckets[(("kind", "provision"), ("le", "0.5"))] == 1
    assert buckets[(("kind", "provision"), ("le", "5.0"))] == 1
    assert buckets[(("kind", "provision"), ("le", "10.0"))] == 2
    assert buckets[(("kind", "provision"), ("le", "+Inf"))] == 2
    assert m["lifecycle_run_duration_seconds_count"][(("kind", "provision"),)] == 2
    assert m["lifecycle_run_duration_seconds_sum"][(("kind", "provision"),)] == pytest.approx(7.3)
    assert m["lifecycle_run_duration_seconds_count"][(("kind", "diff"),)] == 0

    assert m["lifecycle_outbox_backlog"][()] == 1
    assert 119 <= m["lifecycle_outbox_oldest_age_seconds"][()] < 180
    assert m["lifecycle_leases_live"][()] == 1
    assert m["lifecycle_leases_expired"][()] == 1
    assert 39 <= m["lifecycle_lease_oldest_age_seconds"][()] < 100

    relay = (("sweep", "sweeps.relay_outbox"),)
    assert m["lifecycle_sweep_duration_seconds_count"][relay] == 2
    assert m["lifecycle_sweep_duration_seconds_sum"][relay] == pytest.approx(0.5)
    assert m["lifecycle_sweep_items_total"][relay] == 7
    assert m["lifecycle_sweep_last_items"][relay] == 4
    assert m["lifecycle_sweep_errors_total"][(("sweep", "sweeps.reap_runs"),)] == 1
    (last_error,) = sql("SELECT last_error FROM sweep_runs WHERE name = 'sweeps.reap_runs'")[0]
    assert "hunter2" not in last_error

    assert m["lifecycle_broker_up"][()] == 1
    assert (("queue", "lifecycle"),) in m["lifecycle_broker_queue_length"]


def test_a_scrape_survives_database_and_broker_outages(server_urls: dict[str, str]) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0")
    dead = create_engine(
        "postgresql+psycopg://nobody@127.0.0.1:1/none", connect_args={"connect_timeout": 1}
    )
    m = parse(generate_latest(registry_for(settings, sessionmaker(dead))).decode())
    assert m["lifecycle_database_up"][()] == 0
    assert "lifecycle_sessions" not in m
    assert m["lifecycle_broker_up"][()] == 0


def test_no_queue_length_for_non_redis_brokers(server_urls: dict[str, str]) -> None:
    settings = Settings(broker_url="amqp://guest:guest@127.0.0.1:1//")
    m = parse(generate_latest(registry_for(settings)).decode())
    assert m["lifecycle_database_up"][()] == 1
    assert "lifecycle_broker_up" not in m and "lifecycle_broker_queue_length" not in m


def test_webhook_deliveries_retention_actions_and_quota_refusals(
    client: TestClient, caller: Caller, svc: LifecycleService, api_app: FastAPI
) -> None:
    def value(samples: Samples, name: str, **labels: str) -> float:
        return samples[name][tuple(sorted(labels.items()))]

    before = scrape(client)
    for outcome in ("queued", "succeeded", "failed", "waiting", "cancelled", "sending"):
        assert value(before, "lifecycle_webhook_deliveries", outcome=outcome) == 0
    assert value(before, "lifecycle_retention_actions_total", action="archived") == 0
    assert value(before, "lifecycle_quota_refusals_total", quota="active_sandboxes", at="api") == 0

    # Deliveries: every event of a session's life to a receiver that answers 200.
    settings = get_settings().model_copy(update={"webhook_allow_private": True})
    previous, api_app.state.settings = api_app.state.settings, settings
    receiver = Receiver()
    try:
        hook = client.post("/api/webhooks", json={"url": receiver.url}, headers=caller.headers)
        assert hook.status_code == 201, hook.text
        kept = session_for(
            client, caller, svc, autoArchiveAfterSeconds=60, autoDeleteAfterSeconds=60
        )
        drain(svc, uuid.UUID(kept))
        queued = value(scrape(client), "lifecycle_webhook_deliveries", outcome="queued")
        assert queued > 0
        for (delivery,) in sql("SELECT id FROM webhook_deliveries WHERE state = 'queued'"):
            assert webhooks.deliver(get_sessionmaker(), settings, delivery) == "succeeded"
    finally:
        receiver.close()
        api_app.state.settings = previous
    got = scrape(client)
    assert value(got, "lifecycle_webhook_deliveries", outcome="succeeded") == queued
    assert value(got, "lifecycle_webhook_deliveries", outcome="queued") == 0

    # Retention: archived by the sweep, then emptied.
    assert client.post(f"/api/sessions/{kept}/hibernate", headers=caller.headers).status_code == 202
    drain(svc, uuid.UUID(kept))
    sql_exec("UPDATE sessions SET updated_at = now() - interval '61 s'")
    assert retention.sweep(svc) == {"archived": 1, "deleted": 0}
    drain(svc, uuid.UUID(kept))
    assert value(scrape(client), "lifecycle_retention_actions_total", action="archived") == 1
    sql_exec("UPDATE sessions SET archived_at = now() - interval '61 s' WHERE id = :id", id=kept)
    assert retention.sweep(svc) == {"archived": 0, "deleted": 1}
    got = scrape(client)
    assert value(got, "lifecycle_retention_actions_total", action="deleted") == 1
    assert value(got, "lifecycle_retention_actions_total", action="archived") == 1

    # Quota refusals: a 429 (its transaction rolled back) and a refused claim.
    other = session_for(client, caller, svc)
    drain(svc, uuid.UUID(other))
    with get_sessionmaker().begin() as db:
        quotas.set_limits(db, caller.account_id, active_sandboxes=1, sessions=None)
    assert client.post("/api/sessions", headers=caller.headers).status_code == 429
    assert (
        client.post(f"/api/sessions/{other}/hibernate", headers=caller.headers).status_code == 202
    )
    drain(svc, uuid.UUID(other))
    with get_sessionmaker().begin() as db:
        quotas.set_limits(db, caller.account_id, active_sandboxes=0, sessions=None)
    kick(svc, uuid.UUID(other), RunKind.START)  # as the CLI queues it: no 429 up front
    assert drain(svc, uuid.UUID(other)) == [OutcomeStatus.FAILED]
    got = scrape(client)
    assert value(got, "lifecycle_quota_refusals_total", quota="active_sandboxes", at="api") == 1
    assert value(got, "lifecycle_quota_refusals_total", quota="active_sandboxes", at="claim") == 1
    assert value(got, "lifecycle_quota_refusals_total", quota="sessions", at="api") == 0
