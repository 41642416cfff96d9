"""The API's documentation pages, served from packaged assets (no CDN: they work offline
and behind a firewall), and the OpenAPI document's security schemes."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from worker.config import Settings

#: Where the Swagger UI and ReDoc bundles are served from (the ``fastapi-offline``
#: package's copies of them; nothing else of that package is used).
ASSETS_URL = "/docs-assets"

#: The two ways to send a key (SPEC §3: exactly one of them per request).
SECURITY_SCHEMES: dict[str, Any] = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    "BearerKey": {
        "type": "http",
        "scheme": "bearer",
        "description": "`Authorization: Bearer <API key>`",
    },
}
_AUTH_HEADERS = {"x-api-key", "authorization"}


def _assets_dir() -> str:
    return str(files("fastapi_offline") / "static")


def install(app: FastAPI) -> None:
    """``/docs`` (Swagger UI) and ``/redoc`` from local assets, and security schemes on
    every operation that takes an API key. Create the app with ``docs_url=None,
    redoc_url=None``."""
    app.mount(ASSETS_URL, StaticFiles(directory=_assets_dir()), name="docs-assets")
    title = app.title

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # The default validator badge calls validator.swagger.io.
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/openapi.json",
            title=f"{title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            add_security(schema)
            add_limits(schema, app.state.settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def add_security(schema: dict[str, Any]) -> None:
    """Declare the key schemes, and require one of them on every operation that reads an
    auth header (the header parameters stay, describing the exact-one rule)."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            names = {
                str(p.get("name", "")).lower()
                for p in operation.get("parameters", [])
                if p.get("in") == "header"
            }
            if names & _AUTH_HEADERS:
                operation["security"] = [{"ApiKeyHeader": []}, {"BearerKey": []}]


_RANGE = re.compile(r"^(\d+)-(\d+), default (\d+)$")
_WAIT = re.compile(r"\((\d+)-(\d+)\)")
#: The longest ``Idempotency-Key`` the server takes (``services/idempotency.py``).
IDEMPOTENCY_KEY_MAX = 255


def add_limits(schema: dict[str, Any], settings: Settings) -> None:
    """State in the document the limits the routes enforce themselves (they parse
    their query strings by hand, for their own 400 messages): page sizes and waits as
    bounded integers, list filters as enums, the ``Idempotency-Key`` length, the title
    length and the body size the server answers 413 past."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            if not isinstance(operation, dict):
                continue
            for param in operation.get("parameters", []):
                _limit_param(param)
            body = operation.get("requestBody")
            if isinstance(body, dict) and "application/json" in body.get("content", {}):
                body["description"] = (
                    f"JSON, at most {settings.max_body_bytes} bytes (413 past that)."
                )
    paths = schema.get("paths", {})
    for path, method in (("/api/sessions", "post"), ("/api/sessions/{session_id}", "patch")):
        body = paths.get(path, {}).get(method, {}).get("requestBody", {})
        json_schema = body.get("content", {}).get("application/json", {}).get("schema", {})
        title = json_schema.get("properties", {}).get("title")
        if isinstance(title, dict):
            for variant in title.get("anyOf", [title]):
                if variant.get("type") == "string":
                    variant["maxLength"] = settings.max_title_length


def _limit_param(param: dict[str, Any]) -> None:
    name, description = param.get("name"), str(param.get("description") or "")
    if name == "limit" and (m := _RANGE.match(description)):
        low, high, default = (int(g) for g in m.groups())
        param["schema"] = {"type": "integer", "minimum": low, "maximum": high, "default": default}
    elif name == "wait" and (m := _WAIT.search(description)):
        low, high = (int(g) for g in m.groups())
        param["schema"] = {"type": "integer", "minimum": low, "maximum": high}
    elif name == "status" and param.get("in") == "query" and "|" in description:
        param["schema"] = {"type": "string", "enum": description.split("|")}
    elif name == "Idempotency-Key":
        param["schema"] = {"type": "string", "minLength": 1, "maxLength": IDEMPOTENCY_KEY_MAX}
        param["description"] = "Replays the first answer for 24 h (1-255 characters)."
