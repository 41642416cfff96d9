"""FastAPI dependencies: settings, database session, caller, request body."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session
from starlette.datastructures import Headers

from worker.config import Settings, get_settings
from worker.db.engine import get_sessionmaker
from worker.errors import InvalidInput, PayloadTooLarge, Unauthorized
from worker.services import accounts


@contextlib.contextmanager
def transaction(db: Session) -> Iterator[None]:
    """The request's transaction (begun by authentication, or now): committed when the
    block succeeds, rolled back when it raises."""
    if not db.in_transaction():
        db.begin()
    try:
        yield
    except BaseException:
        db.rollback()
        raise
    db.commit()


def get_db() -> Iterator[Session]:
    db = get_sessionmaker()()
    try:
        yield db
    finally:
        db.close()


def app_settings(request: Request) -> Settings:
    """The settings the app was created with (``create_app(settings)``), else the process's."""
    settings = getattr(request.app.state, "settings", None)
    return settings if isinstance(settings, Settings) else get_settings()


SettingsDep = Annotated[Settings, Depends(app_settings)]
DbDep = Annotated[Session, Depends(get_db)]


def api_key_of(x_api_key: str | None, authorization: str | None) -> str:
    """The key from exactly one of ``x-api-key`` or ``Authorization: Bearer`` (401 else)."""
    if (x_api_key is None) == (authorization is None):
        raise Unauthorized("Exactly one of x-api-key or Authorization must be provided")
    if authorization is not None:
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("Unauthorized")
    else:
        key = x_api_key or ""
    key = key.strip()
    if not key or len(key) > 512:
        raise Unauthorized("Unauthorized")
    return key


def refuse_repeated_auth(headers: Headers) -> None:
    """401 when ``x-api-key`` or ``Authorization`` appears more than once (SPEC §3).
    The header parameters only see the first copy; a proxy in front may read the last,
    and two parts of the system must never disagree on who is calling."""
    if len(headers.getlist("x-api-key")) + len(headers.getlist("authorization")) > 1:
        raise Unauthorized("Exactly one of x-api-key or Authorization must be provided")


XApiKey = Annotated[str | None, Header(description="API key (or use Authorization)")]
Authorization = Annotated[str | None, Header(description="Bearer <API key>")]


def _header_doc(name: str, description: str, title: str) -> dict[str, Any]:
    schema = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {**schema, "description": description, "title": title},
        "description": description,
    }


#: What ``XApiKey``, ``Authorization`` and an ``Idempotency-Key`` header parameter put in
#: the OpenAPI document, for a route that reads its headers itself (``caller_key``):
#: the hot create route, which skips FastAPI's per-request parameter resolution.
AUTH_HEADERS_DOC = [
    _header_doc("x-api-key", "API key (or use Authorization)", "X-Api-Key"),
    _header_doc("authorization", "Bearer <API key>", "Authorization"),
]
IDEMPOTENCY_HEADER_DOC = _header_doc("Idempotency-Key", "", "Idempotency-Key")


def caller_key(headers: Headers) -> str:
    """The API key of a request whose route reads its own headers: what
    ``current_account``'s header parameters and checks amount to."""
    refuse_repeated_auth(headers)
    return api_key_of(headers.get("x-api-key"), headers.get("authorization"))


def current_account(
    request: Request, db: DbDep, x_api_key: XApiKey = None, authorization: Authorization = None
) -> uuid.UUID:
    """Exactly one of ``x-api-key`` or ``Authorization: Bearer``, sent once, identifies
    the caller."""
    refuse_repeated_auth(request.headers)
    key = api_key_of(x_api_key, authorization)
    # The lookup opens the request's transaction; the route goes on in it (one pooled
    # connection and one commit per request), through ``transaction(db)``.
    account = accounts.authenticate(db, key)
    request.state.account_id = account  # for the access-log line (api_stub/access_log.py)
    return account


AccountDep = Annotated[uuid.UUID, Depends(current_account)]


@dataclass
class RawBody:
    """The request body as read, at most ``limit + 1`` bytes of it."""

    data: bytes
    too_large: bool


async def read_bounded(request: Request, limit: int) -> RawBody:
    """The body, read without judging it (so a route can authenticate the caller
    first), and never more than ``limit`` + 1 bytes of it: a declared length over the
    limit is refused unread, a chunked one as soon as it passes."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return RawBody(b"", too_large=True)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return RawBody(b"", too_large=True)
        chunks.append(chunk)
    return RawBody(b"".join(chunks), too_large=False)


async def raw_body(request: Request) -> RawBody:
    """A JSON route's body, at most ``max_body_bytes``."""
    return await read_bounded(request, app_settings(request).max_body_bytes)


def parse_json_object(body: RawBody, settings: Settings) -> dict[str, Any]:
    """The body as a JSON object (empty body = ``{}``): 413 too large, 400 not an object."""
    if body.too_large:
        raise PayloadTooLarge(f"Request body too large (limit {settings.max_body_bytes} bytes)")
    if not body.data.strip():
        return {}
    try:
        data = json.loads(body.data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise InvalidInput("Invalid JSON body") from None
    if not isinstance(data, dict):
        raise InvalidInput("Request body must be a JSON object")
    return data


async def json_body(request: Request) -> tuple[dict[str, Any], bytes]:
    """The request body as a JSON object (empty body = ``{}``), bounded in size."""
    body = await raw_body(request)
    return parse_json_object(body, app_settings(request)), body.data


BodyDep = Annotated[tuple[dict[str, Any], bytes], Depends(json_body)]
