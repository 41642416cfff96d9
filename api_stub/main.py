"""The FastAPI application factory."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import Receive, Scope, Send

from api_stub import docs, errors, fast_lane
from api_stub.access_log import AccessLog
from api_stub.routes import (
    chats,
    commands,
    events,
    files,
    health,
    metrics,
    sessions,
    webhooks,
)
from worker.celery_app import create_celery
from worker.config import Settings, get_settings
from worker.db.engine import get_sessionmaker
from worker.logging import configure_logging
from worker.providers.broker import CeleryPublisher, survive_broker_loss
from worker.providers.registry import build_repo_host
from worker.services.outbox import BackgroundPublisher


class LifecycleApi(FastAPI):
    """The FastAPI app, with the create route's fast lane in front (``fast_lane``)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not await fast_lane.dispatch(self, scope, receive, send):
            await super().__call__(scope, receive, send)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level, settings.log_json)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything imported and built so far lives as long as the process: keep it out
        # of the collector's full passes, which would otherwise walk ~120,000 objects
        # (~50 ms, a pause for every request in flight) every few thousand requests.
        gc.collect()
        gc.freeze()
        yield
        # Publish what the last requests committed before the process goes (what is
        # left behind is the relay's, after the claim expires).
        app.state.background_publisher.close(timeout=5.0)

    app = LifecycleApi(
        lifespan=lifespan,
        title="Session Lifecycle Worker API",
        version="0.1.0",
        description="Create agent sessions and drive their sandboxes through their lifecycle.",
        docs_url=None,  # served from packaged assets by api_stub.docs
        redoc_url=None,
    )
    app.state.settings = settings
    survive_broker_loss()  # kombu's fix for a lost Redis connection (idempotent)
    app.state.celery = create_celery(settings)
    # Publishing from a request must fail fast when the broker is down (the outbox keeps
    # the job): no connection retries inside the request.
    transport = dict(app.state.celery.conf.broker_transport_options or {})
    transport["max_retries"] = 0
    app.state.celery.conf.broker_transport_options = transport
    app.state.publisher = CeleryPublisher(app.state.celery)
    app.state.background_publisher = BackgroundPublisher(get_sessionmaker, app.state.publisher)
    app.state.repo_host = build_repo_host(settings)
    errors.install(app)
    app.add_middleware(AccessLog)
    app.include_router(health.router)
    app.include_router(sessions.router)
    app.include_router(chats.router)
    app.include_router(commands.router)
    app.include_router(files.router)
    app.include_router(events.router)
    app.include_router(webhooks.router)
    app.include_router(metrics.router)
    docs.install(app)
    fast_lane.install(app, sessions.router, sessions.create_session)
    return app
