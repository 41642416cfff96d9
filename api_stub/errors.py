"""Every error body is ``{"status": "error", "error": "<message>"}`` (SPEC §3)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

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


def install(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(_: Request, exc: DomainError) -> JSONResponse:
        response = error_response(exc.status_code, exc.message, **exc.extra)
        if exc.extra.get("retryAfterSeconds") is not None:  # a quota (429)
            response.headers["Retry-After"] = str(exc.extra["retryAfterSeconds"])
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Not found", 405: "Method not allowed"}
        message = (
            exc.detail if isinstance(exc.detail, str) else messages.get(exc.status_code, "Error")
        )
        return error_response(exc.status_code, message)

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
