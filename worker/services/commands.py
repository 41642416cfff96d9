"""Agents' commands in a session's sandbox, on the event-driven path.

The API records a command (``queued``) with its job in the outbox, in one transaction,
routed like every run bound to the live sandbox (:func:`worker.routing.queue_for`), and
counts it as activity. The worker holding the sandbox claims it (``queued`` →
``running``, one statement: a duplicate delivery or a command killed before it started
claims nothing), runs it confined through the sandbox provider, and records how it
ended: ``exited`` (with its exit code, or the signal it died of), ``killed`` (by the
wall time, the disk limit or a request: ``killed_by``) or ``failed`` (it could not run:
the message says why). The values of the command's environment are dropped then; only
their names stay. A kill request on a running command is a column the worker polls.

A command sent with ``autoResume`` to a session that is not active is recorded
``waiting``, with a start kick through the one kick entry (:func:`runs.request_run`,
quotas checked as for any start) and no job yet: the start's record, in its own
transaction, moves the session's waiting commands to ``queued`` and writes their jobs to
the new sandbox's host queue (:func:`dispatch_waiting_statement`); a start that fails
ends them ``failed`` with its error (:func:`fail_waiting_statement`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_, select, text, update
from sqlalchemy.orm import Session, sessionmaker

from worker.config import Settings
from worker.db import statements
from worker.db.models import CommandRecord, OutboxRecord, SessionRecord
from worker.domain.cursors import decode_cursor, encode_cursor
from worker.domain.lifecycle import LifecycleState, RunKind, sandbox_name, session_timeouts
from worker.errors import Conflict
from worker.logging import get_logger
from worker.providers.base import ProviderError
from worker.providers.bwrap import CommandResult, CommandSpec
from worker.providers.registry import Providers
from worker.routing import queue_for
from worker.services import events, outbox, quotas, runs, sessions
from worker.services.command_output import OutputLog
from worker.task_names import TASK_COMMAND

log = get_logger(__name__)

WAITING, QUEUED, RUNNING = "waiting", "queued", "running"
EXITED, KILLED, FAILED = "exited", "killed", "failed"
FINISHED = (EXITED, KILLED, FAILED)
# While a command runs, the session's idle deadline moves this often (a long build is
# activity), and a kill request is looked for this often.
_ACTIVITY_EVERY = 30.0


@dataclass(frozen=True)
class CommandRequest:
    """A validated command request."""

    argv: list[str]
    cwd: str
    env: dict[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = None
    stdin: bytes | None = None
    detached: bool = False


def create(
    db: Session,
    settings: Settings,
    record: SessionRecord,
    req: CommandRequest,
    *,
    auto_resume: bool = False,
) -> tuple[CommandRecord, list[OutboxRecord]]:
    """Record the command and its job (the caller holds ``record`` locked, commits, then
    publishes the jobs). 409 unless the session's sandbox is active and can run
    commands — or, with ``auto_resume``, the command waits (no job yet) and a start kick
    is recorded (its jobs returned; 429 when the account's sandbox quota is full)."""
    state = record.lifecycle_state
    active = state == LifecycleState.ACTIVE.value
    if not active and not auto_resume:
        raise Conflict(
            f"the session's sandbox is {state}, not active: resume it with "
            f"POST /api/sessions/{record.id}/sandbox and send the command again, or send "
            'it with "autoResume": true',
            lifecycleState=state,
            resume=f"/api/sessions/{record.id}/sandbox",
        )
    kind = (record.sandbox_state or {}).get("type")
    # A session that never had a sandbox does not know its kind yet: the worker that
    # starts it says (a plain directory then fails the command, saying what to install).
    if kind not in ("bwrap", "noop") and (active or kind is not None):
        raise Conflict(
            f"this session's sandbox ({kind}) cannot run commands: the worker host needs "
            "bubblewrap (apt-get install -y bubblewrap) and LIFECYCLE_SANDBOX_PROVIDER=bwrap",
            sandboxType=kind,
        )
    jobs: list[OutboxRecord] = []
    if not active:
        # The one kick entry, under the quota, as POST …/sandbox would (archived: 409).
        quotas.check_start(db, settings, record)
        kick = runs.request_run(
            db,
            record,
            RunKind.START,
            "command",
            force_hint="?force=true",
            start_hint=f"POST /api/sessions/{record.id}/sandbox",
        )
        events.kicked(db, record, RunKind.START, kick)
        jobs += kick.outbox
    if req.detached and active:
        # Runs until the sandbox ends: its lifetime bounds it.
        expires = record.sandbox_expires_at or datetime.now(UTC)
        timeout = max(1.0, (expires - datetime.now(UTC)).total_seconds())
    elif req.detached:
        # The sandbox's lifetime starts when it does; the longest any sandbox lives.
        timeout = float(session_timeouts(settings, None, record.max_lifetime_seconds)[1])
    else:
        timeout = req.timeout_seconds or settings.command_timeout_seconds
    now = datetime.now(UTC)
    command = CommandRecord(
        id=uuid.uuid4(),
        session_id=record.id,
        argv=req.argv,
        cwd=req.cwd,
        env=req.env,
        timeout_seconds=timeout,
        stdin=req.stdin,
        detached=req.detached,
        status=QUEUED if active else WAITING,
        stdout_bytes=0,
        stderr_bytes=0,
        stdout_truncated=False,
        stderr_truncated=False,
        created_at=now,
    )
    db.add(command)
    if not active:
        db.flush()
        return command, jobs
    sessions.record_activity(db, settings, record)
    job = outbox.add(
        db,
        TASK_COMMAND,
        {"command_id": str(command.id)},
        queue=queue_for("command", record.sandbox_state),
    )
    return command, [job]


# Once a start was recorded (run ``after_run`` reached ``version``, in this transaction):
# the session's waiting commands are queued, oldest first, each with its job (as
# ``outbox.add`` writes it, claimed for publishing right after commit) to the queue of
# the host that now holds the sandbox. Returns the jobs as ``JobRow``s.
_DISPATCH_WAITING = f"""
WITH woke AS (
    UPDATE commands SET status = 'queued'
    WHERE session_id = %(sid)s AND status = 'waiting'
    AND EXISTS (
        SELECT 1 FROM lifecycle_runs WHERE id = %(after_run)s AND to_version = %(version)s
    )
    RETURNING id, created_at
), job AS (
    INSERT INTO outbox {statements.JOB_COLUMNS}
    SELECT %(job_task)s,
        jsonb_build_object('kwargs', jsonb_build_object('command_id', woke.id::text),
                           'task_id', gen_random_uuid()::text),
        %(job_queue)s, %(job_now)s, %(job_claimed_until)s, 0
    FROM woke ORDER BY woke.created_at, woke.id
    RETURNING id, task_name, payload, queue
)
SELECT id, task_name, payload, queue FROM job ORDER BY id
"""

# A start that failed (run ``after_run`` recorded at ``version``): the session's waiting
# commands end failed with its error; their environment values go, as for any end.
_FAIL_WAITING = """
UPDATE commands AS c SET status = 'failed', error = %(error)s, finished_at = now(),
    stdin = NULL,
    env = (SELECT coalesce(jsonb_object_agg(k, NULL), '{}'::jsonb)
           FROM jsonb_object_keys(c.env) AS k)
WHERE c.session_id = %(sid)s AND c.status = 'waiting'
AND EXISTS (SELECT 1 FROM lifecycle_runs WHERE id = %(after_run)s AND to_version = %(version)s)
"""


def dispatch_waiting_statement(
    session_id: uuid.UUID,
    version: int,
    sandbox_state: Mapping[str, Any] | None,
    after_run: uuid.UUID,
) -> tuple[str, dict[str, Any]]:
    """For the transaction that records run ``after_run`` at ``version`` with the
    session ``active``: queue its waiting commands and write their jobs, routed to the
    sandbox's host (``sandbox_state``, as the record writes it)."""
    now = datetime.now(UTC)
    return _DISPATCH_WAITING, {
        "sid": session_id,
        "version": version,
        "after_run": after_run,
        "job_task": TASK_COMMAND,
        "job_queue": queue_for("command", sandbox_state),
        "job_now": now,
        "job_claimed_until": statements.claimed_until(now),
    }


def fail_waiting_statement(
    session_id: uuid.UUID, version: int, after_run: uuid.UUID, error: str
) -> tuple[str, dict[str, Any]]:
    """For the transaction that records the failure of start (or provision) run
    ``after_run`` at ``version``: end the session's waiting commands with its error."""
    return _FAIL_WAITING, {
        "sid": session_id,
        "version": version,
        "after_run": after_run,
        "error": f"the sandbox did not start: {error}"[:2000],
    }


def get(db: Session, session_id: uuid.UUID, command_id: str) -> CommandRecord | None:
    try:
        cid = uuid.UUID(command_id)
    except ValueError:
        return None
    command = db.get(CommandRecord, cid)
    return command if command is not None and command.session_id == session_id else None


def list_page(
    db: Session, session_id: uuid.UUID, *, limit: int, cursor: str | None
) -> tuple[list[CommandRecord], str | None]:
    """The session's commands, newest first, keyset-paginated on (createdAt, id)."""
    stmt = select(CommandRecord).where(CommandRecord.session_id == session_id)
    if cursor:
        created, cid = decode_cursor(cursor)
        stmt = stmt.where(
            or_(
                CommandRecord.created_at < created,
                and_(CommandRecord.created_at == created, CommandRecord.id < cid),
            )
        )
    rows = list(
        db.scalars(
            stmt.order_by(CommandRecord.created_at.desc(), CommandRecord.id.desc()).limit(limit + 1)
        )
    )
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
    return rows, next_cursor


def live(db: Session, session_id: uuid.UUID, limit: int = 200) -> list[CommandRecord]:
    """The session's commands still waiting, queued or running (detached ones included),
    oldest first: what runs in its sandbox now, or is about to."""
    return list(
        db.scalars(
            select(CommandRecord)
            .where(
                CommandRecord.session_id == session_id,
                CommandRecord.status.in_((WAITING, QUEUED, RUNNING)),
            )
            .order_by(CommandRecord.created_at, CommandRecord.id)
            .limit(limit)
        )
    )


def request_kill(db: Session, command: CommandRecord) -> None:
    """A waiting or queued command ends at once; a running one when its worker next
    looks."""
    now = datetime.now(UTC)
    if command.status in (WAITING, QUEUED):
        db.execute(
            update(CommandRecord)
            .where(CommandRecord.id == command.id, CommandRecord.status.in_((WAITING, QUEUED)))
            .values(
                status=KILLED, killed_by="request", kill_requested_at=now, finished_at=now, env={}
            )
            .execution_options(synchronize_session=False)
        )
    elif command.status == RUNNING:
        db.execute(
            update(CommandRecord)
            .where(CommandRecord.id == command.id, CommandRecord.kill_requested_at.is_(None))
            .values(kill_requested_at=now)
            .execution_options(synchronize_session=False)
        )
    db.refresh(command)


# ---------------------------------------------------------------------- the worker side

_CLAIM = text(
    """
    UPDATE commands SET status = 'running', started_at = now(), host = :host
    WHERE id = :id AND status = 'queued'
    RETURNING session_id, argv, cwd, env, timeout_seconds, stdin
    """
)


def execute(
    factory: sessionmaker[Session],
    settings: Settings,
    providers: Providers,
    command_id: uuid.UUID,
    host: str,
) -> str:
    """Run one command (the task's body). Returns the status recorded, or ``skipped``."""
    with factory.begin() as db:
        row = db.execute(_CLAIM, {"id": command_id, "host": host}).first()
    if row is None:
        return "skipped"  # a duplicate delivery, or killed before it started
    session_id, argv, cwd, env, timeout, stdin = row
    spec = CommandSpec(argv=list(argv), cwd=cwd, env=dict(env), stdin=stdin)
    watch = _Watch(factory, settings, command_id, session_id)
    # The output as it arrives, for GET …/output (all of it written before the end is).
    output = OutputLog(factory, command_id, settings.command_output_bytes)

    def should_stop() -> str | None:
        output.tick()
        return watch.should_stop()

    try:
        result = providers.sandbox.run_command(
            sandbox_name(session_id),
            spec,
            settings.command_limits(timeout),
            on_output=output.feed,
            should_stop=should_stop,
        )
    except ProviderError as exc:
        output.close()
        return _finish(factory, command_id, {"status": FAILED, "error": str(exc)})
    except Exception as exc:  # recorded, never left "running"; the task logs it
        output.close()
        _finish(
            factory,
            command_id,
            {"status": FAILED, "error": f"internal error: {type(exc).__name__}"},
        )
        raise
    output.close()
    watch.touch_session()
    return _finish(factory, command_id, _outcome(result))


def _outcome(result: CommandResult) -> dict[str, Any]:
    killed_by = {"killed": "request"}.get(result.killed or "", result.killed)
    return {
        "status": KILLED if result.killed else EXITED,
        "killed_by": killed_by,
        "exit_code": result.exit_code,
        "signal": result.signal,
        "duration_seconds": result.duration,
        "stdout": result.stdout,
        "stderr": result.stderr,
        "stdout_bytes": result.stdout_bytes,
        "stderr_bytes": result.stderr_bytes,
        "stdout_truncated": result.stdout_truncated,
        "stderr_truncated": result.stderr_truncated,
    }


def _finish(factory: sessionmaker[Session], command_id: uuid.UUID, values: dict[str, Any]) -> str:
    with factory.begin() as db:
        command = db.get(CommandRecord, command_id, with_for_update=True)
        if command is None:
            return "skipped"
        for key, value in values.items():
            setattr(command, key, value)
        command.env = dict.fromkeys(command.env)  # names only from now on
        command.stdin = None
        command.finished_at = datetime.now(UTC)
    log.info(
        "sandbox.command",
        command_id=str(command_id),
        status=values["status"],
        exit_code=values.get("exit_code"),
        signal=values.get("signal"),
        killed_by=values.get("killed_by"),
    )
    return str(values["status"])


class _Watch:
    """Polled by the runtime while the command runs: a kill request ends it; every
    ``_ACTIVITY_EVERY`` seconds the session's idle deadline moves."""

    def __init__(
        self,
        factory: sessionmaker[Session],
        settings: Settings,
        command_id: uuid.UUID,
        session_id: uuid.UUID,
    ) -> None:
        self.factory = factory
        self.settings = settings
        self.command_id = command_id
        self.session_id = session_id
        self.next_touch = time.monotonic() + _ACTIVITY_EVERY

    def should_stop(self) -> str | None:
        with self.factory() as db:
            asked = db.scalar(
                select(CommandRecord.kill_requested_at).where(CommandRecord.id == self.command_id)
            )
        if asked is not None:
            return "killed"
        if time.monotonic() >= self.next_touch:
            self.next_touch = time.monotonic() + _ACTIVITY_EVERY
            self.touch_session()
        return None

    def touch_session(self) -> None:
        try:
            with self.factory.begin() as db:
                record = db.get(SessionRecord, self.session_id)
                if record is not None:
                    sessions.record_activity(db, self.settings, record)
        except Exception:  # activity is a courtesy; never fail the command on it
            log.warning("sandbox.command_activity_not_recorded", command_id=str(self.command_id))
