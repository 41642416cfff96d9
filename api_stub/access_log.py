"""One access-log line per request, and the request id that ties it to everything else.

A pure ASGI middleware (no per-request task or body copy): it takes the client's
``X-Request-ID`` when it is a sane token (else makes one), binds it into the structlog
context for the request's own log lines, returns it on the response, and when the
response has gone logs ``http.request`` with the method, the route template (never the
raw path with its ids), the status, the duration and the authenticated account. Keys,
query strings and bodies are never logged.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker.logging import get_logger, write_json_line

log_name = "api.access"
log = get_logger(log_name)

REQUEST_ID_HEADER = b"x-request-id"
#: What a client-sent request id may be: a token, not free text (it lands in logs).
_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:\-]{1,128}")
#: Where authentication leaves the caller's account id for this line
#: (``request.state.account_id``).
ACCOUNT_STATE_KEY = "account_id"


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's ``X-Request-ID`` when it is one sane token, else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return uuid.uuid4().hex


def route_of(scope: Scope) -> str:
    """The matched route's template (``/api/sessions/{session_id}``), or ``-``."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "-"


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = request_id_of(scope.get("headers") or [])
        status = 0

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers") or [])
                headers.append((REQUEST_ID_HEADER, request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                state: dict[str, Any] = scope.get("state") or {}
                account = state.get(ACCOUNT_STATE_KEY)
                fields = {
                    "method": scope.get("method"),
                    "route": route_of(scope),
                    "status": status or 500,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "account_id": str(account) if account is not None else None,
                }
                if not write_json_line(log_name, "http.request", fields):
                    log.info("http.request", **fields)
