"""Refused requests: exact SPEC status codes and messages, the error body shape, and no
row written (SPEC §3 and §6, issue 2 "Must show" 3)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create, new_uuid
from tests.support.factories import Caller, add_member, make_account, make_caller
from tests.support.rows import row_counts
from worker.db.engine import get_sessionmaker
from worker.services import accounts

BOTH_OR_NEITHER = "Exactly one of x-api-key or Authorization must be provided"
KICKS = ("sandbox", "hibernate", "snapshots", "diff")


@pytest.fixture
def unchanged(client: TestClient) -> Iterator[None]:
    """The test's requests write no row at all."""
    before = row_counts()
    yield
    assert row_counts() == before


# --------------------------------------------------------------------------- 401


@pytest.mark.usefixtures("unchanged")
def test_no_key_is_401(client: TestClient) -> None:
    assert_error(client.post("/api/sessions", json={}), 401, BOTH_OR_NEITHER)


@pytest.mark.usefixtures("unchanged")
def test_both_headers_is_401(client: TestClient, caller: Caller) -> None:
    headers = {"x-api-key": caller.key, "Authorization": f"Bearer {caller.key}"}
    assert_error(client.post("/api/sessions", headers=headers, json={}), 401, BOTH_OR_NEITHER)


@pytest.mark.usefixtures("unchanged")
def test_unknown_key_is_401(client: TestClient, caller: Caller) -> None:
    for headers in (
        {"x-api-key": "slk_not-a-real-key"},
        {"x-api-key": caller.key + "x"},
        {"Authorization": "Bearer slk_not-a-real-key"},
    ):
        assert_error(client.post("/api/sessions", headers=headers, json={}), 401, "Unauthorized")


@pytest.mark.usefixtures("unchanged")
def test_expired_key_is_401(client: TestClient, db_clean: object) -> None:
    expiring = make_caller("Brief", expires_in=0.5)
    time.sleep(1.0)  # let it expire; nothing below depends on how long anything took
    assert_error(client.post("/api/sessions", headers=expiring.headers), 401, "Unauthorized")
    bearer = {"Authorization": f"Bearer {expiring.key}"}
    assert_error(client.post("/api/sessions", headers=bearer), 401, "Unauthorized")


def test_revoked_key_is_401(client: TestClient, caller: Caller) -> None:
    create(client, caller)  # the key works ...
    with get_sessionmaker().begin() as db:
        accounts.revoke_key(db, caller.key_id)
    before = row_counts()
    # ... and stops working once revoked.
    assert_error(client.post("/api/sessions", headers=caller.headers), 401, "Unauthorized")
    assert_error(client.get("/api/sessions", headers=caller.headers), 401, "Unauthorized")
    assert row_counts() == before


@pytest.mark.usefixtures("unchanged")
def test_malformed_authorization_is_401(client: TestClient, caller: Caller) -> None:
    for authorization in ["Basic {key}", "Token {key}", "Bearer", "Bearer ", "{key}", "Bearer  "]:
        headers = {"Authorization": authorization.format(key=caller.key)}
        r = client.post("/api/sessions", headers=headers, json={})
        assert_error(r, 401, "Unauthorized", case=authorization)


@pytest.mark.usefixtures("unchanged")
def test_empty_api_key_is_401(client: TestClient) -> None:
    assert_error(client.post("/api/sessions", headers={"x-api-key": ""}), 401)


@pytest.mark.usefixtures("unchanged")
def test_auth_is_checked_before_the_body(client: TestClient) -> None:
    bad_json = {"content-type": "application/json"}
    assert_error(
        client.post("/api/sessions", content=b"{not json", headers=bad_json), 401, BOTH_OR_NEITHER
    )
    assert_error(
        client.post(
            "/api/sessions", content=b"{not json", headers={**bad_json, "x-api-key": "slk_nope"}
        ),
        401,
        "Unauthorized",
    )
    assert_error(
        client.post("/api/sessions", json={"organizationId": "nope"}), 401, BOTH_OR_NEITHER
    )
    big = b'{"title": "' + b"x" * (10 * 1024 * 1024) + b'"}'
    assert_error(client.post("/api/sessions", content=big, headers=bad_json), 401)


