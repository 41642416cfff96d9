"""Commands in a session's sandbox: run (202, on the event-driven path), read, list, kill."""

from __future__ import annotations

import math
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api_stub import fields
from api_stub.deps import AccountDep, BodyDep, DbDep, SettingsDep, transaction
from api_stub.routes.sessions import _ERRORS, _publish
from api_stub.schemas import CommandWrite, ErrorBody
from worker.config import Settings
from worker.db.models import CommandRecord
from worker.errors import InvalidInput, NotFound
from worker.providers.base import PermanentProviderError
from worker.providers.bwrap import inside_cwd, validate_env
from worker.services import command_output, commands, sessions

router = APIRouter(prefix="/api/sessions", tags=["commands"])

_MAX_ARGS = 1024
_MAX_ENV = 128


def command_dict(c: CommandRecord, *, output: bool = True) -> dict[str, Any]:
    """The wire form of a command. Environment values are never shown, only names."""
    data: dict[str, Any] = {
        "id": str(c.id),
        "sessionId": str(c.session_id),
        "argv": c.argv,
        "cwd": c.cwd,
        "envNames": sorted(c.env),
        "timeoutSeconds": c.timeout_seconds,
        "detached": c.detached,
        "status": c.status,
        "exitCode": c.exit_code,
        "signal": c.signal,
        "killedBy": c.killed_by,
        "error": c.error,
        "durationMs": None if c.duration_seconds is None else round(c.duration_seconds * 1000, 1),
        "stdoutBytes": c.stdout_bytes,
        "stderrBytes": c.stderr_bytes,
        "stdoutTruncated": c.stdout_truncated,
        "stderrTruncated": c.stderr_truncated,
        "host": c.host,
        "killRequestedAt": c.kill_requested_at and c.kill_requested_at.isoformat(),
        "createdAt": c.created_at.isoformat(),
        "startedAt": c.started_at and c.started_at.isoformat(),
        "finishedAt": c.finished_at and c.finished_at.isoformat(),
    }
    if output:
        data["stdout"] = (c.stdout or b"").decode("utf-8", errors="replace")
        data["stderr"] = (c.stderr or b"").decode("utf-8", errors="replace")
    return data


def _argv(data: dict[str, Any]) -> list[str]:
    argv, cmd = data.get("argv"), data.get("cmd")
    if (argv is None) == (cmd is None):
        raise InvalidInput("give exactly one of argv or cmd", missing_fields=["argv", "cmd"])
    if cmd is not None:
        return ["/bin/sh", "-c", fields.text(cmd, "cmd")]
    if not isinstance(argv, list) or not argv or len(argv) > _MAX_ARGS:
        raise InvalidInput(
            f"argv must be a list of 1 to {_MAX_ARGS} strings", missing_fields=["argv"]
        )
    out = [fields.text(a, "argv") for a in argv]
    if not out[0]:
        raise InvalidInput("argv[0] must name a program", missing_fields=["argv"])
    return out


def _env(data: dict[str, Any]) -> dict[str, str]:
    env = data.get("env")
    if env is None:
        return {}
    if not isinstance(env, dict) or len(env) > _MAX_ENV:
        raise InvalidInput(
            f"env must be an object of at most {_MAX_ENV} names to strings",
            missing_fields=["env"],
        )
    try:
        return validate_env({k: fields.text(v, "env") for k, v in env.items()})
    except PermanentProviderError as exc:
        raise InvalidInput(str(exc), missing_fields=["env"]) from None


def _timeout(data: dict[str, Any], settings: Settings) -> float | None:
    value = data.get("timeoutSeconds")
    if value is None:
        return None
    top = settings.command_max_timeout_seconds
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= top
    ):
        raise InvalidInput(
            f"timeoutSeconds must be a number above 0 and at most {top:g}",
            missing_fields=["timeoutSeconds"],
        )
    return float(value)


def parse_request(data: dict[str, Any], settings: Settings) -> commands.CommandRequest:
    """The body of ``POST …/commands`` as a request, or 400 naming the field."""
    argv = _argv(data)
    cwd = data.get("cwd")
    try:
        cwd_inside = inside_cwd(None if cwd is None else fields.text(cwd, "cwd"))
    except PermanentProviderError as exc:
        raise InvalidInput(str(exc), missing_fields=["cwd"]) from None
    stdin = data.get("stdin")
    stdin_bytes = None if stdin is None else fields.text(stdin, "stdin").encode()
    if stdin_bytes is not None and len(stdin_bytes) > settings.command_max_stdin_bytes:
        raise InvalidInput(
            f"stdin must be at most {settings.command_max_stdin_bytes} bytes",
            missing_fields=["stdin"],
        )
    detached = data.get("detached", False)
    if not isinstance(detached, bool):
        raise InvalidInput("detached must be true or false", missing_fields=["detached"])
    return commands.CommandRequest(
        argv=argv,
        cwd=cwd_inside,
        env=_env(data),
        timeout_seconds=_timeout(data, settings),
        stdin=stdin_bytes,
        detached=detached,
    )


_RUN_DOC: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    202: {
        "description": "`{command}`: `queued` for the worker holding the sandbox, or, with "
        "`autoResume` on a session that is not active, `waiting` until the start it "
        "asked for has made the sandbox active (a failed start fails it, with its error)"
    },
    409: {
        "model": ErrorBody,
        "description": "The session is not active and `autoResume` was not asked for "
        "(`lifecycleState`, and `resume`: the start endpoint), the session is archived, "
        "or its sandbox cannot run commands (what to install)",
    },
    429: {
        "model": ErrorBody,
        "description": "`autoResume` needs a sandbox and the account's active sandbox "
        "limit is reached",
    },
}


