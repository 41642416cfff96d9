"""What every route does with a JSON body's fields, a page's ``limit`` and a resource's
ETag: one wording of each 400 (naming the field), one conditional GET."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from api_stub import conditional
from api_stub.schemas import etag_of
from worker.errors import InvalidInput

#: The largest integer a count column holds (PostgreSQL ``integer``).
INT_MAX = 2**31 - 1


def body_doc(model: type[BaseModel], *, required: bool = False) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON request body of ``model`` (routes read the raw
    body themselves, to answer bad JSON with their own 400 and size limit)."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema(by_alias=True)}},
        }
    }


def text(value: object, key: str) -> str:
    """``value`` as text PostgreSQL can store: a string, no NUL, valid UTF-8."""
    if not isinstance(value, str):
        raise InvalidInput(f"{key} must be a string", missing_fields=[key])
    if "\x00" in value or not _utf8(value):
        # PostgreSQL text cannot hold NUL, and lone surrogates are not UTF-8: refuse, not 500.
        raise InvalidInput(
            f"{key} must be valid text (no NUL or lone surrogates)", missing_fields=[key]
        )
    return value


def text_field(data: dict[str, Any], key: str) -> str | None:
    value = data.get(key)
    return None if value is None else text(value, key)


def _utf8(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def uuid_field(data: dict[str, Any], key: str) -> uuid.UUID | None:
    value = data.get(key)
    if value is None:
        return None
    try:
        if not isinstance(value, str):
            raise ValueError
        return uuid.UUID(value)
    except ValueError:
        raise InvalidInput(f"{key} must be a valid UUID", missing_fields=[key]) from None


def count_field(data: dict[str, Any], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT_MAX:
        raise InvalidInput(f"{key} must be an integer >= 0", missing_fields=[key])
    return value


def seconds_field(data: dict[str, Any], key: str) -> int | None:
    value = count_field(data, key)
    if value == 0:
        raise InvalidInput(f"{key} must be an integer >= 1", missing_fields=[key])
    return value


def limit_param(value: str | None, default: int = 20, maximum: int = 100) -> int:
    """A page's ``limit`` query parameter: 1..``maximum``, ``default`` when absent."""
    if value is None:
        return default
    if value.isdigit() and 1 <= int(value) <= maximum:
        return int(value)
    raise InvalidInput(f"limit must be an integer from 1 to {maximum}", missing_fields=["limit"])


def etag_response(
    key: str, data: dict[str, Any], if_none_match: str | None = None, status_code: int = 200
) -> Response:
    """``{key: data}`` with its ``ETag``, or 304 when ``If-None-Match`` matches it."""
    etag = etag_of(data)
    if if_none_match is not None and conditional.none_match(if_none_match, etag):
        return Response(status_code=304, headers={"ETag": etag})
    return JSONResponse({key: data}, status_code=status_code, headers={"ETag": etag})
