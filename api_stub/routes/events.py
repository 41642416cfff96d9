"""Events: one session's (``GET /api/sessions/{id}/events``) and the caller's feed
(``GET /api/events``, its own and its organizations' sessions), keyset-paged on the
event id; the feed can long-poll (``wait``) for live following."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any

import anyio
import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from api_stub.deps import AccountDep, Authorization, DbDep, XApiKey, api_key_of
from api_stub.schemas import ErrorBody
from worker.db.engine import get_sessionmaker
from worker.errors import InvalidInput
from worker.services import accounts, events, sessions

router = APIRouter(tags=["events"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 503)
}
#: The longest a feed request waits for new events (``wait``), and how often it looks.
MAX_WAIT_SECONDS = 30
POLL_SECONDS = 0.25


class EventRead(BaseModel):
    id: int = Field(description="Unique and final; the cursor to page on (`after`).")
    type: str = Field(description="e.g. session.hibernated, run.failed, session.kicked")
    session_id: str | None = Field(serialization_alias="sessionId")
    run_id: str | None = Field(serialization_alias="runId")
    user_id: str | None = Field(serialization_alias="userId")
    organization_id: str | None = Field(serialization_alias="organizationId")
    version: int | None = Field(description="The session's lifecycleVersion after the change.")
    reason: str | None = Field(description="Why, for a person: 'idle for 1800 s', …")
    data: dict[str, Any]
    created_at: datetime = Field(serialization_alias="createdAt")


class EventPage(BaseModel):
    events: list[EventRead]
    next_after: int = Field(
        serialization_alias="nextAfter",
        description="Pass as `after` for the next page (the given `after` when empty).",
    )


def _int_param(value: str | None, name: str, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if value.isdigit() and len(value) < 19 and low <= int(value) <= high:
        return int(value)
    raise InvalidInput(f"{name} must be an integer from {low} to {high}", missing_fields=[name])


def _page(found: list[events.Event], after: int) -> Response:
    return JSONResponse(
        {
            "events": [events.event_dict(e) for e in found],
            "nextAfter": found[-1].id if found else after,
        }
    )


@router.get(
    "/api/sessions/{session_id}/events",
    response_model=EventPage,
    responses=_ERRORS,
    summary="The session's events",
)
def session_events(
    session_id: str,
    account: AccountDep,
    db: DbDep,
    after: Annotated[str | None, Query(description="nextAfter of the previous page")] = None,
    limit: Annotated[str | None, Query(description="1-500, default 100")] = None,
) -> Response:
    """Oldest first; every event of the session once, whatever commits concurrently."""
    start = _int_param(after, "after", 0, 0, 2**63 - 1)
    size = _int_param(limit, "limit", 100, 1, 500)
    record = sessions.get_owned(db, account, session_id)
    return _page(events.page(db, after=start, limit=size, session_id=record.id), start)


def _account_page(key: str, after: int, limit: int) -> list[events.Event]:
    # A fresh, short transaction per look: a long poll holds no connection or snapshot.
    with get_sessionmaker()() as db:
        account = accounts.authenticate(db, key)
        orgs = events.readable_orgs(db, account)
        return events.page(db, after=after, limit=limit, account_id=account, orgs=orgs)


@router.get("/api/events", response_model=EventPage, responses=_ERRORS, summary="Event feed")
async def event_feed(
    request: Request,
    x_api_key: XApiKey = None,
    authorization: Authorization = None,
    after: Annotated[str | None, Query(description="nextAfter of the previous page")] = None,
    limit: Annotated[str | None, Query(description="1-500, default 100")] = None,
    wait: Annotated[
        str | None,
        Query(description=f"seconds (0-{MAX_WAIT_SECONDS}) to wait for an event when none is new"),
    ] = None,
) -> Response:
    """Events of the caller's sessions and of its organizations' sessions, oldest first.
    With ``wait`` the request returns as soon as there is an event after ``after``, or
    empty after ``wait`` seconds (long-poll)."""
    key = api_key_of(x_api_key, authorization)
    start = _int_param(after, "after", 0, 0, 2**63 - 1)
    size = _int_param(limit, "limit", 100, 1, 500)
    patience = _int_param(wait, "wait", 0, 0, MAX_WAIT_SECONDS)
    deadline = time.monotonic() + patience
    while True:
        found = await anyio.to_thread.run_sync(_account_page, key, start, size)
        if found or time.monotonic() >= deadline or await request.is_disconnected():
            return _page(found, start)
        await anyio.sleep(POLL_SECONDS)
