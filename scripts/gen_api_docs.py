"""Render docs/api.md from the API's own OpenAPI document.

    python scripts/gen_api_docs.py            # rewrite docs/api.md
    python scripts/gen_api_docs.py --check    # exit 1 (with a diff) if it is out of date
    python scripts/gen_api_docs.py --stdout   # print it

The document comes from ``api_stub.main.create_app().openapi()``, built with the default
settings: every ``LIFECYCLE_*`` variable is dropped first, so the page is the same on
every machine. Creating the app connects to nothing (the database and broker URLs only
have to parse), so no server is needed. ``make api-docs`` runs the first form; a test
runs ``--check``.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "api.md"

# Never connected to: create_app() only parses them.
_PLACEHOLDER_ENV = {
    "LIFECYCLE_DATABASE_URL": "postgresql+psycopg://docs@127.0.0.1:1/unused",
    "LIFECYCLE_BROKER_URL": "redis://127.0.0.1:1/0",
    "LIFECYCLE_LOG_LEVEL": "WARNING",
}

_METHODS = ("get", "put", "post", "patch", "delete", "head", "options")

Schema = dict[str, Any]


def openapi_document() -> Schema:
    """The app's OpenAPI document under default settings (the environment is scrubbed)."""
    for name in [k for k in os.environ if k.startswith("LIFECYCLE_")]:
        del os.environ[name]
    os.environ.update(_PLACEHOLDER_ENV)
    sys.path.insert(0, str(ROOT))
    from api_stub.main import create_app

    document: Schema = create_app().openapi()
    return document


# --------------------------------------------------------------------------- helpers


