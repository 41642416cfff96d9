"""Every error body is ``{"status": "error", "error": "<message>"}`` (SPEC §3)."""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from worker.errors import DomainError
from worker.logging import get_logger

log = get_logger(__name__)


def error_response(status: int, message: str, **extra: Any) -> JSONResponse:
    body: dict[str, Any] = {"status": "error", "error": message}
    body.update({k: v for k, v in extra.items() if v is not None})
    return JSONResponse(body, status_code=status)


def _is_db_unavailable(exc: BaseException) -> bool:
    if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the API offers on ``path`` (from its OpenAPI document; HEAD with GET)."""
    table: list[tuple[re.Pattern[str], list[str]]] | None = getattr(app.state, "allow", None)
    if table is None:
        table = []
        for template, operations in app.openapi()["paths"].items():
            regex = re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template))
            offered = {m.upper() for m in operations}
            offered |= {"HEAD"} if "GET" in offered else set()
            table.append((re.compile(regex), sorted(offered)))
        app.state.allow = table
    for pattern, methods in table:
        if pattern.fullmatch(path):
            return methods
    return []


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        response = error_response(exc.status_code, exc.message, **exc.extra)
        if exc.extra.get("retryAfterSeconds") is not None:  # a quota (429)
            response.headers["Retry-After"] = str(exc.extra["retryAfterSeconds"])
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Not found", 405: "Method not allowed"}
        message = (
            exc.detail if isinstance(exc.detail, str) else messages.get(exc.status_code, "Error")
        )
        response = error_response(exc.status_code, message)
        response.headers.update(exc.headers or {})  # Starlette's own, e.g. Allow on a 405
        if exc.status_code == 405 and (allowed := allowed_methods(app, request.url.path)):
            # Starlette names only the methods of the first route that matched the path;
            # Allow must name every method the path has (RFC 9110 §15.5.6).
            response.headers["Allow"] = ", ".join(allowed)
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(_: Request, __: ClientDisconnect) -> Response:
        # The client went away mid-body: nothing to answer and nothing wrong here. The
        # request's one access-log line (info) records it as 499, "client closed
        # request" as proxies name it; the answer itself goes nowhere.
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        fields = [str(e["loc"][-1]) for e in exc.errors() if e.get("loc")]
        first = exc.errors()[0] if exc.errors() else {"msg": "Invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        return error_response(400, f"{where}: {first['msg']}", missing_fields=fields or None)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        if _is_db_unavailable(exc):
            log.warning("api.database_unavailable", error=type(exc).__name__)
            return error_response(503, "Database unavailable, try again shortly")
        log.error("api.unhandled", error=type(exc).__name__, exc_info=exc)
        return error_response(500, "Internal server error")
