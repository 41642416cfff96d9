"""docs/api.md is the OpenAPI document rendered by scripts/gen_api_docs.py: regenerating
it from the code must give the committed file, so the reference cannot drift from the API."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_api_reference_is_up_to_date() -> None:
    # A separate process: the script drops every LIFECYCLE_* variable to render with the
    # default settings, which must not leak into this test process.
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    result = subprocess.run(
        [sys.executable, "scripts/gen_api_docs.py", "--check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, (
        "docs/api.md differs from the app's OpenAPI document; run `make api-docs`.\n"
        + result.stdout[-4000:]
        + result.stderr[-2000:]
    )


def test_every_operation_is_in_the_reference() -> None:
    from api_stub.main import create_app

    text = (ROOT / "docs" / "api.md").read_text()
    for path, item in create_app().openapi()["paths"].items():
        for method in item:
            assert f"### `{method.upper()} {path}`" in text, (method, path)
