"""An oversized JSON body is 413 and changes nothing (SPEC §6, issue 11), on every route
that takes a body, whether its length is declared or it arrives chunked."""

from __future__ import annotations

import json
from collections.abc import Iterator

from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller
from tests.support.rows import row_counts, sql
from worker.config import get_settings


def _state() -> list[object]:
    return [
        row_counts(),
        sql("SELECT s::text FROM sessions s ORDER BY id"),
        sql("SELECT c::text FROM chats c ORDER BY id"),
        sql("SELECT count(*) FROM chat_messages"),
    ]


def test_an_oversized_body_is_413_and_changes_nothing(client: TestClient, caller: Caller) -> None:
    created = create(client, caller)
    sid, chat = created["session"]["id"], created["chat"]["id"]
    limit = get_settings().max_body_bytes
    big = json.dumps({"title": "x" * limit}).encode()
    assert len(big) > limit
    routes = [
        ("POST", "/api/sessions"),
        ("PATCH", f"/api/sessions/{sid}"),
        ("POST", f"/api/sessions/{sid}/extend"),
        ("POST", f"/api/sessions/{sid}/chats"),
        ("PATCH", f"/api/sessions/{sid}/chats/{chat}"),
        ("POST", f"/api/sessions/{sid}/chats/{chat}/messages"),
        ("POST", f"/api/sessions/{sid}/chats/{chat}/read"),
        ("POST", f"/api/sessions/{sid}/chats/{chat}/stream"),
    ]
    headers = {**caller.headers, "content-type": "application/json"}
    before = _state()

    def chunked() -> Iterator[bytes]:
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    for method, path in routes:
        declared = client.request(method, path, headers=headers, content=big)
        assert_error(declared, 413, case=(method, path))
        streamed = client.request(method, path, headers=headers, content=chunked())
        assert_error(streamed, 413, case=(method, path, "chunked"))
    assert _state() == before
    # The limit is the limit: a body of exactly that size is read (and judged on its merits).
    exact = json.dumps({"title": "y" * (limit - 20)}).encode().ljust(limit)
    r = client.request("PATCH", f"/api/sessions/{sid}", headers=headers, content=exact)
    assert r.status_code == 400, r.text  # a title that long is refused as too long, not 413
