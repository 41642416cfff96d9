"""The ``bwrap`` provider through the real lifecycle service (real PostgreSQL, Redis,
git and bubblewrap): the tree is the local provider's, commands run confined in it,
hibernate ends every process before the snapshot, and resume brings the files back."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.bwrap import searchable, uid_processes
from tests.support.drains import drain
from tests.support.lifecycle import make_service
from tests.support.sessions import kick, load_session, new_session
from worker.config import get_settings
from worker.domain.lifecycle import RunKind, sandbox_name
from worker.providers.bwrap import CommandResult, CommandSpec
from worker.providers.bwrap_sandbox import BwrapSandboxProvider
from worker.services.lifecycle import LifecycleService


@pytest.fixture
def bsvc(
    bwrap: str, db_clean: dict[str, str], redis_client: Any, tmp_path: Path
) -> LifecycleService:
    searchable(tmp_path)
    settings = get_settings().model_copy(
        update={
            "data_dir": tmp_path,
            "sandbox_provider": "bwrap",
            "command_timeout_seconds": 60,
            "start_in_place": False,  # the runs are stepped through one by one
        }
    )
    return make_service(settings)


def _run(svc: LifecycleService, sid: uuid.UUID, *argv: str) -> CommandResult:
    sandbox = svc.providers.sandbox
    assert isinstance(sandbox, BwrapSandboxProvider)
    return sandbox.run_command(sandbox_name(sid), CommandSpec(list(argv)))


def test_the_settings_pick_the_bwrap_provider(bsvc: LifecycleService) -> None:
    assert isinstance(bsvc.providers.sandbox, BwrapSandboxProvider)
    assert bsvc.providers.sandbox.kind == "bwrap"


def test_commands_work_in_a_real_session_and_survive_hibernate(bsvc: LifecycleService) -> None:
    sid = new_session(bsvc)
    assert drain(bsvc, sid) == ["succeeded", "succeeded"]  # provision, start
    state = load_session(bsvc, sid).sandbox_state
    assert state["type"] == "bwrap" and state["confined"] is True

    status = _run(bsvc, sid, "git", "status", "--short", "--branch")
    assert status.exit_code == 0, status.stderr
    assert status.stdout.startswith(b"## ")
    made = _run(bsvc, sid, "python3", "-c", "open('made.txt', 'w').write('by the agent\\n')")
    assert made.exit_code == 0, made.stderr

    kick(bsvc, sid, RunKind.DIFF)
    assert drain(bsvc, sid) == ["succeeded"]
    diff = load_session(bsvc, sid).cached_diff
    assert diff is not None and "made.txt" in {f["path"] for f in diff["files"]}

    # A long command is running when the session hibernates: it ends, nothing is left.
    results: list[CommandResult] = []
    runner = threading.Thread(
        target=lambda: results.append(_run(bsvc, sid, "sh", "-c", "sleep 1000 & sleep 1000"))
    )
    runner.start()
    sandbox = bsvc.providers.sandbox
    assert isinstance(sandbox, BwrapSandboxProvider)
    user = sandbox.user_for(sandbox_name(sid))
    for _ in range(500):
        if sandbox.runtime.running(sandbox_name(sid)):
            break
        threading.Event().wait(0.02)
    kick(bsvc, sid, RunKind.HIBERNATE)
    assert drain(bsvc, sid) == ["succeeded"]
    runner.join(timeout=60)
    assert results and results[0].signal == 9
    assert load_session(bsvc, sid).lifecycle_state == "hibernated"
    if user is not None:
        assert uid_processes(user.uid) == []

    kick(bsvc, sid, RunKind.START)
    assert drain(bsvc, sid) == ["succeeded"]
    again = _run(bsvc, sid, "cat", "made.txt")
    assert again.exit_code == 0 and again.stdout == b"by the agent\n"
