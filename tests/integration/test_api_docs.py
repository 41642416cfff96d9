"""``/docs`` and ``/redoc`` work offline: every asset they load is served by the API
itself; the OpenAPI document declares how to authenticate. With Debian's chromium
installed, a headless browser with every non-loopback host unresolvable renders the
operations (``make docs-screenshot`` keeps its picture under ``docs/``)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from tests.support.factories import Caller
from worker.config import get_settings

_URL = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']|url:\s*["']([^"']+)["']""")


def _loaded_urls(html: str) -> list[str]:
    return [a or b for a, b in _URL.findall(html)]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_nothing_from_outside(client: TestClient, page: str) -> None:
    r = client.get(page)
    assert r.status_code == 200
    urls = _loaded_urls(r.text)
    assert urls, "the page loads its bundle"
    assert not re.search(r"https?://", r.text), r.text
    for url in urls:
        assert url.startswith("/"), url
        assert client.get(url).status_code == 200, url


def test_the_openapi_document_declares_the_key_schemes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["BearerKey"]["scheme"] == "bearer"
    create = schema["paths"]["/api/sessions"]["post"]
    assert create["security"] == [{"ApiKeyHeader": []}, {"BearerKey": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def render(chromium: str, url: str, out: Path, screenshot: Path | None = None) -> str:
    """The page's DOM after scripts ran, in headless chromium that can reach loopback
    only (every other host name resolves to nothing)."""
    args = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--user-data-dir={out / 'profile'}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=15000",
        "--window-size=1280,1600",
    ]
    if screenshot is not None:
        args.append(f"--screenshot={screenshot}")
    else:
        args.append("--dump-dom")
    done = subprocess.run(
        [*args, url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HOME": str(out)},
    )
    return done.stdout


def test_headless_chromium_renders_the_operations_with_no_network(
    live_api: str, tmp_path: Path
) -> None:
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    dom = render(chromium, f"{live_api}/docs", tmp_path)
    # Swagger UI draws one block per operation, with its path.
    assert dom.count('class="opblock ') >= 10, dom[:2000]
    assert "/api/sessions/{session_id}" in dom
    keep = os.environ.get("LIFECYCLE_DOCS_SCREENSHOT")
    if keep:
        with contextlib.suppress(FileNotFoundError):
            Path(keep).unlink()
        render(chromium, f"{live_api}/docs", tmp_path, screenshot=Path(keep))
        assert Path(keep).stat().st_size > 10_000


def test_the_document_states_the_limits_the_server_enforces(
    client: TestClient, caller: Caller
) -> None:
    """What the OpenAPI document says about limits is what the server does."""
    schema = client.get("/openapi.json").json()
    listing = {p["name"]: p for p in schema["paths"]["/api/sessions"]["get"]["parameters"]}
    limit = listing["limit"]["schema"]
    assert (limit["type"], limit["minimum"], limit["maximum"]) == ("integer", 1, 100)
    states = listing["status"]["schema"]["enum"]
    create = schema["paths"]["/api/sessions"]["post"]
    key = next(p for p in create["parameters"] if p["name"] == "Idempotency-Key")["schema"]
    body = create["requestBody"]["content"]["application/json"]["schema"]
    title_max = body["properties"]["title"]["anyOf"][0]["maxLength"]
    assert f"at most {get_settings().max_body_bytes} bytes" in create["requestBody"]["description"]

    def listed(**params: str) -> int:
        r = client.get("/api/sessions", params=params, headers=caller.headers)
        return r.status_code

    assert listed(limit=str(limit["maximum"])) == 200
    assert listed(limit=str(limit["minimum"])) == 200
    assert listed(limit=str(limit["maximum"] + 1)) == 400
    assert listed(limit=str(limit["minimum"] - 1)) == 400
    assert all(listed(status=s) == 200 for s in states)
    assert listed(status="bogus") == 400

    def created(headers: dict[str, str], body: dict[str, str] | None = None) -> int:
        r = client.post("/api/sessions", headers={**caller.headers, **headers}, json=body or {})
        return r.status_code

    assert created({"Idempotency-Key": "k" * key["maxLength"]}) == 200
    assert created({"Idempotency-Key": "k" * (key["maxLength"] + 1)}) == 400
    assert created({}, {"title": "t" * title_max}) == 200
    assert created({}, {"title": "t" * (title_max + 1)}) == 400