def _auto_resume(data: dict[str, Any]) -> bool:
    value = data.get("autoResume", False)
    if not isinstance(value, bool):
        raise InvalidInput("autoResume must be true or false", missing_fields=["autoResume"])
    return value


@router.post(
    "/{session_id}/commands",
    status_code=202,
    responses=_RUN_DOC,
    summary="Run a command",
    openapi_extra=fields.body_doc(CommandWrite, required=True),
)
def run_command(
    request: Request,
    session_id: str,
    account: AccountDep,
    body: BodyDep,
    db: DbDep,
    settings: SettingsDep,
) -> Response:
    """Record the command and send it to the worker holding the sandbox (202, status
    ``queued``). On a session that is not active: 409 with the state and how to resume
    — unless the body says ``"autoResume": true``: then the sandbox is started (one
    start kick, under the account's sandbox quota) and the command, ``waiting`` until
    then, is sent to its host as soon as the start has made it active."""
    data, _ = body
    with transaction(db):
        record = sessions.get_owned(db, account, session_id, lock=True)
        req = parse_request(data, settings)
        command, jobs = commands.create(db, settings, record, req, auto_resume=_auto_resume(data))
        payload = {"command": command_dict(command)}
    _publish(request, jobs)
    return JSONResponse(payload, status_code=202)


def _owned_command(db: Any, account: Any, session_id: str, command_id: str) -> CommandRecord:
    record = sessions.get_owned(db, account, session_id)
    command = commands.get(db, record.id, command_id)
    if command is None:
        raise NotFound("Command not found")
    return command


@router.get("/{session_id}/commands/{command_id}", responses=_ERRORS, summary="Get a command")
def get_command(session_id: str, command_id: str, account: AccountDep, db: DbDep) -> Response:
    """State and output (what was kept, up to the output limit) of one command; while
    it runs, the output so far."""
    command = _owned_command(db, account, session_id, command_id)
    data = command_dict(command)
    if command.status == commands.RUNNING:
        data.update(command_output.so_far(db, command.id))
    return JSONResponse({"command": data})


_SSE_DOC: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    200: {
        "content": {"text/event-stream": {}},
        "description": "events `stdout` and `stderr` (`id`: the byte offset after the "
        'piece, `data`: `{"text": ...}`), then one `exit` (`data`: the command)',
    },
}


@router.get(
    "/{session_id}/commands/{command_id}/output",
    responses=_SSE_DOC,
    summary="Stream a command's output",
)
def stream_output(
    session_id: str,
    command_id: str,
    account: AccountDep,
    db: DbDep,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="resume after this byte offset (an event id)"),
    ] = None,
) -> Response:
    """The command's output as Server-Sent Events, live while it runs: ``stdout`` and
    ``stderr`` events in the order the worker read them, each with the byte offset
    after it as its ``id``, then one ``exit`` event with the command's final state.
    Reconnecting with ``Last-Event-ID`` resumes right after that offset: nothing lost,
    nothing repeated. Output past the output limit is not streamed (the exit event says
    it was truncated)."""
    command = _owned_command(db, account, session_id, command_id)
    after = _offset(last_event_id)
    db.close()  # nothing is held while the stream lasts
    return StreamingResponse(
        command_output.events(command.id, after, lambda c: command_dict(c, output=False)),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _offset(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isdigit() or len(value) > 18:
        raise InvalidInput(
            "Last-Event-ID must be an event id (a byte offset)", missing_fields=["Last-Event-ID"]
        )
    return int(value)


@router.get("/{session_id}/commands", responses=_ERRORS, summary="List commands")
def list_commands(
    session_id: str,
    account: AccountDep,
    db: DbDep,
    limit: Annotated[str | None, Query(description="1-100, default 20")] = None,
    cursor: Annotated[str | None, Query(description="nextCursor of the previous page")] = None,
) -> Response:
    """The session's commands, newest first, keyset-paginated (output left out)."""
    if limit is None:
        size = 20
    elif limit.isdigit() and 1 <= int(limit) <= 100:
        size = int(limit)
    else:
        raise InvalidInput("limit must be an integer from 1 to 100", missing_fields=["limit"])
    record = sessions.get_owned(db, account, session_id)
    rows, next_cursor = commands.list_page(db, record.id, limit=size, cursor=cursor)
    return JSONResponse(
        {"commands": [command_dict(r, output=False) for r in rows], "nextCursor": next_cursor}
    )


@router.post(
    "/{session_id}/commands/{command_id}/kill",
    status_code=202,
    responses=_ERRORS,
    summary="Kill a command",
)
def kill_command(session_id: str, command_id: str, account: AccountDep, db: DbDep) -> Response:
    """A waiting or queued command ends at once; a running one within about a second
    (202)."""
    with transaction(db):
        command = _owned_command(db, account, session_id, command_id)
        commands.request_kill(db, command)
        payload = {"command": command_dict(command)}
    return JSONResponse(payload, status_code=202)


@router.get("/{session_id}/processes", responses=_ERRORS, summary="List live processes")
def list_processes(session_id: str, account: AccountDep, db: DbDep) -> Response:
    """The sandbox's commands still running, queued or waiting (detached servers included),
    oldest first, without output: each ends when it exits, is killed, or the sandbox
    hibernates."""
    record = sessions.get_owned(db, account, session_id)
    return JSONResponse(
        {"processes": [command_dict(c, output=False) for c in commands.live(db, record.id)]}
    )
