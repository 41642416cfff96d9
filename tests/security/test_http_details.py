"""HTTP details a hostile or merely unusual client meets (issue 11): 405 names what is
allowed, conditional requests compare entity tags as RFC 9110 says, and a client that
goes away mid-body costs one info log line, not an error with a traceback."""

from __future__ import annotations

import json
import socket
from collections import defaultdict
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api_stub.conditional import if_match_holds, none_match, parse_tags
from tests.support.api import create
from tests.support.factories import Caller, make_caller
from tests.support.processes import wait_until
from tests.support.stack import Stack

# --------------------------------------------------------------------------- 405


def test_405_names_the_allowed_methods_on_every_path(client: TestClient, caller: Caller) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    sid, chat = "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"
    for template, operations in paths.items():
        # Every other path parameter (command, webhook, ...) gets an id of its own.
        path = template.format_map(defaultdict(lambda: sid, session_id=sid, chat_id=chat))
        allowed = {m.upper() for m in operations}
        refused = next(m for m in ("PUT", "DELETE", "PATCH", "POST") if m not in allowed)
        r = client.request(refused, path, headers=caller.headers)
        assert r.status_code == 405, (refused, template, r.status_code)
        assert r.json()["status"] == "error"
        assert "allow" in r.headers, (refused, template, dict(r.headers))
        named = {m.strip() for m in r.headers["allow"].split(",")}
        assert named - {"HEAD"} == allowed, (template, named)


# --------------------------------------------------------------------------- ETags

TAG = '"0123abcd"'


@pytest.mark.parametrize(
    ("header", "matches"),
    [
        ("*", True),
        (TAG, True),
        (f"W/{TAG}", True),  # weak comparison: W/ is ignored
        (f'"other", {TAG}', True),
        (f'W/"other",W/{TAG}', True),
        (f' "a,b" ,  , {TAG} ', True),  # a comma inside a tag; empty list elements
        ('"other"', False),
        ('W/"other"', False),
        ('"0123abcd', False),  # malformed: matches nothing
        ("0123abcd", False),
        ('"a,b"', False),
        ("", False),
    ],
)
def test_if_none_match_uses_the_weak_comparison(header: str, matches: bool) -> None:
    assert none_match(header, TAG) is matches


@pytest.mark.parametrize(
    ("header", "holds"),
    [
        ("*", True),
        (TAG, True),
        (f'"other", {TAG}', True),
        (f"W/{TAG}", False),  # strong comparison: a weak tag never matches
        (f'"a,b", W/{TAG}', False),
        ('"other"', False),
        ("0123abcd", False),
        ('"a,b"', False),
    ],
)
def test_if_match_uses_the_strong_comparison(header: str, holds: bool) -> None:
    assert if_match_holds(header, TAG) is holds


def test_parse_tags() -> None:
    assert parse_tags(' W/"a", "b,c",,"" ') == [(True, '"a"'), (False, '"b,c"'), (False, '""')]
    assert parse_tags(" * ") == "*"
    assert parse_tags('"a" "b"') is None
    assert parse_tags('"a", *') is None


def test_conditional_get_and_patch_of_a_session(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    path = f"/api/sessions/{sid}"
    etag = client.get(path, headers=caller.headers).headers["etag"]
    for header in ("*", etag, f"W/{etag}", f'"nope", W/{etag}'):
        r = client.get(path, headers={**caller.headers, "If-None-Match": header})
        assert r.status_code == 304, header
        assert r.headers["etag"] == etag
    for header in ('"nope"', f'W/{etag[:-2]}x"', "garbage"):
        assert (
            client.get(path, headers={**caller.headers, "If-None-Match": header}).status_code == 200
        )
    # If-Match: strong comparison; a weak tag does not let a write through.
    r = client.patch(path, headers={**caller.headers, "If-Match": f"W/{etag}"}, json={"title": "a"})
    assert r.status_code == 412, r.text
    r = client.patch(
        path, headers={**caller.headers, "If-Match": f'"x", {etag}'}, json={"title": "a"}
    )
    assert r.status_code == 200, r.text
    r = client.patch(path, headers={**caller.headers, "If-Match": "*"}, json={"title": "b"})
    assert r.status_code == 200, r.text


def test_conditional_get_and_patch_of_a_chat(client: TestClient, caller: Caller) -> None:
    created = create(client, caller)
    path = f"/api/sessions/{created['session']['id']}/chats/{created['chat']['id']}"
    etag = client.get(path, headers=caller.headers).headers["etag"]
    for header in ("*", f"W/{etag}"):
        r = client.get(path, headers={**caller.headers, "If-None-Match": header})
        assert r.status_code == 304, header
    r = client.patch(path, headers={**caller.headers, "If-Match": f"W/{etag}"}, json={"title": "a"})
    assert r.status_code == 412, r.text
    r = client.patch(path, headers={**caller.headers, "If-Match": etag}, json={"title": "a"})
    assert r.status_code == 200, r.text


# --------------------------------------------------------------------------- disconnect


def _log_lines(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for raw in (stack.logs / "api.log").read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            lines.append({"event": raw, "level": "raw"})
    return lines


def test_a_client_gone_mid_body_is_one_info_line(api_server: Stack, db_clean: object) -> None:
    caller = make_caller("Ada")
    created = httpx.post(
        f"{api_server.base_url}/api/sessions",
        headers={**caller.headers, "X-Request-ID": "create-before-disconnects"},
        json={},
    )
    sid = created.json()["session"]["id"]
    requests = [
        ("POST", "/api/sessions"),
        ("PATCH", f"/api/sessions/{sid}"),
        ("POST", f"/api/sessions/{sid}/extend"),
    ]
    # The create's own access line is written after its answer: count from after it.
    wait_until(
        lambda: any(
            ln.get("request_id") == "create-before-disconnects" for ln in _log_lines(api_server)
        ),
        timeout=60,
        what="the create's access line",
    )
    before = len(_log_lines(api_server))
    for method, path in requests:
        with socket.create_connection(("127.0.0.1", api_server.port), timeout=30) as s:
            s.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: api\r\nx-api-key: {caller.key}\r\n"
                'content-type: application/json\r\ncontent-length: 1000\r\n\r\n{"title": '.encode()
            )
    # Wait until the server has logged something about each of them (bounded loop).

    def logged() -> list[dict[str, Any]] | None:
        new = _log_lines(api_server)[before:]
        return new if len(new) >= len(requests) else None

    new = wait_until(logged, timeout=60, what="the server to log the requests")
    # One info line each: the request's access line, status 499 (client closed request).
    # (in any order: the server handles the three at once)
    assert sorted(
        (ln.get("event"), ln.get("level"), ln.get("method"), ln.get("status")) for ln in new
    ) == sorted(("http.request", "info", method, 499) for method, _ in requests), new
    assert not any("Traceback" in json.dumps(ln) for ln in new)
