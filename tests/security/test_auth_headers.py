"""Authentication is unambiguous (SPEC §3, issue 11): each auth header at most once.

Sent over a raw connection to the real server, because HTTP client libraries merge or
refuse repeated headers; ``http.client`` writes each ``putheader`` call as its own line."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from tests.support.factories import Caller, make_caller
from tests.support.stack import Stack

BOTH_OR_NEITHER = "Exactly one of x-api-key or Authorization must be provided"


def raw_request(
    stack: Stack, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b""
) -> tuple[int, Any]:
    """One request with exactly these header lines (repeats kept); status and JSON body."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    try:
        conn.putrequest(method, path)
        for name, value in headers:
            conn.putheader(name, value)
        if body or method in ("POST", "PATCH"):
            conn.putheader("content-type", "application/json")
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body or None)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else None
    finally:
        conn.close()


@pytest.fixture
def callers(db_clean: dict[str, str]) -> tuple[Caller, Caller]:
    return make_caller("Ada"), make_caller("Bob")


def _repeats(a: Caller, b: Caller) -> list[list[tuple[str, str]]]:
    return [
        [("x-api-key", a.key), ("x-api-key", a.key)],  # the same valid key twice
        [("x-api-key", a.key), ("x-api-key", b.key)],  # two valid keys of two accounts
        [("x-api-key", a.key), ("x-api-key", "slk_nope")],
        [("x-api-key", "slk_nope"), ("x-api-key", a.key)],
        [("X-Api-Key", a.key), ("x-api-key", a.key)],  # names compare case-insensitively
        [("Authorization", f"Bearer {a.key}"), ("Authorization", f"Bearer {a.key}")],
        [("Authorization", f"Bearer {a.key}"), ("Authorization", f"Bearer {b.key}")],
        [("Authorization", "Bearer slk_nope"), ("Authorization", f"Bearer {a.key}")],
        [("x-api-key", a.key), ("x-api-key", a.key), ("Authorization", f"Bearer {a.key}")],
    ]


def test_one_header_once_authenticates(api_server: Stack, callers: tuple[Caller, Caller]) -> None:
    """The raw client itself is sound: a single header works on every kind of route."""
    a, _ = callers
    status, body = raw_request(api_server, "POST", "/api/sessions", [("x-api-key", a.key)], b"{}")
    assert status == 200, body
    sid = body["session"]["id"]
    for headers in ([("x-api-key", a.key)], [("Authorization", f"Bearer {a.key}")]):
        assert raw_request(api_server, "GET", f"/api/sessions/{sid}", headers)[0] == 200
        assert raw_request(api_server, "GET", "/api/sessions", headers)[0] == 200


def test_a_repeated_auth_header_is_401_whatever_the_values(
    api_server: Stack, callers: tuple[Caller, Caller]
) -> None:
    a, b = callers
    status, body = raw_request(api_server, "POST", "/api/sessions", [("x-api-key", a.key)], b"{}")
    assert status == 200, body
    sid = body["session"]["id"]
    for headers in _repeats(a, b):
        for method, path, payload in (
            ("POST", "/api/sessions", b"{}"),
            ("GET", "/api/sessions", b""),
            ("GET", f"/api/sessions/{sid}", b""),
            ("PATCH", f"/api/sessions/{sid}", b'{"title": "changed"}'),
            ("POST", f"/api/sessions/{sid}/sandbox", b""),
            ("GET", f"/api/sessions/{sid}/chats", b""),
        ):
            status, body = raw_request(api_server, method, path, headers, payload)
            assert (status, body) == (401, {"status": "error", "error": BOTH_OR_NEITHER}), (
                method,
                path,
                headers,
            )
    # Nothing was created or changed by any of them.
    status, body = raw_request(api_server, "GET", "/api/sessions", [("x-api-key", a.key)])
    assert [s["id"] for s in body["sessions"]] == [sid]
    assert body["sessions"][0]["title"] != "changed"
    status, body = raw_request(api_server, "GET", "/api/sessions", [("x-api-key", b.key)])
    assert body["sessions"] == []
