"""The create route's fast lane: ``POST /api/sessions`` straight to its endpoint.

The busiest route of the API spends a third of its event-loop time in the framework
around it: Starlette's and FastAPI's middleware layers and the scan of every route for
a match. The lane answers exactly ``POST /api/sessions`` (nothing else: other methods
and paths, ``/api/sessions/`` included, take the ordinary way) by calling the very
endpoint the router would (``routes.sessions.create_session``), with the same access
log line and request id (``AccessLog``) and the same exception handlers
(``errors.install``), so there is one create and one answer for it. An exception no
handler takes is re-raised after the answer, as Starlette's error middleware does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute
from starlette.types import Receive, Scope, Send

from api_stub.access_log import AccessLog

Endpoint = Callable[[Request], Awaitable[Response]]


class CreateLane:
    """ASGI app serving the one route; wrapped in ``AccessLog`` by :func:`install`."""

    def __init__(self, app: FastAPI, route: BaseRoute, endpoint: Endpoint) -> None:
        self.app = app
        self.route = route
        self.endpoint = endpoint

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self.app
        scope["route"] = self.route  # the access line's route template
        scope["endpoint"] = self.endpoint
        request = Request(scope, receive, send)
        unhandled: Exception | None = None
        try:
            response = await self.endpoint(request)
        except Exception as exc:
            handler, catch_all = self._handler_for(exc)
            if handler is None:
                raise
            response = await handler(request, exc)
            unhandled = exc if catch_all else None
        await response(scope, receive, send)
        if unhandled is not None:
            raise unhandled

    def _handler_for(self, exc: Exception) -> tuple[Any, bool]:
        """The registered handler for ``exc`` (nearest class first), and whether it is
        the catch-all ``Exception`` one."""
        handlers = self.app.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return handlers[cls], cls is Exception
        return None, False


def install(app: FastAPI, router: APIRouter, endpoint: Endpoint) -> None:
    """Serve ``POST /api/sessions`` through :class:`CreateLane` from now on; ``router``
    holds the route declaring it (for its template and its OpenAPI entry)."""
    route = next(
        r
        for r in router.routes
        if getattr(r, "endpoint", None) is endpoint and "POST" in getattr(r, "methods", ())
    )
    assert getattr(route, "path", None) == "/api/sessions"
    app.state.create_lane = AccessLog(CreateLane(app, route, endpoint))


async def dispatch(app: FastAPI, scope: Scope, receive: Receive, send: Send) -> bool:
    """Serve the request through the lane when it is the lane's; False otherwise."""
    lane = getattr(app.state, "create_lane", None)
    if (
        lane is None
        or scope["type"] != "http"
        or scope["method"] != "POST"
        or scope["path"] != "/api/sessions"
        or scope.get("root_path")
    ):
        return False
    await lane(scope, receive, send)
    return True
