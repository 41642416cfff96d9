"""Webhooks: endpoints per account and the at-least-once delivery of events to them.

A delivery is made in the event's transaction (trigger of migration 0008) with its
outbox job, so an event that happened is an event that will be delivered. The task
``lifecycle.webhook_deliver`` runs :func:`deliver`: take the delivery (a lease, so two
copies of one job never send at once), POST the event signed as the Standard Webhooks
convention says — ``webhook-id`` (the event id: the same on every retry, to
deduplicate on), ``webhook-timestamp``, ``webhook-signature`` (``v1,`` + base64
HMAC-SHA256 of ``{id}.{timestamp}.{body}`` under the secret's decoded bytes) — and
record the attempt, with no transaction open during the request. A failed attempt
waits ``webhook_retry_seconds[n]`` (±10 %); :func:`retry_due` (a beat sweep) queues it
again when due. An endpoint that has failed for ``webhook_disable_after_seconds``
without a success in between is disabled, its waiting deliveries cancelled, and a
``webhook.disabled`` event says so.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db.event_models import (
    EventRecord,
    WebhookAttemptRecord,
    WebhookDeliveryRecord,
    WebhookRecord,
)
from worker.errors import Forbidden, InvalidInput, NotFound
from worker.logging import get_logger, redact_text
from worker.providers import webhook_http
from worker.services import events, outbox
from worker.task_names import DEFAULT_QUEUE, TASK_WEBHOOK_DELIVER

if TYPE_CHECKING:
    from worker.services.lifecycle import LifecycleService

log = get_logger(__name__)

TASK_DELIVER = TASK_WEBHOOK_DELIVER
SECRET_PREFIX = "whsec_"
MAX_WEBHOOKS = 20
MAX_EVENT_TYPES = 50
#: A worker holds a delivery this long beyond the request timeout.
LEASE_MARGIN_SECONDS = 30
#: A queued delivery whose job has not run for this long is queued again (lost message).
REQUEUE_AFTER_SECONDS = 15 * 60
_EVENT_TYPE = re.compile(r"^[a-z_]{1,30}\.([a-z_]{1,40}|\*)$")

Post = Callable[..., webhook_http.Answer]


# ----------------------------------------------------------------- signing
def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value (Standard Webhooks, ``v1``)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    signed = f"{msg_id}.{timestamp}.".encode() + body
    return "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()


# ----------------------------------------------------------------- endpoints
def validate_event_types(value: Any) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or len(value) > MAX_EVENT_TYPES:
        raise InvalidInput(
            f"eventTypes must be a list of at most {MAX_EVENT_TYPES} event types",
            missing_fields=["eventTypes"],
        )
    for item in value:
        if not isinstance(item, str) or not _EVENT_TYPE.match(item):
            raise InvalidInput(
                "eventTypes items are event types such as session.hibernated or session.*",
                missing_fields=["eventTypes"],
            )
    return sorted(set(value))


def create_webhook(
    db: Session, settings: Settings, account_id: uuid.UUID, url: Any, event_types: Any
) -> tuple[WebhookRecord, str]:
    """A new endpoint for ``account_id`` and its secret (to show once). The URL must
    resolve to public addresses only, unless the operator allows private targets."""
    if not isinstance(url, str) or not url.strip():
        raise InvalidInput("url is required", missing_fields=["url"])
    types = validate_event_types(event_types)
    try:
        webhook_http.resolve(url.strip(), allow_private=settings.webhook_allow_private)
    except webhook_http.TargetRefused as exc:
        raise InvalidInput(str(exc), missing_fields=["url"]) from None
    count = db.execute(
        text("SELECT count(*) FROM webhooks WHERE account_id = :a"), {"a": account_id}
    ).scalar_one()
    if count >= MAX_WEBHOOKS:
        raise InvalidInput(f"an account may have at most {MAX_WEBHOOKS} webhooks")
    secret = new_secret()
    record = WebhookRecord(
        id=uuid.uuid4(),
        account_id=account_id,
        url=url.strip(),
        event_types=types,
        secret=secret,
        enabled=True,
        created_at=datetime.now(UTC),
    )
    db.add(record)
    db.flush()
    return record, secret


def list_webhooks(db: Session, account_id: uuid.UUID) -> list[WebhookRecord]:
    return list(
        db.scalars(
            select(WebhookRecord)
            .where(WebhookRecord.account_id == account_id)
            .order_by(WebhookRecord.created_at, WebhookRecord.id)
        )
    )


def get_webhook(db: Session, account_id: uuid.UUID, webhook_id: str) -> WebhookRecord:
    """``webhook_id`` of ``account_id``: 404 unknown or malformed, 403 another's."""
    try:
        wid = uuid.UUID(webhook_id)
    except ValueError:
        raise NotFound("Webhook not found") from None
    record = db.get(WebhookRecord, wid)
    if record is None:
        raise NotFound("Webhook not found")
    if record.account_id != account_id:
        raise Forbidden("Forbidden")
    return record