def test_every_session_endpoint_requires_a_key(client: TestClient, caller: Caller) -> None:
    sid = create(client, caller)["session"]["id"]
    before = row_counts()
    for method, path in [
        ("GET", "/api/sessions"),
        ("GET", f"/api/sessions/{sid}"),
        ("PATCH", f"/api/sessions/{sid}"),
        *[("POST", f"/api/sessions/{sid}/{k}") for k in KICKS],
        ("POST", f"/api/sessions/{sid}/activity"),
        ("GET", f"/api/sessions/{sid}/diff"),
        ("GET", f"/api/sessions/{sid}/runs"),
    ]:
        assert_error(client.request(method, path), 401, BOTH_OR_NEITHER)
        assert_error(
            client.request(method, path, headers={"x-api-key": "slk_x"}), 401, "Unauthorized"
        )
    assert row_counts() == before


# --------------------------------------------------------------------------- 403 / 404


@pytest.mark.usefixtures("unchanged")
def test_foreign_org_is_403(client: TestClient, caller: Caller) -> None:
    org = make_account("Other Org", org=True)
    r = client.post("/api/sessions", headers=caller.headers, json={"organizationId": str(org)})
    assert_error(r, 403, "Access denied to specified organization_id")


@pytest.mark.usefixtures("unchanged")
def test_membership_of_another_org_does_not_open_this_one(
    client: TestClient, caller: Caller
) -> None:
    mine, theirs = make_account("Mine", org=True), make_account("Theirs", org=True)
    add_member(mine, caller.account_id)
    r = client.post("/api/sessions", headers=caller.headers, json={"organizationId": str(theirs)})
    assert_error(r, 403, "Access denied to specified organization_id")


@pytest.mark.usefixtures("unchanged")
def test_unknown_org_is_403(client: TestClient, caller: Caller) -> None:
    r = client.post("/api/sessions", headers=caller.headers, json={"organizationId": new_uuid()})
    assert_error(r, 403, "Access denied to specified organization_id")


@pytest.mark.usefixtures("unchanged")
def test_a_person_account_is_not_an_org(client: TestClient, caller: Caller) -> None:
    other_person = make_account("Bob")
    for org_id in (caller.account_id, other_person):
        r = client.post(
            "/api/sessions", headers=caller.headers, json={"organizationId": str(org_id)}
        )
        assert_error(r, 403, "Access denied to specified organization_id")


@pytest.mark.usefixtures("unchanged")
def test_org_key_cannot_use_another_org(client: TestClient, db_clean: object) -> None:
    org, other = make_account("Acme", org=True), make_account("Globex", org=True)
    with get_sessionmaker().begin() as db:
        key = accounts.create_key(db, org)
    r = client.post(
        "/api/sessions", headers={"x-api-key": key.key}, json={"organizationId": str(other)}
    )
    assert_error(r, 403, "Access denied to specified organization_id")


def _session_routes(sid: str) -> list[tuple[str, str, dict[str, Any] | None]]:
    return [
        ("GET", f"/api/sessions/{sid}", None),
        ("PATCH", f"/api/sessions/{sid}", {"title": "hijacked", "status": "archived"}),
        *[("POST", f"/api/sessions/{sid}/{k}", None) for k in KICKS],
        ("POST", f"/api/sessions/{sid}/activity", None),
        ("GET", f"/api/sessions/{sid}/diff", None),
        ("GET", f"/api/sessions/{sid}/runs", None),
    ]


def test_another_accounts_session_is_403(client: TestClient, caller: Caller) -> None:
    owned = create(client, caller, {"title": "mine"})["session"]
    intruder = make_caller("Eve")
    before = row_counts()
    for method, path, body in _session_routes(owned["id"]):
        r = client.request(method, path, headers=intruder.headers, json=body)
        assert_error(r, 403, "Forbidden")
    assert row_counts() == before
    # the owner still sees the session exactly as it was
    r = client.get(f"/api/sessions/{owned['id']}", headers=caller.headers)
    assert r.status_code == 200
    assert r.json()["session"] == owned
    # and the intruder's listing does not show it
    assert client.get("/api/sessions", headers=intruder.headers).json()["sessions"] == []


@pytest.mark.usefixtures("unchanged")
def test_unknown_or_malformed_session_id_is_404(client: TestClient, caller: Caller) -> None:
    for sid in [str(uuid.UUID(int=1)), new_uuid(), "not-a-uuid", "123", "%20"]:
        for method, path, body in _session_routes(sid):
            r = client.request(method, path, headers=caller.headers, json=body)
            assert_error(r, 404, "Session not found", case=(method, path))


# --------------------------------------------------------------------------- 400 / 413


@pytest.mark.usefixtures("unchanged")
def test_malformed_json_is_400(client: TestClient, caller: Caller) -> None:
    headers = {**caller.headers, "content-type": "application/json"}
    for raw in [b"{", b'{"title": }', b"{'title': 'x'}", b"not json", b"\xff\xfe\x00", b'{"a":1}x']:
        r = client.post("/api/sessions", content=raw, headers=headers)
        assert_error(r, 400, "Invalid JSON body", case=raw)


