"""The HTTP API in-process (FastAPI's TestClient): the create call most tests start
with, the SPEC's error body, and the seed's field lists."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from fastapi.testclient import TestClient

from tests.support.factories import Caller

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
