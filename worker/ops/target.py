"""Which database and broker the admin commands (``accounts``, ``keys``, ``sessions``,
``sweep``, ``migrate``) act on, and what to say when it cannot be used.

``LIFECYCLE_DATABASE_URL`` (and ``LIFECYCLE_BROKER_URL``) when set; otherwise the stack
that ``lifecycle up`` runs from the same data directory, found through the
``stack.json`` it writes there (as ``lifecycle demo`` finds the API through
``dev-credentials.json``). Never the settings' built-in default: that is a test
database, and acting on it by accident is worse than a clear refusal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from worker.logging import redact_text
from worker.ops.embedded.base import pid_alive

STACK_FILE = "stack.json"
FIX = "start it with make run, or set LIFECYCLE_DATABASE_URL"


class TargetError(RuntimeError):
    """No database to act on, or one that cannot be used; the message is one line."""


@dataclass(frozen=True)
class StackFile:
    """What a running ``lifecycle up`` says about itself in ``DIR/stack.json``."""

    database_url: str
    broker_url: str
    api_url: str
    pid: int

    def to_json(self) -> dict[str, object]:
        return {
            "database_url": self.database_url,
            "broker_url": self.broker_url,
            "api_url": self.api_url,
            "pid": self.pid,
        }


def stack_path(data_dir: Path) -> Path:
    return data_dir / STACK_FILE


def write_stack_file(data_dir: Path, info: StackFile) -> None:
    """Owner-only (the URLs may carry passwords): created 0600, renamed into place."""
    path = stack_path(data_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(info.to_json(), fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)


def read_stack_file(data_dir: Path) -> StackFile | None:
    try:
        raw = json.loads(stack_path(data_dir).read_text())
        return StackFile(
            database_url=str(raw["database_url"]),
            broker_url=str(raw["broker_url"]),
            api_url=str(raw["api_url"]),
            pid=int(raw["pid"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@dataclass(frozen=True)
class Target:
    database_url: str
    broker_url: str | None  # None: the settings' (LIFECYCLE_BROKER_URL or its default)
    source: str  # where the URL came from, for people
    stack: StackFile | None = None

    def describe(self) -> str:
        return f"using the database at {redact_text(self.database_url)} ({self.source})"


def find_target(data_dir: Path, environ: Mapping[str, str]) -> Target:
    """The database (and broker) to act on; :class:`TargetError` when there is none."""
    data_dir = data_dir.absolute()
    url = environ.get("LIFECYCLE_DATABASE_URL")
    if url:
        return Target(url, None, "LIFECYCLE_DATABASE_URL")
    stack = read_stack_file(data_dir)
    if stack is None:
        raise TargetError(
            f"no database: LIFECYCLE_DATABASE_URL is not set and no `lifecycle up` has run "
            f"from {data_dir} (no {stack_path(data_dir)}); {FIX}"
        )
    return Target(
        stack.database_url,
        environ.get("LIFECYCLE_BROKER_URL") or stack.broker_url,
        f"the `lifecycle up` stack in {data_dir}",
        stack,
    )


def apply_target(target: Target, data_dir: Path, environ: MutableMapping[str, str]) -> None:
    """Point this process's settings at ``target`` (the caller resets cached settings)."""
    environ["LIFECYCLE_DATABASE_URL"] = target.database_url
    if target.broker_url:
        environ["LIFECYCLE_BROKER_URL"] = target.broker_url
    environ["LIFECYCLE_DATA_DIR"] = str(data_dir.absolute())


def explain_database_error(target: Target, exc: BaseException) -> str:
    """One line for a database error met while acting on ``target``: what was tried,
    what went wrong, and how to fix it."""
    orig = getattr(exc, "orig", None) or exc
    text = redact_text(str(orig)).strip()
    where = redact_text(target.database_url)
    sqlstate = getattr(orig, "sqlstate", None)
    if sqlstate == "42P01" or ("relation" in text and "does not exist" in text):
        return f"the database at {where} has no schema: run lifecycle migrate"
    if sqlstate == "3D000":
        return f"the database at {where} does not exist: create it, or {FIX}"
    first = text.splitlines()[0] if text else type(orig).__name__
    if target.stack is not None and not pid_alive(target.stack.pid):
        return (
            f"cannot reach the database at {where}: the `lifecycle up` stack that used it "
            f"(pid {target.stack.pid}) is not running; {FIX} ({first})"
        )
    return f"cannot use the database at {where} ({target.source}): {first}; {FIX}"