@pytest.mark.usefixtures("unchanged")
@pytest.mark.parametrize("field", ["organizationId", "artistId"])
def test_non_uuid_ids_are_400(client: TestClient, caller: Caller, field: str) -> None:
    for value in [
        "not-a-uuid",
        "",
        "1234",
        "3c90c3cc-0d44-4b50-8888",
        42,
        ["x"],
        {"id": "x"},
        True,
    ]:
        r = client.post("/api/sessions", headers=caller.headers, json={field: value})
        body = assert_error(r, 400, f"{field} must be a valid UUID", case=value)
        assert body["missing_fields"] == [field]


@pytest.mark.usefixtures("unchanged")
def test_non_object_body_is_400(client: TestClient, caller: Caller) -> None:
    headers = {**caller.headers, "content-type": "application/json"}
    for raw in [b"[]", b'["title"]', b'"title"', b"42", b"null", b"true"]:
        assert_error(client.post("/api/sessions", content=raw, headers=headers), 400, case=raw)


@pytest.mark.usefixtures("unchanged")
def test_non_string_title_is_400(client: TestClient, caller: Caller) -> None:
    for title in [42, ["a"], {"t": 1}, False]:
        r = client.post("/api/sessions", headers=caller.headers, json={"title": title})
        body = assert_error(r, 400, case=title)
        assert body.get("missing_fields") == ["title"]


@pytest.mark.usefixtures("unchanged")
def test_title_over_the_limit_is_400(client: TestClient, caller: Caller) -> None:
    from worker.config import get_settings

    title = "y" * (get_settings().max_title_length + 1)
    r = client.post("/api/sessions", headers=caller.headers, json={"title": title})
    body = assert_error(r, 400)
    assert "title" in body["error"]


@pytest.mark.usefixtures("unchanged")
def test_ten_megabyte_title_is_refused(client: TestClient, caller: Caller) -> None:
    r = client.post(
        "/api/sessions", headers=caller.headers, json={"title": "z" * (10 * 1024 * 1024)}
    )
    assert r.status_code in (400, 413), r.status_code
    assert_error(r, r.status_code)


@pytest.mark.usefixtures("unchanged")
def test_ten_megabyte_body_without_content_length_is_refused(
    client: TestClient, caller: Caller
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"title": "'
        for _ in range(10):
            yield b"z" * (1024 * 1024)
        yield b'"}'

    headers = {**caller.headers, "content-type": "application/json"}
    r = client.post("/api/sessions", headers=headers, content=chunks())
    assert r.status_code in (400, 413), r.status_code
    assert_error(r, r.status_code)


@pytest.mark.usefixtures("unchanged")
def test_overlong_idempotency_key_is_400(client: TestClient, caller: Caller) -> None:
    headers = {**caller.headers, "Idempotency-Key": "k" * 256}
    assert_error(client.post("/api/sessions", headers=headers, json={}), 400)


@pytest.mark.usefixtures("unchanged")
def test_unknown_route_and_method_use_the_error_body(client: TestClient, caller: Caller) -> None:
    assert_error(client.get("/api/nothing-here", headers=caller.headers), 404)
    assert_error(client.delete("/api/sessions", headers=caller.headers), 405)


@pytest.mark.usefixtures("unchanged")
def test_title_postgres_cannot_store_is_400(client: TestClient, caller: Caller) -> None:
    """NUL and lone surrogates parse as JSON but are not storable text: 400, not 500."""
    headers = {**caller.headers, "content-type": "application/json"}
    for raw in [b'{"title": "a\\u0000b"}', b'{"title": "a\\ud800b"}']:
        r = client.post("/api/sessions", content=raw, headers=headers)
        assert assert_error(r, 400, case=raw)["missing_fields"] == ["title"]


@pytest.mark.usefixtures("unchanged")
def test_absurdly_nested_json_is_400(client: TestClient, caller: Caller) -> None:
    headers = {**caller.headers, "content-type": "application/json"}
    raw = b"[" * 30_000 + b"]" * 30_000
    assert_error(
        client.post("/api/sessions", content=raw, headers=headers), 400, "Invalid JSON body"
    )


@pytest.mark.usefixtures("unchanged")
def test_idempotency_key_with_nul_is_400(client: TestClient, caller: Caller) -> None:
    headers = {**caller.headers, "Idempotency-Key": "a\x00b"}
    assert_error(client.post("/api/sessions", headers=headers, json={}), 400)
