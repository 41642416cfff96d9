"""Session resource: create, read, update, list; lifecycle kicks, heartbeat, diff, runs."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import anyio.to_thread
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import JSONResponse, Response

from api_stub import conditional, fields
from api_stub.deps import (
    AUTH_HEADERS_DOC,
    IDEMPOTENCY_HEADER_DOC,
    AccountDep,
    BodyDep,
    DbDep,
    RawBody,
    SettingsDep,
    app_settings,
    caller_key,
    parse_json_object,
    raw_body,
    transaction,
)
from api_stub.schemas import (
    CachedDiff,
    ErrorBody,
    ExtendWrite,
    RunList,
    SessionCreate,
    SessionCreated,
    SessionEnvelope,
    SessionExtended,
    SessionPage,
    SessionRun,
    SessionUpdate,
    etag_of,
)
from worker.db.engine import get_sessionmaker
from worker.db.models import OutboxRecord
from worker.domain import filters
from worker.domain.lifecycle import RunKind, SessionStatus
from worker.errors import InvalidInput, PreconditionFailed
from worker.services import accounts, idempotency, outbox, quotas, retention, runs, sessions
from worker.services import events as kick_events
from worker.services.views import cached_diff, chat_dict, run_dict, session_dict

router = APIRouter(prefix="/api/sessions", tags=["sessions"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 412, 413, 503)
}
RawBodyDep = Annotated[RawBody, Depends(raw_body)]


def _publish(request: Request, records: list[OutboxRecord] | list[outbox.OutboxRow]) -> None:
    """After commit: hand the jobs to the process's background publisher, which publishes
    them within milliseconds; anything the broker refuses stays in the outbox for the
    relay."""
    rows = [
        (r.id, r.task_name, r.payload, r.queue) if isinstance(r, OutboxRecord) else r
        for r in records
    ]
    request.app.state.background_publisher.submit(rows)


def retention_fields(data: dict[str, Any]) -> tuple[int | None, int | None]:
    """``autoArchiveAfterSeconds`` and ``autoDeleteAfterSeconds`` of a create or patch."""
    return (
        fields.seconds_field(data, "autoArchiveAfterSeconds"),
        fields.seconds_field(data, "autoDeleteAfterSeconds"),
    )


@router.post(
    "",
    response_model=SessionCreated,
    responses=_ERRORS,
    openapi_extra={
        **fields.body_doc(SessionCreate),
        "parameters": [*AUTH_HEADERS_DOC, IDEMPOTENCY_HEADER_DOC],
    },
    summary="Create session",
)
async def create_session(request: Request) -> Response:
    """Record a session, its first chat and the provision job in one transaction, then
    publish the job. Never waits on GitHub or a sandbox."""
    # The busiest route reads its headers itself (no per-request parameter resolution)
    # and does all the blocking work in one hop to the thread pool: authenticate,
    # validate, insert, commit.
    body = await raw_body(request)
    return await anyio.to_thread.run_sync(
        _create_session, request, body, limiter=_create_limiter(request)
    )


def _create_limiter(request: Request) -> anyio.CapacityLimiter:
    """At most ``api_create_threads`` creates of this process in threads at once: more
    would only take turns on the GIL (and stretch every one of them); the rest wait their
    turn in the event loop, where waiting costs nothing."""
    limiter: anyio.CapacityLimiter | None = getattr(request.app.state, "create_limiter", None)
    if limiter is None:
        limiter = anyio.CapacityLimiter(app_settings(request).api_create_threads)
        request.app.state.create_limiter = limiter
    return limiter


def _create_session(request: Request, body: RawBody) -> Response:
    settings = app_settings(request)
    key = caller_key(request.headers)
    idempotency_key = request.headers.get("idempotency-key")
    with get_sessionmaker()() as db:
        # The caller first (401 before any 413/400), in the transaction that inserts.
        caller = accounts.caller(db, key)
        account = caller.account_id
        request.state.account_id = account  # for the access-log line
        data = parse_json_object(body, settings)
        create = sessions.CreateSession(
            title=fields.text_field(data, "title"),
            organization_id=fields.uuid_field(data, "organizationId"),
            artist_id=fields.uuid_field(data, "artistId"),
            idle_timeout_seconds=fields.seconds_field(data, "idleTimeoutSeconds"),
            max_lifetime_seconds=fields.seconds_field(data, "maxLifetimeSeconds"),
        )
        keep = retention_fields(data)
        if create.title is not None and len(create.title.strip()) > settings.max_title_length:
            raise InvalidInput(
                f"title must be at most {settings.max_title_length} characters",
                missing_fields=["title"],
            )
        repo_host = request.app.state.repo_host
        refusals = _refusals_recorded(db, "provision", account, org=create.organization_id)
        with refusals, transaction(db):
            if idempotency_key is not None:
                replay = idempotency.begin(
                    db,
                    account,
                    idempotency_key,
                    idempotency.request_hash("POST", "/api/sessions", body.data),
                    settings.idempotency_ttl_seconds,
                )
                if replay is not None:
                    return JSONResponse(replay.body, status_code=replay.status_code)
            owner, name = sessions.workspace_repo(settings, account, create.organization_id)
            created = sessions.create_session(
                db,
                settings,
                account,
                create,
                clone_url=repo_host.clone_url(owner, name),
                sandbox_type=settings.sandbox_provider,
            )
            quotas.check_create(db, settings, created.session, caller)
            retention.set_overrides(db, created.session, *keep)
            payload = {"session": session_dict(created.session), "chat": chat_dict(created.chat)}
            if idempotency_key is not None:
                idempotency.finish(db, account, idempotency_key, 200, payload)
    _publish(request, created.outbox)
    return JSONResponse(payload)


@router.get("", response_model=SessionPage, responses=_ERRORS, summary="List sessions")
def list_sessions(
    account: AccountDep,
    db: DbDep,
    status: Annotated[str | None, Query(description="running|completed|failed|archived")] = None,
    limit: Annotated[str | None, Query(description="1-100, default 20")] = None,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
    organization_id: Annotated[
        str | None,
        Query(
            alias="organizationId",
            description="list this org's sessions instead (the org's key or a member)",
        ),
    ] = None,
) -> Response:
    """The caller's sessions, newest first, keyset-paginated; with ``organizationId``,
    every session of that org."""
    status_value, size = filters.parse_status(status), filters.parse_limit(limit)
    rows, next_cursor = sessions.list_sessions(
        db,
        account,
        status=status_value,
        limit=size,
        cursor=cursor,
        organization_id=fields.uuid_field({"organizationId": organization_id}, "organizationId"),
    )
    return JSONResponse({"sessions": [session_dict(r) for r in rows], "nextCursor": next_cursor})


@router.get(
    "/{session_id}", response_model=SessionEnvelope, responses=_ERRORS, summary="Get session"
)
def get_session(
    session_id: str,
    account: AccountDep,
    db: DbDep,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    record = sessions.get_owned(db, account, session_id)
    data = session_dict(record)
    return fields.etag_response("session", data, if_none_match)


@router.patch(
    "/{session_id}",
    response_model=SessionEnvelope,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(SessionUpdate),
    summary="Update session",
)
def patch_session(
    request: Request,
    session_id: str,
    account: AccountDep,
    body: BodyDep,
    db: DbDep,
    settings: SettingsDep,
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    """Change title, status or line counts. ``If-Match`` guards against lost updates."""
    data, _ = body
    status = fields.text_field(data, "status")
    try:
        status_value = SessionStatus(status) if status is not None else None
    except ValueError:
        raise InvalidInput(
            "status must be one of running, completed, failed, archived", missing_fields=["status"]
        ) from None
    patch = sessions.SessionPatch(
        title=fields.text_field(data, "title"),
        status=status_value,
        lines_added=fields.count_field(data, "linesAdded"),
        lines_removed=fields.count_field(data, "linesRemoved"),
        idle_timeout_seconds=fields.seconds_field(data, "idleTimeoutSeconds"),
        max_lifetime_seconds=fields.seconds_field(data, "maxLifetimeSeconds"),
    )
    keep = retention_fields(data)
    with transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        if if_match is not None and not conditional.if_match_holds(
            if_match, etag_of(session_dict(record))
        ):
            raise PreconditionFailed("Precondition failed: the session has changed")
        jobs = sessions.patch_session(db, settings, record, patch)
        retention.set_overrides(db, record, *keep)
        result = session_dict(record)
    _publish(request, jobs)
    return JSONResponse({"session": result}, headers={"ETag": etag_of(result)})


@contextmanager
def _refusals_recorded(
    db: Any,
    kind: str,
    account: uuid.UUID,
    *,
    org: uuid.UUID | None = None,
    session_id: str | None = None,
) -> Iterator[None]:
    """A 429 leaves nothing behind in its rolled-back transaction: record it durably
    (a ``quota.refused`` event, counted by ``/metrics``) in one of its own."""
    try:
        yield
    except quotas.QuotaExceeded as refusal:
        with transaction(db):
            record = sessions.get_owned(db, account, session_id) if session_id else None
            quotas.record_refusal(
                db,
                refusal,
                at="api",
                kind=kind,
                session=record,
                account_id=account,
                organization_id=org,
            )
        raise


def _kick(
    request: Request,
    session_id: str,
    account: uuid.UUID,
    db: Any,
    kind: RunKind,
    *,
    force: bool = False,
) -> Response:
    """202 ``{session, run, reason}`` with the run that will act (new, or the open one the
    kick joined, ``reason`` saying which); 200 with ``run: null`` and ``reason`` when the
    session is already there; 409 (with ``lifecycleState``) when the kick cannot act."""
    with _refusals_recorded(db, kind.value, account, session_id=session_id), transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        if kind is RunKind.START:
            quotas.check_start(db, app_settings(request), record)
        result = runs.request_run(
            db,
            record,
            kind,
            "api",
            force=force,
            force_hint="?force=true",
            start_hint=f"POST /api/sessions/{record.id}/sandbox",
        )
        kick_events.kicked(db, record, kind, result, force=force)
        payload = {
            "session": session_dict(record),
            "run": run_dict(result.run) if result.run is not None else None,
            "reason": result.reason,
        }
    _publish(request, result.outbox)
    return JSONResponse(payload, status_code=200 if result.satisfied else 202)


_KICK_DOC: dict[str, Any] = {
    "response_model": SessionRun,
    "status_code": 202,
    "responses": {
        **_ERRORS,
        200: {
            "model": SessionRun,
            "description": "Nothing to do: the session is already where the kick would take "
            "it (`run` is null, `reason` says why)",
        },
        409: {
            "model": ErrorBody,
            "description": "The session is archived, or has no live sandbox for this kick "
            "(`lifecycleState`, and `resume`: the start endpoint)",
        },
    },
}


@router.post("/{session_id}/sandbox", summary="Start or resume the sandbox", **_KICK_DOC)
def kick_start(request: Request, session_id: str, account: AccountDep, db: DbDep) -> Response:
    """202 with the start (or provision) run; joins one in flight. 200 when already active."""
    return _kick(request, session_id, account, db, RunKind.START)


@router.post("/{session_id}/hibernate", summary="Hibernate the sandbox", **_KICK_DOC)
def kick_hibernate(
    request: Request,
    session_id: str,
    account: AccountDep,
    db: DbDep,
    force: Annotated[
        bool, Query(description="hibernate even while a chat's stream claim is live")
    ] = False,
) -> Response:
    """202 with the hibernate run; joins one in flight. 200 when already hibernated. 409
    while a chat of the session holds a live stream claim, unless ``force``, and when the
    session has no live sandbox (failed, never started)."""
    return _kick(request, session_id, account, db, RunKind.HIBERNATE, force=force)


@router.post("/{session_id}/snapshots", summary="Take a snapshot", **_KICK_DOC)
def kick_snapshot(request: Request, session_id: str, account: AccountDep, db: DbDep) -> Response:
    """202 with the snapshot run, or the open one (snapshot, hibernate, archive) that takes
    it. 409 when the session has no live sandbox (hibernated: its snapshot is its work)."""
    return _kick(request, session_id, account, db, RunKind.SNAPSHOT)


@router.post("/{session_id}/diff", summary="Recompute the cached diff", **_KICK_DOC)
def kick_diff(request: Request, session_id: str, account: AccountDep, db: DbDep) -> Response:
    """202 with the diff run, or the open one (diff, hibernate, archive) that computes it.
    409 when the session has no live sandbox (hibernated: GET the diff it left)."""
    return _kick(request, session_id, account, db, RunKind.DIFF)


@router.post(
    "/{session_id}/activity",
    response_model=SessionEnvelope,
    responses=_ERRORS,
    summary="Heartbeat: push hibernateAfter out while the sandbox is active",
)
def activity(session_id: str, account: AccountDep, db: DbDep, settings: SettingsDep) -> Response:
    with transaction(db):
        record = sessions.get_owned(db, account, session_id)
        sessions.record_activity(db, settings, record)
        data = session_dict(record)
    return JSONResponse({"session": data})


@router.post(
    "/{session_id}/extend",
    response_model=SessionExtended,
    responses=_ERRORS,
    openapi_extra=fields.body_doc(ExtendWrite),
    summary="Extend the sandbox's lifetime",
)
def extend(
    session_id: str, account: AccountDep, db: DbDep, body: BodyDep, settings: SettingsDep
) -> Response:
    """Move ``sandboxExpiresAt`` out by ``seconds``, up to the operator's maximum lifetime
    from the sandbox's start (409 when not active or already there)."""
    data, _ = body
    seconds = fields.seconds_field(data, "seconds")
    if seconds is None:
        raise InvalidInput("seconds is required", missing_fields=["seconds"])
    with transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        added = sessions.extend_session(db, settings, record, seconds)
        payload = {"session": session_dict(record), "extendedBy": added}
    return JSONResponse(payload)


@router.get(
    "/{session_id}/diff", response_model=CachedDiff, responses=_ERRORS, summary="Cached diff"
)
def get_diff(session_id: str, account: AccountDep, db: DbDep) -> Response:
    record = sessions.get_owned(db, account, session_id)
    return JSONResponse(cached_diff(record))


@router.get("/{session_id}/runs", response_model=RunList, responses=_ERRORS, summary="Run history")
def list_runs(session_id: str, account: AccountDep, db: DbDep) -> Response:
    record = sessions.get_owned(db, account, session_id)
    return JSONResponse({"runs": [run_dict(r) for r in runs.history(db, record.id)]})
