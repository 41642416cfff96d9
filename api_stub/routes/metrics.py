"""``GET /metrics``: Prometheus text, computed from the database at scrape time.

Every number is read from PostgreSQL (and the broker) when scraped, not counted in
process memory, so it is the same whichever API process answers and however many
workers there are: sessions by lifecycle state, runs by kind and outcome, run
durations, the outbox backlog, live leases, what the sweeps did, webhook deliveries,
retention actions, quota refusals, the broker queue.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db.engine import get_sessionmaker
from worker.domain.lifecycle import FINISHED_RUN_STATES, OPEN_RUN_STATES, LifecycleState, RunKind
from worker.logging import get_logger
from worker.routing import host_queue
from worker.services import hosts, outbox, sweep_stats
from worker.task_names import DEFAULT_QUEUE

log = get_logger(__name__)

router = APIRouter(tags=["operations"])

# Upper bounds (seconds) of the run duration histogram.
RUN_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Runs by kind and state, and (in the same pass) those the retention sweep queued.
_RUN_COUNTS = text(
    "SELECT kind, state, count(*), count(*) FILTER (WHERE trigger = 'retention')"
    " FROM lifecycle_runs GROUP BY kind, state"
)
_DELIVERIES = text("SELECT state, count(*) FROM webhook_deliveries GROUP BY state")
# Over the partial index ix_events_counted (migration 0013).
_AUTO_DELETES = text("SELECT count(*) FROM events WHERE type = 'sweep.auto_delete'")
_QUOTA_REFUSALS = text(
    "SELECT data ->> 'quota', data ->> 'at', count(*) FROM events"
    " WHERE type = 'quota.refused' GROUP BY 1, 2"
)
#: Every state of a webhook delivery (services/webhooks.py), each reported even at 0.
DELIVERY_OUTCOMES = ("queued", "sending", "waiting", "succeeded", "failed", "cancelled")
QUOTAS = ("active_sandboxes", "sessions")
QUOTA_CHECKS = ("api", "claim")
# Durations of finished runs, bucketed in SQL (one pass, one row per kind).
_RUN_DURATIONS = text(
    "SELECT kind, "
    + ", ".join(f"count(*) FILTER (WHERE d <= {b})" for b in RUN_DURATION_BUCKETS)
    + ", count(*), coalesce(sum(d), 0) FROM ("
    " SELECT kind, extract(epoch FROM finished_at - started_at)::float8 AS d"
    " FROM lifecycle_runs"
    " WHERE finished_at IS NOT NULL AND started_at IS NOT NULL"
    " AND state IN ('succeeded', 'failed')"
    ") AS finished GROUP BY kind"
)
_SESSION_STATES = text("SELECT lifecycle_state, count(*) FROM sessions GROUP BY lifecycle_state")
# Live leases, over the partial index ix_sessions_lease_expiry.
_LEASES = text(
    "SELECT count(*) FILTER (WHERE lease_expires_at >= now()),"
    " count(*) FILTER (WHERE lease_expires_at < now()),"
    " extract(epoch FROM now() - min(lease_expires_at) FILTER (WHERE lease_expires_at >= now()))"
    "::float8"
    " FROM sessions WHERE lifecycle_run_id IS NOT NULL"
)


class DatabaseCollector(Collector):
    """Reads every metric from the database (and the broker) on each scrape."""

    def __init__(self, settings: Settings, factory: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self._factory = factory
        self._redis: Any = None

    @property
    def factory(self) -> sessionmaker[Session]:
        return self._factory or get_sessionmaker()

    def describe(self) -> list[Metric]:
        return []  # unchecked collector: families are only known after a query

    def collect(self) -> Iterator[Metric]:
        database_up = GaugeMetricFamily(
            "lifecycle_database_up", "1 if the metrics queries reached the database."
        )
        try:
            with self.factory() as db:
                families = list(self._from_database(db))
        except Exception as exc:  # report what we can; a scrape must not 500
            log.warning("metrics.database_unavailable", error=type(exc).__name__)
            database_up.add_metric([], 0)
            families = []
        else:
            database_up.add_metric([], 1)
        yield database_up
        yield from families
        yield from self._from_broker()

    @staticmethod
    def _hosts(db: Session) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "lifecycle_worker_host_up", "1 while a worker host beats, 0 once lost.", labels=["host"]
        )
        age = GaugeMetricFamily(
            "lifecycle_worker_host_heartbeat_age_seconds",
            "Seconds since the host's last heartbeat.",
            labels=["host"],
        )
        recovered = GaugeMetricFamily(
            "lifecycle_worker_host_sessions_recovered",
            "Sessions set back to a checkpoint when the host was last declared lost.",
            labels=["host"],
        )
        for row in hosts.host_rows(db):
            up.add_metric([row["hostname"]], 1 if row["state"] == "alive" else 0)
            age.add_metric([row["hostname"]], row["beat_age_seconds"])
            recovered.add_metric([row["hostname"]], row["sessions_recovered"])
        yield up
        yield age
        yield recovered

    # ------------------------------------------------------------------ database
    def _from_database(self, db: Session) -> Iterator[Metric]:
        sessions = GaugeMetricFamily(
            "lifecycle_sessions", "Sessions by lifecycle state.", labels=["state"]
        )
        by_state = {state.value: 0 for state in LifecycleState}
        for state, count in db.execute(_SESSION_STATES):
            by_state[state] = int(count)
        for state, count in sorted(by_state.items()):
            sessions.add_metric([state], count)
        yield sessions
        yield from self._hosts(db)

        finished = {(k.value, s.value): 0 for k in RunKind for s in FINISHED_RUN_STATES}
        open_runs = {(k.value, s.value): 0 for k in RunKind for s in OPEN_RUN_STATES}
        retention_archived = 0
        for kind, state, count, by_retention in db.execute(_RUN_COUNTS):
            target = open_runs if (kind, state) in open_runs else finished
            target[(kind, state)] = int(count)
            if kind == RunKind.ARCHIVE.value and state == "succeeded":
                retention_archived = int(by_retention)
        runs = CounterMetricFamily(
            "lifecycle_runs",
            "Finished lifecycle runs by kind and outcome (from the run history).",
            labels=["kind", "outcome"],
        )
        for (kind, state), count in sorted(finished.items()):
            runs.add_metric([kind, state], count)
        yield runs
        in_flight = GaugeMetricFamily(
            "lifecycle_runs_open",
            "Lifecycle runs not finished yet, by kind and state (pending, queued, running).",
            labels=["kind", "state"],
        )
        for (kind, state), count in sorted(open_runs.items()):
            in_flight.add_metric([kind, state], count)
        yield in_flight

        durations = HistogramMetricFamily(
            "lifecycle_run_duration_seconds",
            "Duration of finished (succeeded or failed) runs, first claim to outcome, by kind.",
            labels=["kind"],
        )
        seen: set[str] = set()
        for row in db.execute(_RUN_DURATIONS):
            kind, counts = row[0], [int(c) for c in row[1 : len(RUN_DURATION_BUCKETS) + 1]]
            total, total_sum = int(row[-2]), float(row[-1])
            buckets = [(_le(b), c) for b, c in zip(RUN_DURATION_BUCKETS, counts, strict=True)]
            durations.add_metric([kind], [*buckets, ("+Inf", total)], total_sum)
            seen.add(kind)
        for kind in sorted(k.value for k in RunKind if k.value not in seen):
            empty = [(_le(b), 0) for b in RUN_DURATION_BUCKETS]
            durations.add_metric([kind], [*empty, ("+Inf", 0)], 0.0)
        yield durations

        backlog, oldest = outbox.backlog(db)
        yield GaugeMetricFamily(
            "lifecycle_outbox_backlog", "Outbox records not yet published.", value=backlog
        )
        yield GaugeMetricFamily(
            "lifecycle_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox record (0 when there is none).",
            value=max(0.0, oldest or 0.0),
        )

        live, expired, to_expiry = db.execute(_LEASES).one()
        # A lease is taken for lease_seconds; its age is how long ago that was.
        oldest_lease = 0.0
        if to_expiry is not None:
            oldest_lease = max(0.0, self.settings.lease_seconds + float(to_expiry))
        yield GaugeMetricFamily(
            "lifecycle_leases_live", "Sessions held by a run whose lease is live.", value=live
        )
        yield GaugeMetricFamily(
            "lifecycle_leases_expired",
            "Sessions whose run lease expired and was not reaped yet.",
            value=expired,
        )
        yield GaugeMetricFamily(
            "lifecycle_lease_oldest_age_seconds",
            "Age of the oldest live lease (0 when there is none).",
            value=oldest_lease,
        )

        yield from _sweep_metrics(sweep_stats.all_sweeps(db))
        yield from _actions(db, retention_archived)

    # ------------------------------------------------------------------ broker
    def _from_broker(self) -> Iterator[Metric]:
        url = self.settings.broker_url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return  # queue length is only read from Redis brokers
        up = GaugeMetricFamily("lifecycle_broker_up", "1 if the broker answered the scrape.")
        queue = GaugeMetricFamily(
            "lifecycle_broker_queue_length",
            "Messages waiting in the broker, by queue.",
            labels=["queue"],
        )
        try:
            lengths = self._queue_lengths()
        except Exception as exc:
            log.warning("metrics.broker_unavailable", error=type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, length in sorted(lengths.items()):
            queue.add_metric([name], length)
        yield queue

    def _queue_lengths(self) -> dict[str, int]:
        import redis

        if self._redis is None:
            self._redis = redis.Redis.from_url(
                self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2
            )
        client = self._redis
        # Celery keeps each Redis queue as a list named after it: the default queue and
        # the per-host queues (lifecycle.host.<hostname>).
        names = {DEFAULT_QUEUE, host_queue()}
        for key in client.scan_iter(match=f"{DEFAULT_QUEUE}.host.*", count=1000, _type="list"):
            names.add(key.decode() if isinstance(key, bytes) else str(key))
            if len(names) > 200:
                break
        pipe = client.pipeline(transaction=False)
        ordered = sorted(names)
        for name in ordered:
            pipe.llen(name)
        return {name: int(n) for name, n in zip(ordered, pipe.execute(), strict=True)}


def _actions(db: Session, retention_archived: int) -> Iterator[Metric]:
    """Webhook deliveries by outcome, retention actions, quota refusals."""
    deliveries = GaugeMetricFamily(
        "lifecycle_webhook_deliveries",
        "Webhook deliveries by state: queued, sending, waiting (a retry is due later),"
        " succeeded, failed (the retry schedule ran out), cancelled (endpoint disabled).",
        labels=["outcome"],
    )
    by_state = dict.fromkeys(DELIVERY_OUTCOMES, 0)
    for state, count in db.execute(_DELIVERIES):
        by_state[state] = int(count)
    for state, count in by_state.items():
        deliveries.add_metric([state], count)
    yield deliveries
    retention = CounterMetricFamily(
        "lifecycle_retention_actions",
        "What the retention sweep did: sessions archived (their archive run succeeded) and"
        " archived sessions whose snapshots and sandbox data were deleted.",
        labels=["action"],
    )
    retention.add_metric(["archived"], retention_archived)
    retention.add_metric(["deleted"], int(db.execute(_AUTO_DELETES).scalar_one()))
    yield retention
    refusals = CounterMetricFamily(
        "lifecycle_quota_refusals",
        "Requests and runs refused by a per-account quota, by quota and where it was"
        " checked (api: a 429; claim: a queued start or provision that failed).",
        labels=["quota", "at"],
    )
    counts = {(q, at): 0 for q in QUOTAS for at in QUOTA_CHECKS}
    for quota, at, count in db.execute(_QUOTA_REFUSALS):
        counts[(str(quota), str(at))] = int(count)
    for (quota, at), count in sorted(counts.items()):
        refusals.add_metric([quota, at], count)
    yield refusals


def _le(bound: float) -> str:
    return repr(float(bound))


def _sweep_metrics(rows: list[Any]) -> Iterator[Metric]:
    now = datetime.now(UTC)
    duration = SummaryMetricFamily(
        "lifecycle_sweep_duration_seconds",
        "Time spent in each scheduled sweep (count and sum over all its runs).",
        labels=["sweep"],
    )
    items = CounterMetricFamily(
        "lifecycle_sweep_items",
        "Items handled by each sweep (sessions queued, records published, runs reaped ...).",
        labels=["sweep"],
    )
    errors = CounterMetricFamily(
        "lifecycle_sweep_errors", "Sweep runs that raised, by sweep.", labels=["sweep"]
    )
    last_duration = GaugeMetricFamily(
        "lifecycle_sweep_last_duration_seconds", "Duration of the last run.", labels=["sweep"]
    )
    last_items = GaugeMetricFamily(
        "lifecycle_sweep_last_items", "Items handled by the last run.", labels=["sweep"]
    )
    last_age = GaugeMetricFamily(
        "lifecycle_sweep_last_run_age_seconds",
        "Seconds since the last run finished (a stalled beat shows here).",
        labels=["sweep"],
    )
    for row in rows:
        labels = [row.name]
        duration.add_metric(
            labels, count_value=row.runs_total, sum_value=row.duration_seconds_total
        )
        items.add_metric(labels, row.items_total)
        errors.add_metric(labels, row.errors_total)
        last_duration.add_metric(labels, row.last_duration_seconds or 0.0)
        last_items.add_metric(labels, row.last_items or 0)
        if row.last_finished_at is not None:
            last_age.add_metric(labels, max(0.0, (now - row.last_finished_at).total_seconds()))
    yield from (duration, items, errors, last_duration, last_items, last_age)


def registry_for(
    settings: Settings, factory: sessionmaker[Session] | None = None
) -> CollectorRegistry:
    """A registry holding only the database collector (one per app, never the global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(settings, factory))
    return registry


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
)
def metrics(request: Request) -> Response:
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = registry_for(request.app.state.settings)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