def delete_webhook(db: Session, record: WebhookRecord) -> None:
    """Delete the endpoint with its deliveries (a job still queued finds nothing)."""
    db.delete(record)
    db.flush()


@dataclass
class DeliveryView:
    delivery: WebhookDeliveryRecord
    event_type: str
    attempts: list[WebhookAttemptRecord]


def list_deliveries(
    db: Session, record: WebhookRecord, *, limit: int, before: int | None
) -> tuple[list[DeliveryView], int | None]:
    """Newest first, each with its attempts; the next page's ``before``."""
    stmt = (
        select(WebhookDeliveryRecord, EventRecord.type)
        .join(EventRecord, EventRecord.id == WebhookDeliveryRecord.event_id)
        .where(WebhookDeliveryRecord.webhook_id == record.id)
    )
    if before is not None:
        stmt = stmt.where(WebhookDeliveryRecord.id < before)
    rows = db.execute(stmt.order_by(WebhookDeliveryRecord.id.desc()).limit(limit + 1)).all()
    page = rows[:limit]
    ids = [d.id for d, _ in page]
    attempts: dict[int, list[WebhookAttemptRecord]] = {i: [] for i in ids}
    if ids:
        for a in db.scalars(
            select(WebhookAttemptRecord)
            .where(WebhookAttemptRecord.delivery_id.in_(ids))
            .order_by(WebhookAttemptRecord.id)
        ):
            attempts[a.delivery_id].append(a)
    views = [DeliveryView(d, t, attempts[d.id]) for d, t in page]
    return views, (page[-1][0].id if len(rows) > limit else None)


# ----------------------------------------------------------------- delivery
_TAKE = text(
    """
UPDATE webhook_deliveries SET state = 'sending', lease_until = now() + :lease,
    updated_at = now()
WHERE id = :id AND (state = 'queued' OR (state = 'sending' AND lease_until < now()))
RETURNING webhook_id, event_id, attempts
"""
)


def payload(event: events.Event) -> bytes:
    """The body of a delivery: the event as the API shows it, with ``timestamp``."""
    return json.dumps(
        {
            "id": event.id,
            "type": event.type,
            "timestamp": event.created_at.isoformat(),
            "data": events.event_dict(event),
        },
        separators=(",", ":"),
    ).encode()


def _event(db: Session, event_id: int) -> events.Event | None:
    row = db.get(EventRecord, event_id)
    if row is None:
        return None
    return events.Event(
        row.id,
        row.type,
        row.session_id,
        row.user_id,
        row.organization_id,
        row.run_id,
        row.version,
        row.reason,
        row.data,
        row.created_at,
    )


def deliver(
    factory: sessionmaker[Session],
    settings: Settings,
    delivery_id: int,
    *,
    post: Post = webhook_http.post,
) -> str:
    """One attempt of delivery ``delivery_id``; what happened (``succeeded``,
    ``waiting``, ``failed``, ``cancelled``, ``skipped`` when another worker has it or it
    is done)."""
    lease = timedelta(seconds=settings.webhook_timeout_seconds + LEASE_MARGIN_SECONDS)
    with factory.begin() as db:
        taken = db.execute(_TAKE, {"id": delivery_id, "lease": lease}).first()
        if taken is None:
            return "skipped"
        webhook_id, event_id, attempts = taken
        hook = db.get(WebhookRecord, webhook_id)
        event = _event(db, event_id)
        if hook is None or event is None or not hook.enabled:
            db.execute(
                update(WebhookDeliveryRecord)
                .where(WebhookDeliveryRecord.id == delivery_id)
                .values(state="cancelled", lease_until=None, updated_at=datetime.now(UTC))
            )
            return "cancelled"
        url, secret = hook.url, hook.secret
    body = payload(event)
    stamp = int(time.time())
    headers = {
        "content-type": "application/json",
        "user-agent": "session-lifecycle-worker/webhooks",
        "webhook-id": str(event.id),
        "webhook-timestamp": str(stamp),
        "webhook-signature": sign(secret, str(event.id), stamp, body),
    }
    started = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        answer = post(
            url,
            body,
            headers,
            allow_private=settings.webhook_allow_private,
            timeout=settings.webhook_timeout_seconds,
        )
        status = answer.status
        if not 200 <= status < 300:
            error = f"HTTP {status}: {answer.excerpt[:200]}".strip()
    except webhook_http.TargetRefused as exc:
        error = f"refused: {exc}"
    except Exception as exc:  # no answer: connection refused, timeout, TLS, protocol
        error = f"{type(exc).__name__}: {exc}"
    elapsed_ms = (time.monotonic() - started) * 1000
    return _record(
        factory, settings, delivery_id, webhook_id, attempts + 1, status, error, elapsed_ms
    )


