"""Every run kind over a sandbox carrying planted hooks and config: nothing of it runs.

The plants go into a live sandbox, then travel inside its snapshot through hibernate,
restore and archive; the worker's runs (diff, snapshot, hibernate, start from snapshot,
archive) are driven through the real lifecycle service on real PostgreSQL and Redis.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.drains import drain
from tests.support.hostile import CONFIG_KEYS, plant_config, plant_hooks
from tests.support.sessions import kick, load_session, new_session
from worker.db.models import SessionRecord
from worker.domain.lifecycle import RunKind, SessionStatus
from worker.providers.git import run_git
from worker.services import sessions
from worker.services.lifecycle import LifecycleService


def _plant_everything(work: Path, marker: Path) -> None:
    plant_hooks(work / ".git", marker)
    for key in CONFIG_KEYS:
        if key in ("core.hooksPath", "protocol.ext", "core.sshCommand"):
            continue  # each replaces a value another plant needs; covered one by one
        plant_config(work, marker, key)


def test_no_run_kind_executes_sandbox_content(svc: LifecycleService, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    sid = new_session(svc)
    assert drain(svc, sid) == ["succeeded", "succeeded"]  # provision, start
    work = Path(load_session(svc, sid).sandbox_state["workdir"])
    (work / "new.txt").write_text("agent work\n")
    _plant_everything(work, marker)

    for kind in (RunKind.DIFF, RunKind.SNAPSHOT, RunKind.HIBERNATE, RunKind.START, RunKind.DIFF):
        kick(svc, sid, kind)
        assert drain(svc, sid) == ["succeeded"], kind
        assert not marker.exists(), (kind, marker.read_text()[:2000])
    s = load_session(svc, sid)
    assert s.lifecycle_state == "active"
    assert s.cached_diff is not None
    assert "new.txt" in {f["path"] for f in s.cached_diff["files"]}
    # The restored sandbox still carries the plants (the snapshot keeps the tree as is) ...
    assert (work / ".git" / "hooks" / "post-index-change").exists()
    with svc.factory.begin() as db:
        row = db.get(SessionRecord, sid, with_for_update=True)
        assert row is not None
        sessions.patch_session(
            db, svc.settings, row, sessions.SessionPatch(status=SessionStatus.ARCHIVED)
        )
    assert drain(svc, sid) == ["succeeded"]
    assert load_session(svc, sid).lifecycle_state == "archived"
    # ... and nothing of them ran at any step.
    assert not marker.exists(), marker.read_text()[:2000]


def _objects_of(work: Path) -> set[str]:
    out = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch-check=%(objectname)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(out.split())


def _refs_of(work: Path) -> list[str]:
    return run_git(["for-each-ref", "--format=%(refname)"], action="x", cwd=work).stdout.split()


def test_sibling_sessions_never_see_each_others_work(svc: LifecycleService, tmp_path: Path) -> None:
    # Two sessions of one account share one workspace repo.
    first = new_session(svc)
    assert drain(svc, first) == ["succeeded", "succeeded"]
    a = load_session(svc, first)
    work_a = Path(a.sandbox_state["workdir"])
    # Session A commits and pushes work to its branch in the workspace.
    (work_a / "secret-a.txt").write_text("only A may see this\n")
    for args in (
        ["add", "-A"],
        ["commit", "-q", "-m", "A's work"],
        ["push", "-q", "origin", "HEAD"],
    ):
        run_git(args, action="x", cwd=work_a)
    only_a = run_git(["rev-parse", "HEAD", "HEAD^{tree}"], action="x", cwd=work_a).stdout.split()
    run_git(["tag", "a-tag"], action="x", cwd=work_a)
    run_git(["push", "-q", "origin", "a-tag"], action="x", cwd=work_a)

    # The second session is created by the same account: same workspace repo.
    second = new_session(svc, account_id=a.user_id)
    assert drain(svc, second) == ["succeeded", "succeeded"]
    b = load_session(svc, second)
    assert (b.repo_owner, b.repo_name, b.clone_url) == (a.repo_owner, a.repo_name, a.clone_url)
    work_b = Path(b.sandbox_state["workdir"])

    refs_b = _refs_of(work_b)
    assert not [r for r in refs_b if a.branch in r or r.startswith("refs/tags/")], refs_b
    assert not (set(only_a) & _objects_of(work_b))
    assert not (work_b / "secret-a.txt").exists()
    # And A, cut before B, holds nothing of B's branch either.
    assert not [r for r in _refs_of(work_a) if b.branch in r]
