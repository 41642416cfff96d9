"""The create route's fast lane (``api_stub/fast_lane.py``) is the route: every answer
it gives is the one the ordinary routing gives, and the hot path really takes it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.factories import Caller, make_account
from worker.config import get_settings


@pytest.fixture
def lane_and_router(
    api_app: FastAPI, db_clean: dict[str, str], redis_client: object
) -> Iterator[tuple[TestClient, TestClient]]:
    """Two clients: one through the lane, one with the lane switched off."""
    from api_stub.main import create_app

    plain = create_app()
    del plain.state.create_lane
    with TestClient(api_app) as lane, TestClient(plain) as router:
        yield lane, router


def _requests(caller: Caller) -> list[tuple[str, dict[str, str], bytes]]:
    key = caller.headers["x-api-key"]
    big = json.dumps({"title": "x" * (get_settings().max_body_bytes + 10)}).encode()
    json_h = {"content-type": "application/json"}
    return [
        ("no key", json_h, b"{}"),
        ("bad key", {**json_h, "x-api-key": "slk_nope"}, b"{}"),
        ("bearer", {**json_h, "authorization": f"Bearer {key}"}, b'{"title": "a"}'),
        ("bad scheme", {**json_h, "authorization": f"Basic {key}"}, b"{}"),
        ("bad json", {**caller.headers, **json_h}, b"{nope"),
        ("not an object", {**caller.headers, **json_h}, b"[1]"),
        ("title type", {**caller.headers, **json_h}, b'{"title": 7}'),
        (
            "too long title",
            {**caller.headers, **json_h},
            json.dumps({"title": "t" * 5000}).encode(),
        ),
        ("too large", {**caller.headers, **json_h}, big),
        ("bad timeout", {**caller.headers, **json_h}, b'{"idleTimeoutSeconds": -1}'),
        (
            "foreign org",
            {**caller.headers, **json_h},
            json.dumps({"organizationId": str(make_account("O", org=True))}).encode(),
        ),
        ("bad org id", {**caller.headers, **json_h}, b'{"organizationId": "nope"}'),
        ("empty body", caller.headers, b""),
        ("retention", {**caller.headers, **json_h}, b'{"autoArchiveAfterSeconds": 60}'),
    ]


def _shape(r: Any) -> tuple[Any, ...]:
    body = r.json()
    if r.status_code == 200:  # ids and times differ; the document's shape must not
        body = {part: sorted(body[part]) for part in ("session", "chat")}
    return (r.status_code, body, r.headers.get("content-type"), "x-request-id" in r.headers)


def test_the_lane_answers_what_the_router_answers(
    lane_and_router: tuple[TestClient, TestClient], caller: Caller
) -> None:
    lane, router = lane_and_router
    for name, headers, body in _requests(caller):
        a = lane.post("/api/sessions", headers=headers, content=body)
        b = router.post("/api/sessions", headers=headers, content=body)
        assert _shape(a) == _shape(b), name
    # Repeated auth headers (a raw header list: a dict cannot hold two).
    two = [("x-api-key", caller.key), ("x-api-key", caller.key)]
    a = lane.post("/api/sessions", headers=two, content=b"{}")
    b = router.post("/api/sessions", headers=two, content=b"{}")
    assert _shape(a) == _shape(b) and a.status_code == 401
    # The same Idempotency-Key replays the first answer on either way in.
    key = {**caller.headers, "Idempotency-Key": f"lane-{uuid.uuid4()}"}
    first = lane.post("/api/sessions", headers=key, json={"title": "once"})
    assert router.post("/api/sessions", headers=key, json={"title": "once"}).json() == first.json()


def test_the_create_takes_the_lane_and_nothing_else_does(
    api_app: FastAPI, client: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[str] = []
    lane = api_app.state.create_lane

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        taken.append(f"{scope['method']} {scope['path']}")
        await lane(scope, receive, send)

    monkeypatch.setattr(api_app.state, "create_lane", counting)
    assert client.post("/api/sessions", headers=caller.headers, json={}).status_code == 200
    assert client.get("/api/sessions", headers=caller.headers).status_code == 200
    slash = client.post("/api/sessions/", headers=caller.headers, json={}, follow_redirects=False)
    assert slash.status_code == 307  # the router's redirect, not the lane
    r = client.put("/api/sessions", headers=caller.headers, json={})
    assert r.status_code == 405 and "POST" in r.headers["allow"]
    assert taken == ["POST /api/sessions"]
