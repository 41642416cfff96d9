"""Webhooks of the caller's account: create (the secret is shown once), list, read,
delete, and each one's deliveries with their attempts and answers."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api_stub import fields
from api_stub.deps import AccountDep, BodyDep, DbDep, SettingsDep, transaction
from api_stub.schemas import ErrorBody
from worker.db.event_models import WebhookRecord
from worker.errors import InvalidInput
from worker.services import webhooks

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 503)
}


class WebhookWrite(BaseModel):
    url: str = Field(description="http(s) URL; private, loopback and link-local targets refused")
    event_types: list[str] | None = Field(
        default=None,
        alias="eventTypes",
        description="Event types (session.hibernated) or prefixes (session.*); empty: all",
    )


class WebhookRead(BaseModel):
    id: str
    url: str
    event_types: list[str] = Field(serialization_alias="eventTypes")
    enabled: bool
    failing_since: datetime | None = Field(serialization_alias="failingSince")
    disabled_at: datetime | None = Field(serialization_alias="disabledAt")
    disabled_reason: str | None = Field(serialization_alias="disabledReason")
    created_at: datetime = Field(serialization_alias="createdAt")


class WebhookCreated(BaseModel):
    webhook: WebhookRead
    secret: str = Field(description="whsec_… — shown this once; verify signatures with it")


class WebhookEnvelope(BaseModel):
    webhook: WebhookRead


class WebhookList(BaseModel):
    webhooks: list[WebhookRead]


class AttemptRead(BaseModel):
    attempted_at: datetime = Field(serialization_alias="attemptedAt")
    status_code: int | None = Field(serialization_alias="statusCode")
    error: str | None
    duration_ms: float | None = Field(serialization_alias="durationMs")


class DeliveryRead(BaseModel):
    id: int
    event_id: int = Field(serialization_alias="eventId", description="= the webhook-id header")
    event_type: str = Field(serialization_alias="eventType")
    state: str = Field(description="queued | sending | waiting | succeeded | failed | cancelled")
    attempts: int
    next_attempt_at: datetime | None = Field(serialization_alias="nextAttemptAt")
    last_status_code: int | None = Field(serialization_alias="lastStatusCode")
    last_error: str | None = Field(serialization_alias="lastError")
    created_at: datetime = Field(serialization_alias="createdAt")
    delivered_at: datetime | None = Field(serialization_alias="deliveredAt")
    attempt_log: list[AttemptRead] = Field(serialization_alias="attemptLog")


class DeliveryPage(BaseModel):
    deliveries: list[DeliveryRead]
    next_before: int | None = Field(serialization_alias="nextBefore")


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def webhook_dict(w: WebhookRecord) -> dict[str, Any]:
    return {
        "id": str(w.id),
        "url": w.url,
        "eventTypes": list(w.event_types or []),
        "enabled": w.enabled,
        "failingSince": _iso(w.failing_since),
        "disabledAt": _iso(w.disabled_at),
        "disabledReason": w.disabled_reason,
        "createdAt": w.created_at.isoformat(),
    }


@router.post(
    "",
    response_model=WebhookCreated,
    status_code=201,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(WebhookWrite, required=True),
    summary="Create a webhook",
)
def create_webhook(
    account: AccountDep, db: DbDep, body: BodyDep, settings: SettingsDep
) -> Response:
    data, _ = body
    with transaction(db):
        record, secret = webhooks.create_webhook(
            db, settings, account, data.get("url"), data.get("eventTypes")
        )
        payload = {"webhook": webhook_dict(record), "secret": secret}
    return JSONResponse(payload, status_code=201)


@router.get("", response_model=WebhookList, responses=_ERRORS, summary="List webhooks")
def list_webhooks(account: AccountDep, db: DbDep) -> Response:
    return JSONResponse(
        {"webhooks": [webhook_dict(w) for w in webhooks.list_webhooks(db, account)]}
    )


@router.get("/{webhook_id}", response_model=WebhookEnvelope, responses=_ERRORS, summary="Get")
def get_webhook(webhook_id: str, account: AccountDep, db: DbDep) -> Response:
    return JSONResponse({"webhook": webhook_dict(webhooks.get_webhook(db, account, webhook_id))})


@router.delete("/{webhook_id}", status_code=204, responses=_ERRORS, summary="Delete a webhook")
def delete_webhook(webhook_id: str, account: AccountDep, db: DbDep) -> Response:
    with transaction(db):
        webhooks.delete_webhook(db, webhooks.get_webhook(db, account, webhook_id))
    return Response(status_code=204)


@router.get(
    "/{webhook_id}/deliveries",
    response_model=DeliveryPage,
    responses=_ERRORS,
    summary="Deliveries, their attempts and answers",
)
def list_deliveries(
    webhook_id: str,
    account: AccountDep,
    db: DbDep,
    limit: Annotated[str | None, Query(description="1-100, default 20")] = None,
    before: Annotated[str | None, Query(description="nextBefore of the previous page")] = None,
) -> Response:
    """Newest first."""
    if limit is not None and not (limit.isdigit() and 1 <= int(limit) <= 100):
        raise InvalidInput("limit must be an integer from 1 to 100", missing_fields=["limit"])
    if before is not None and not (before.isdigit() and len(before) < 19):
        raise InvalidInput("before must be a delivery id", missing_fields=["before"])
    record = webhooks.get_webhook(db, account, webhook_id)
    views, next_before = webhooks.list_deliveries(
        db, record, limit=int(limit or 20), before=int(before) if before else None
    )
    items = [
        {
            "id": v.delivery.id,
            "eventId": v.delivery.event_id,
            "eventType": v.event_type,
            "state": v.delivery.state,
            "attempts": v.delivery.attempts,
            "nextAttemptAt": _iso(v.delivery.next_attempt_at),
            "lastStatusCode": v.delivery.last_status_code,
            "lastError": v.delivery.last_error,
            "createdAt": v.delivery.created_at.isoformat(),
            "deliveredAt": _iso(v.delivery.delivered_at),
            "attemptLog": [
                {
                    "attemptedAt": a.attempted_at.isoformat(),
                    "statusCode": a.status_code,
                    "error": a.error,
                    "durationMs": a.duration_ms,
                }
                for a in v.attempts
            ],
        }
        for v in views
    ]
    return JSONResponse({"deliveries": items, "nextBefore": next_before})
