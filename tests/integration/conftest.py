"""Shared helpers for the HTTP API tests: an in-process client on the real servers,
row counters, and error-body assertions."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.support.factories import Caller, make_caller

# Every table a create/patch/kick may write to.
WRITE_TABLES = ("sessions", "chats", "outbox", "lifecycle_runs", "idempotency_keys")

# The seed's Session and Chat fields (shared/seed/create-session-api-doc.txt), in order.
SEED_SESSION_FIELDS = (
    "id",
    "userId",
    "title",
    "isNewBranch",
    "globalSkillRefs",
    "lifecycleVersion",
    "createdAt",
    "updatedAt",
    "artistId",
    "repoOwner",
    "repoName",
    "branch",
    "cloneUrl",
    "sandboxState",
    "lastActivityAt",
    "sandboxExpiresAt",
    "hibernateAfter",
    "lifecycleRunId",
    "lifecycleError",
    "linesAdded",
    "linesRemoved",
    "snapshotUrl",
    "snapshotCreatedAt",
    "snapshotSizeBytes",
    "cachedDiff",
    "cachedDiffUpdatedAt",
)
SEED_CHAT_FIELDS = (
    "id",
    "sessionId",
    "title",
    "modelId",
    "createdAt",
    "updatedAt",
    "activeStreamId",
    "lastAssistantMessageAt",
)


def row_counts() -> dict[str, int]:
    """Rows in every table a request may write to (read through a fresh connection)."""
    from worker.db.engine import get_engine

    with get_engine().connect() as conn:
        return {
            t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in WRITE_TABLES
        }


def sql(query: str, **params: Any) -> list[Any]:
    """Run a read-only query and return its rows."""
    from worker.db.engine import get_engine

    with get_engine().connect() as conn:
        return list(conn.execute(text(query), params).all())


def sql_exec(query: str, **params: Any) -> None:
    from worker.db.engine import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(query), params)


def assert_error(
    response: httpx.Response, status: int, message: str | None = None, *, case: object = None
) -> dict[str, Any]:
    """The response is ``status`` with the SPEC's error body (and ``message`` if given).
    ``case`` names the input in failure messages when a test loops over inputs."""
    label = "" if case is None else f"[{case!r:.80}] "
    assert response.status_code == status, f"{label}{response.status_code} {response.text[:300]}"
    body = response.json()
    assert body["status"] == "error", f"{label}{body}"
    assert isinstance(body["error"], str) and body["error"], f"{label}{body}"
    if message is not None:
        assert body["error"] == message, f"{label}{body}"
    return body  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def api_app(server_urls: dict[str, str]) -> FastAPI:
    """One app for the run (its broker connection is reused between tests)."""
    from api_stub.main import create_app

    return create_app()


@pytest.fixture
def client(
    api_app: FastAPI, db_clean: dict[str, str], redis_client: object
) -> Iterator[TestClient]:
    """The API in-process, on the run's fresh database and private Redis db index."""
    with TestClient(api_app) as c:
        yield c


@pytest.fixture
def caller(db_clean: dict[str, str]) -> Caller:
    return make_caller("Ada")


def create(client: TestClient, caller: Caller, body: Any = None, **kw: Any) -> dict[str, Any]:
    """POST /api/sessions, asserting 200; the response body."""
    headers = {**caller.headers, **kw.pop("headers", {})}
    if body is None:
        r = client.post("/api/sessions", headers=headers, **kw)
    else:
        r = client.post("/api/sessions", headers=headers, json=body, **kw)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def new_uuid() -> str:
    return str(uuid.uuid4())
