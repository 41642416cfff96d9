"""/openapi.json describes the API truthfully; /healthz and /readyz (SPEC §2, §3)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.support.factories import Caller

ROUTES = {
    "/api/sessions": {"post", "get"},
    "/api/sessions/{session_id}": {"get", "patch"},
    "/api/sessions/{session_id}/sandbox": {"post"},
    "/api/sessions/{session_id}/hibernate": {"post"},
    "/api/sessions/{session_id}/snapshots": {"post"},
    "/api/sessions/{session_id}/diff": {"post", "get"},
    "/api/sessions/{session_id}/activity": {"post"},
    "/api/sessions/{session_id}/runs": {"get"},
    "/healthz": {"get"},
    "/readyz": {"get"},
}


@pytest.fixture
def spec(client: TestClient) -> dict[str, Any]:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    return r.json()  # type: ignore[no-any-return]


def _resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def test_every_route_is_listed_with_its_methods(spec: dict[str, Any]) -> None:
    listed = {
        path: {m for m in ops if m in {"get", "post", "put", "patch", "delete"}}
        for path, ops in spec["paths"].items()
    }
    for path, methods in ROUTES.items():
        assert listed.get(path) == methods, (path, listed.get(path))


def test_every_listed_route_is_really_served(client: TestClient, spec: dict[str, Any]) -> None:
    """No route in the document answers 404/405 for lack of a handler."""
    for path, ops in spec["paths"].items():
        for method in ops:
            concrete = path.replace("{session_id}", "00000000-0000-0000-0000-000000000000")
            r = client.request(method.upper(), concrete)
            assert r.status_code not in (405,), (method, path)
            if r.status_code == 404:
                assert r.json()["error"] == "Session not found", (method, path)


def test_create_request_body_is_documented(spec: dict[str, Any]) -> None:
    op = spec["paths"]["/api/sessions"]["post"]
    body = op["requestBody"]
    assert body.get("required") is not True  # an empty body is valid
    schema = _resolve(spec, body["content"]["application/json"]["schema"])
    props = schema["properties"]
    assert set(props) >= {"title", "organizationId", "artistId"}
    assert not schema.get("required")

    def types(p: dict[str, Any]) -> list[dict[str, Any]]:
        return list(p.get("anyOf", [p]))

    assert {"type": "string"} in [{"type": t["type"]} for t in types(props["title"])]
    for uuid_field in ("organizationId", "artistId"):
        assert any(
            t.get("type") == "string" and t.get("format") == "uuid"
            for t in types(props[uuid_field])
        ), props[uuid_field]


def test_create_response_documents_session_and_chat(spec: dict[str, Any]) -> None:
    from tests.support.api import SEED_CHAT_FIELDS, SEED_SESSION_FIELDS

    op = spec["paths"]["/api/sessions"]["post"]
    created = _resolve(spec, op["responses"]["200"]["content"]["application/json"]["schema"])
    assert set(created["required"]) == {"session", "chat"}
    session = _resolve(spec, created["properties"]["session"])
    chat = _resolve(spec, created["properties"]["chat"])
    assert set(SEED_SESSION_FIELDS) | {"status", "lifecycleState"} <= set(session["properties"])
    assert set(SEED_CHAT_FIELDS) <= set(chat["properties"])
    for code in ("400", "401", "403"):
        assert code in op["responses"], code


def test_patch_body_is_documented(spec: dict[str, Any]) -> None:
    body = spec["paths"]["/api/sessions/{session_id}"]["patch"]["requestBody"]
    schema = _resolve(spec, body["content"]["application/json"]["schema"])
    assert set(schema["properties"]) >= {"title", "status", "linesAdded", "linesRemoved"}


def test_kicks_are_documented_as_202(spec: dict[str, Any]) -> None:
    for kick in ("sandbox", "hibernate", "snapshots", "diff"):
        op = spec["paths"][f"/api/sessions/{{session_id}}/{kick}"]["post"]
        assert "202" in op["responses"], kick


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_readyz_with_the_real_servers(client: TestClient) -> None:
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ok"
    assert r.json()["checks"] == {"database": "ok", "broker": "ok"}


def test_docs_need_no_key(client: TestClient, caller: Caller) -> None:
    assert client.get("/openapi.json").status_code == 200
    assert client.get("/healthz", headers=caller.headers).status_code == 200
