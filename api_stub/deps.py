"""FastAPI dependencies: settings, database session, caller, request body."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from sqlalchemy.orm import Session

from worker.config import Settings, get_settings
from worker.db.engine import get_sessionmaker
from worker.errors import InvalidInput, PayloadTooLarge, Unauthorized
from worker.services import accounts


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


def current_account(
    db: DbDep,
    x_api_key: Annotated[str | None, Header(description="API key (or use Authorization)")] = None,
    authorization: Annotated[str | None, Header(description="Bearer <API key>")] = None,
) -> uuid.UUID:
    """Exactly one of ``x-api-key`` or ``Authorization: Bearer`` identifies the caller."""
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
    account_id = accounts.authenticate(db, key)
    db.rollback()  # end the read-only transaction; the route opens its own
    return account_id


AccountDep = Annotated[uuid.UUID, Depends(current_account)]


async def json_body(request: Request) -> tuple[dict[str, Any], bytes]:
    """The request body as a JSON object (empty body = ``{}``), bounded in size."""
    settings = app_settings(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > settings.max_body_bytes:
        raise PayloadTooLarge(f"Request body too large (limit {settings.max_body_bytes} bytes)")
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > settings.max_body_bytes:
            raise PayloadTooLarge(f"Request body too large (limit {settings.max_body_bytes} bytes)")
    if not raw.strip():
        return {}, raw
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise InvalidInput("Invalid JSON body") from None
    if not isinstance(data, dict):
        raise InvalidInput("Request body must be a JSON object")
    return data, raw


BodyDep = Annotated[tuple[dict[str, Any], bytes], Depends(json_body)]
