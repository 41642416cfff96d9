"""Files of a session's sandbox: list, read, write, delete under ``/workspace``.

Each request is done by the worker holding the sandbox (``worker/services/files.py``):
the API records it, sends it to that host's queue and waits for the answer, at most
``LIFECYCLE_FILE_OP_TIMEOUT_SECONDS`` (504 after). Paths are relative to the working
tree; links inside it are reported, never followed.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from api_stub.deps import (
    AccountDep,
    DbDep,
    RawBody,
    SettingsDep,
    app_settings,
    read_bounded,
    transaction,
)
from api_stub.routes.sessions import _ERRORS, _publish
from api_stub.schemas import ErrorBody
from worker.config import Settings
from worker.db.engine import get_sessionmaker
from worker.errors import InvalidInput, PayloadTooLarge
from worker.services import files, sessions

router = APIRouter(prefix="/api/sessions", tags=["files"])

_FILE_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    504: {"model": ErrorBody, "description": "the sandbox's host did not answer in time"},
}

PathQuery = Annotated[
    str | None,
    Query(description="Relative to the working tree (/workspace); no '..', no leading '/'"),
]


async def file_body(request: Request) -> RawBody:
    """The raw file content, read after authentication, at most ``file_max_bytes``."""
    return await read_bounded(request, app_settings(request).file_max_bytes)


FileBodyDep = Annotated[RawBody, Depends(file_body)]


def _run(
    request: Request,
    db: Any,
    account: Any,
    settings: Settings,
    session_id: str,
    op: str,
    path: str | None,
    *,
    content: bytes | None = None,
    recursive: bool = False,
) -> files.Answer:
    with transaction(db):
        record = sessions.get_owned(db, account, session_id)
        row, job = files.request(
            db, settings, record, op, path, content=content, recursive=recursive
        )
        op_id = row.id
    _publish(request, [job])
    return files.wait(get_sessionmaker(), op_id, settings.file_op_timeout_seconds)


def _recursive(value: str | None) -> bool:
    if value in (None, "false", "0"):
        return False
    if value in ("true", "1"):
        return True
    raise InvalidInput("recursive must be true or false", missing_fields=["recursive"])


@router.get("/{session_id}/files", responses=_FILE_ERRORS, summary="List a directory")
def list_files(
    request: Request,
    session_id: str,
    account: AccountDep,
    db: DbDep,
    settings: SettingsDep,
    path: PathQuery = None,
) -> Response:
    """The entries of a directory of the working tree (default: its root), sorted by
    name: ``name``, ``type`` (``file``, ``dir``, ``link``, ``other``), ``size``,
    ``mode`` (octal), ``mtime``, and for a link its ``target`` as text (never
    followed). ``truncated`` when there were more than ``LIFECYCLE_FILE_LIST_MAX_ENTRIES``."""
    answer = _run(request, db, account, settings, session_id, files.LIST, path)
    return JSONResponse(answer.result)


@router.get(
    "/{session_id}/files/content",
    responses={
        **_FILE_ERRORS,
        200: {"content": {"application/octet-stream": {}}, "description": "the file's bytes"},
    },
    summary="Read a file",
)
def read_file(
    request: Request,
    session_id: str,
    account: AccountDep,
    db: DbDep,
    settings: SettingsDep,
    path: PathQuery = None,
) -> Response:
    """A regular file's bytes (``application/octet-stream``); 413 above
    ``LIFECYCLE_FILE_MAX_BYTES``; 400 for a directory, a link or a special file."""
    answer = _run(request, db, account, settings, session_id, files.READ, path)
    return Response(answer.content or b"", media_type="application/octet-stream")


@router.put(
    "/{session_id}/files/content",
    responses=_FILE_ERRORS,
    summary="Write a file",
    openapi_extra={
        "requestBody": {
            "content": {"application/octet-stream": {"schema": {"type": "string"}}},
            "required": True,
        }
    },
)
def write_file(
    request: Request,
    session_id: str,
    account: AccountDep,
    db: DbDep,
    settings: SettingsDep,
    body: FileBodyDep,
    path: PathQuery = None,
) -> Response:
    """Replace or create a file with the raw body, atomically (a temporary file renamed
    over it), making missing parent directories; refuses to write through a link. 413
    above ``LIFECYCLE_FILE_MAX_BYTES`` or the sandbox's disk limit."""
    if body.too_large:
        raise PayloadTooLarge(
            f"the file is over the limit of {settings.file_max_bytes} bytes",
            limit=settings.file_max_bytes,
        )
    answer = _run(request, db, account, settings, session_id, files.WRITE, path, content=body.data)
    return JSONResponse({"file": answer.result})


@router.delete("/{session_id}/files", responses=_FILE_ERRORS, summary="Delete a file or directory")
def delete_file(
    request: Request,
    session_id: str,
    account: AccountDep,
    db: DbDep,
    settings: SettingsDep,
    path: PathQuery = None,
    recursive: Annotated[
        str | None, Query(description="true: a directory and everything below it")
    ] = None,
) -> Response:
    """Delete a file, a link (itself, never its target) or an empty directory; with
    ``recursive=true`` a directory and everything below it, never following a link.
    409 for a directory that is not empty."""
    answer = _run(
        request,
        db,
        account,
        settings,
        session_id,
        files.DELETE,
        path,
        recursive=_recursive(recursive),
    )
    return JSONResponse({"deleted": answer.result})