def _cell(text: object) -> str:
    """Text that stays inside one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _anchor(name: str) -> str:
    return f"schema-{name.lower()}"


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_of(schema: Schema) -> str:
    """A short, readable type: ``string (uuid) | null``, ``array of [RunRead](#...)``."""
    if not schema:
        return "any"
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[{name}](#{_anchor(name)})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " or ".join(type_of(alt) for alt in schema[key])
    if "allOf" in schema:
        return " and ".join(type_of(part) for part in schema["allOf"])
    if "enum" in schema:
        return " or ".join(f"`{value!r}`".replace("'", '"') for value in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']!r}`".replace("'", '"')
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind)
    if kind == "array":
        return f"array of {type_of(schema.get('items', {}))}"
    if kind == "object" and "properties" not in schema:
        extra = schema.get("additionalProperties")
        return f"object of {type_of(extra)}" if isinstance(extra, dict) and extra else "object"
    if "format" in schema:
        return f"{kind} ({schema['format']})"
    return str(kind)


_LIMITS = (
    ("minLength", "at least {} characters"),
    ("maxLength", "at most {} characters"),
    ("minimum", "≥ {}"),
    ("exclusiveMinimum", "> {}"),
    ("maximum", "≤ {}"),
    ("exclusiveMaximum", "< {}"),
    ("minItems", "at least {} items"),
    ("maxItems", "at most {} items"),
    ("pattern", "matches `{}`"),
)


def limits_of(schema: Schema) -> list[str]:
    """The constraints a schema (or any of its alternatives) declares, and its default."""
    out: list[str] = []
    parts = [schema, *schema.get("anyOf", []), *schema.get("oneOf", [])]
    for part in parts:
        for key, words in _LIMITS:
            if key in part:
                out.append(words.format(part[key]))
    if "default" in schema and schema["default"] is not None:
        out.append(f"default `{schema['default']!r}`".replace("'", '"'))
    return out


def describe(schema: Schema, fallback: str = "") -> str:
    text = schema.get("description") or fallback
    limits = limits_of(schema)
    joined = "; ".join(x for x in (text.rstrip("."), "; ".join(limits)) if x)
    return _cell(joined)


def _fields_table(schema: Schema) -> list[str]:
    properties: dict[str, Schema] = schema.get("properties", {})
    if not properties:
        return []
    required = set(schema.get("required", []))
    lines = ["| field | type | required | description |", "|---|---|---|---|"]
    for name, prop in properties.items():
        lines.append(
            f"| `{name}` | {_cell(type_of(prop))} | {'yes' if name in required else 'no'} "
            f"| {describe(prop)} |"
        )
    return lines


# --------------------------------------------------------------------------- sections


def _security_text(operation: Schema, schemes: Schema) -> str:
    security = operation.get("security")
    if not security:
        return "none"
    names = [name for requirement in security for name in requirement]
    return " or ".join(f"[`{n}`](#authentication)" for n in names if n in schemes) or "none"


def _auth_headers(schemes: Schema) -> set[str]:
    """Header parameters the security schemes already describe."""
    headers: set[str] = set()
    for scheme in schemes.values():
        if scheme.get("type") == "apiKey" and scheme.get("in") == "header":
            headers.add(str(scheme["name"]).lower())
        if scheme.get("type") == "http":
            headers.add("authorization")
    return headers


def _parameters(operation: Schema, hidden: set[str]) -> list[str]:
    params = [
        p
        for p in operation.get("parameters", [])
        if not (p.get("in") == "header" and str(p.get("name", "")).lower() in hidden)
    ]
    if not params:
        return []
    lines = [
        "**Parameters**",
        "",
        "| name | in | type | required | description |",
        "|---|---|---|---|---|",
    ]
    for p in params:
        schema = p.get("schema", {})
        lines.append(
            f"| `{p['name']}` | {p['in']} | {_cell(type_of(schema))} "
            f"| {'yes' if p.get('required') else 'no'} "
            f"| {describe({**schema, 'description': p.get('description') or schema.get('description')})} |"
        )
    return [*lines, ""]


def _request_body(operation: Schema) -> list[str]:
    body = operation.get("requestBody")
    if not body:
        return []
    lines: list[str] = []
    for media, content in body.get("content", {}).items():
        schema: Schema = content.get("schema", {})
        need = "required" if body.get("required") else "optional"
        title = schema.get("title")
        named = f" — {type_of(schema)}" if "$ref" in schema else (f" — `{title}`" if title else "")
        lines += [f"**Request body** (`{media}`, {need}){named}", ""]
        if schema.get("description"):
            lines += [_cell(schema["description"]), ""]
        table = _fields_table(schema)
        lines += [*table, ""] if table else []
    return lines


def _responses(operation: Schema) -> list[str]:
    lines = ["**Responses**", "", "| status | meaning | body |", "|---|---|---|"]
    for status, response in sorted(operation.get("responses", {}).items()):
        bodies = [
            f"{type_of(content['schema'])} (`{media}`)" if content.get("schema") else f"`{media}`"
            for media, content in response.get("content", {}).items()
        ]
        lines.append(
            f"| {status} | {_cell(response.get('description', ''))} "
            f"| {_cell(', '.join(bodies)) or '—'} |"
        )
    return [*lines, ""]


def _operation(path: str, method: str, operation: Schema, schemes: Schema) -> list[str]:
    lines = [f"### `{method.upper()} {path}`", ""]
    if operation.get("summary"):
        lines += [f"**{operation['summary'].rstrip('.')}.**", ""]
    if operation.get("description"):
        lines += [" ".join(operation["description"].split()), ""]
    lines += [f"Auth: {_security_text(operation, schemes)}", ""]
    lines += _parameters(operation, _auth_headers(schemes) if operation.get("security") else set())
    lines += _request_body(operation)
    lines += _responses(operation)
    return lines


def _operations(document: Schema) -> list[tuple[str, str, str, Schema]]:
    """(tag, path, method, operation) in the document's order."""
    out = []
    for path, item in document.get("paths", {}).items():
        for method in _METHODS:
            if method in item:
                op = item[method]
                out.append(((op.get("tags") or ["other"])[0], path, method, op))
    return out


def _slug(text: str) -> str:
    """GitHub's heading anchor for ``### `METHOD /path` ``."""
    keep = [c for c in text.lower() if c.isalnum() or c in " -_"]
    return "".join(keep).replace(" ", "-")


def render(document: Schema) -> str:
    info = document.get("info", {})
    schemes: Schema = document.get("components", {}).get("securitySchemes", {})
    schemas: Schema = document.get("components", {}).get("schemas", {})
    ops = _operations(document)
    out = [
        "# API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from the app's OpenAPI document. "
        "Do not edit by hand: run `make api-docs`. -->",
        "",
        f"{info.get('title', 'API')} {info.get('version', '')}, OpenAPI "
        f"{document.get('openapi', '?')}. {info.get('description', '')}".rstrip(),
        "",
        "This page is generated from `create_app().openapi()` (`make api-docs`; a test fails "
        "when it is out of date). A running API serves the same document at "
        "`/openapi.json`, rendered at `/docs` and `/redoc`. The [README](../README.md) says "
        "what the endpoints promise; this page lists exactly what each one takes and answers.",
        "",
        "## Authentication",
        "",
        "Every operation marked with a scheme below takes an API key in exactly one of "
        "these ways (keys are made with `lifecycle keys create`; see "
        "[operations.md](operations.md#rotate-api-keys)).",
        "",
        "| scheme | how to send the key | note |",
        "|---|---|---|",
    ]
    for name, scheme in schemes.items():
        if scheme.get("type") == "apiKey":
            how = f"`{scheme.get('name')}: <key>` ({scheme.get('in')})"
        elif scheme.get("type") == "http":
            how = f"`Authorization: {str(scheme.get('scheme', '')).title()} <key>`"
        else:
            how = str(scheme.get("type"))
        out.append(f"| `{name}` | {how} | {_cell(scheme.get('description', ''))} |")
    out += [
        "",
        "## Errors",
        "",
        "Every error body is [ErrorBody](#schema-errorbody): "
        '`{"status": "error", "error": "<message>"}`. The document also lists FastAPI\'s '
        "`422` with `HTTPValidationError`; this API answers a request that fails validation "
        "with `400` and an ErrorBody instead (`api_stub/errors.py`).",
        "",
        "## Operations",
        "",
        "| method | path | summary | auth |",
        "|---|---|---|---|",
    ]
    for _tag, path, method, op in ops:
        heading = f"{method.upper()} {path}"
        auth = "key" if op.get("security") else "none"
        out.append(
            f"| {method.upper()} | [`{path}`](#{_slug(heading)}) "
            f"| {_cell(op.get('summary', ''))} | {auth} |"
        )
    out.append("")
    seen_tags: list[str] = []
    for tag, _path, _method, _op in ops:
        if tag not in seen_tags:
            seen_tags.append(tag)
    for tag in seen_tags:
        out += [f"## {tag.capitalize()}", ""]
        for op_tag, path, method, op in ops:
            if op_tag == tag:
                out += _operation(path, method, op, schemes)
    out += ["## Schemas", ""]
    for name, schema in schemas.items():
        out += [f'<a id="{_anchor(name)}"></a>', "", f"### {name}", ""]
        if schema.get("description"):
            out += [" ".join(schema["description"].split()), ""]
        table = _fields_table(schema)
        out += [*table, ""] if table else [f"Type: {type_of(schema)}", ""]
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="fail if docs/api.md is out of date")
    mode.add_argument("--stdout", action="store_true", help="print instead of writing")
    args = parser.parse_args(argv)
    text = render(openapi_document())
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = TARGET.read_text() if TARGET.exists() else ""
        if current == text:
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(
                current.splitlines(keepends=True),
                text.splitlines(keepends=True),
                "docs/api.md (committed)",
                "docs/api.md (from the code)",
            )
        )
        print("docs/api.md is out of date: run `make api-docs`", file=sys.stderr)
        return 1
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
