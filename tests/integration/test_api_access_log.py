"""One access-log line per request: method, route template, status, duration, account,
request id; the request id is taken from the client when sane and returned; never a key."""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import create
from tests.support.factories import Caller


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [
        r.msg
        for r in caplog.records
        if r.name == "api.access" and isinstance(r.msg, dict) and r.msg["event"] == "http.request"
    ]


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="api.access")
    return caplog


def test_a_create_is_one_line_with_route_status_account_and_the_clients_request_id(
    client: TestClient, caller: Caller, access: pytest.LogCaptureFixture
) -> None:
    r = client.post(
        "/api/sessions", headers={**caller.headers, "X-Request-ID": "req-42.a:b"}, json={}
    )
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "req-42.a:b"
    (line,) = _access_lines(access)
    assert line["method"] == "POST"
    assert line["route"] == "/api/sessions"
    assert line["status"] == 200
    assert line["account_id"] == str(caller.account_id)
    assert line["request_id"] == "req-42.a:b"
    assert line["duration_ms"] >= 0
    # The key never reaches a log record, whatever the logger.
    assert all(caller.key not in r.getMessage() for r in access.records)
    assert all(caller.key not in str(r.msg) for r in access.records)


def test_routes_are_logged_as_templates_and_failures_with_their_status(
    client: TestClient, caller: Caller, access: pytest.LogCaptureFixture
) -> None:
    sid = create(client, caller)["session"]["id"]
    access.clear()
    assert client.get(f"/api/sessions/{sid}", headers=caller.headers).status_code == 200
    assert client.get(f"/api/sessions/{sid}").status_code == 401
    lines = _access_lines(access)
    assert [(x["route"], x["status"]) for x in lines] == [
        ("/api/sessions/{session_id}", 200),
        ("/api/sessions/{session_id}", 401),
    ]
    assert sid not in str(lines)
    assert lines[0]["account_id"] == str(caller.account_id)
    assert lines[1]["account_id"] is None


@pytest.mark.parametrize("sent", ["has space", "x" * 129, "semi;colon", ""])
def test_an_unusable_request_id_is_replaced_by_a_fresh_one(
    client: TestClient, sent: str, access: pytest.LogCaptureFixture
) -> None:
    r = client.get("/healthz", headers={"X-Request-ID": sent})
    made = r.headers["x-request-id"]
    assert made != sent and re.fullmatch(r"[0-9a-f]{32}", made)
    (line,) = _access_lines(access)
    assert line["request_id"] == made
    assert line["route"] == "/healthz"


def test_without_a_request_id_each_request_gets_its_own(client: TestClient) -> None:
    a = client.get("/healthz").headers["x-request-id"]
    b = client.get("/healthz").headers["x-request-id"]
    assert a != b