def _record(
    factory: sessionmaker[Session],
    settings: Settings,
    delivery_id: int,
    webhook_id: uuid.UUID,
    attempts: int,
    status: int | None,
    error: str | None,
    elapsed_ms: float,
) -> str:
    error = redact_text(error)[:500] if error else None
    now = datetime.now(UTC)
    with factory.begin() as db:
        db.add(
            WebhookAttemptRecord(
                delivery_id=delivery_id,
                attempted_at=now,
                status_code=status,
                error=error,
                duration_ms=round(elapsed_ms, 1),
            )
        )
        hook = db.get(WebhookRecord, webhook_id, with_for_update=True)
        values: dict[str, Any] = {
            "attempts": attempts,
            "last_status_code": status,
            "last_error": error,
            "lease_until": None,
            "updated_at": now,
        }
        if error is None:
            outcome = "succeeded"
            values.update(state=outcome, delivered_at=now, next_attempt_at=None)
            if hook is not None:
                hook.failing_since = None
        else:
            outcome = _failed(db, settings, hook, attempts, now, error, values)
        db.execute(
            update(WebhookDeliveryRecord)
            .where(WebhookDeliveryRecord.id == delivery_id)
            .values(**values)
        )
    log.info(
        "webhook.attempt",
        delivery_id=delivery_id,
        outcome=outcome,
        status=status,
        attempt=attempts,
        duration_ms=round(elapsed_ms, 1),
    )
    return outcome


def _failed(
    db: Session,
    settings: Settings,
    hook: WebhookRecord | None,
    attempts: int,
    now: datetime,
    error: str,
    values: dict[str, Any],
) -> str:
    """After a failed attempt: wait for the next, give up, or disable the endpoint."""
    schedule = settings.webhook_retry_seconds
    if hook is not None:
        hook.failing_since = hook.failing_since or now
        failing_for = (now - hook.failing_since).total_seconds()
        if hook.enabled and failing_for >= settings.webhook_disable_after_seconds:
            disable(db, hook, now, f"failing for {round(failing_for)} s; last error: {error}")
            values.update(state="failed", next_attempt_at=None)
            return "failed"
    if attempts > len(schedule):
        values.update(state="failed", next_attempt_at=None)
        return "failed"
    delay = schedule[attempts - 1] * random.uniform(0.9, 1.1)
    values.update(state="waiting", next_attempt_at=now + timedelta(seconds=delay))
    return "waiting"


def disable(db: Session, hook: WebhookRecord, now: datetime, why: str) -> None:
    """Disable ``hook``: its open deliveries are cancelled, and an event says why."""
    hook.enabled = False
    hook.disabled_at = now
    hook.disabled_reason = why
    db.execute(
        update(WebhookDeliveryRecord)
        .where(
            WebhookDeliveryRecord.webhook_id == hook.id,
            WebhookDeliveryRecord.state.in_(["queued", "waiting"]),
        )
        .values(state="cancelled", updated_at=now)
    )
    db.flush()
    events.append(
        db,
        "webhook.disabled",
        account_id=hook.account_id,
        reason=f"webhook {hook.url} disabled: {why}",
        data={"webhookId": str(hook.id), "url": hook.url},
    )
    log.warning("webhook.disabled", webhook_id=str(hook.id), reason=why)


# Deliveries whose next attempt is due, whose worker died mid-attempt (lease expired), or
# whose job was lost (queued for long): queued again, with a job each.
_DUE = text(
    """
UPDATE webhook_deliveries AS d SET state = 'queued', lease_until = NULL,
    next_attempt_at = now(), updated_at = now()
WHERE d.id IN (
    SELECT id FROM webhook_deliveries
    WHERE state IN ('queued', 'sending', 'waiting') AND next_attempt_at <= now()
      AND CASE state
          WHEN 'waiting' THEN true
          WHEN 'sending' THEN lease_until < now()
          ELSE updated_at < now() - :requeue END
    ORDER BY next_attempt_at
    LIMIT :batch
    FOR UPDATE SKIP LOCKED
)
RETURNING d.id
"""
)


def retry_due(svc: LifecycleService) -> dict[str, Any]:
    """The beat sweep: queue every delivery whose next attempt is due."""
    with svc.factory.begin() as db:
        ids = list(
            db.execute(
                _DUE,
                {
                    "batch": svc.settings.sweep_batch_size,
                    "requeue": timedelta(seconds=REQUEUE_AFTER_SECONDS),
                },
            ).scalars()
        )
        jobs = [outbox.add(db, TASK_DELIVER, {"delivery_id": i}, queue=DEFAULT_QUEUE) for i in ids]
        db.flush()
    svc._publish(jobs)
    return {"queued": len(ids)}
