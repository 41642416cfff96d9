"""The lifecycle, end to end: API process + real Celery worker process + PostgreSQL + broker."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from tests.support.factories import Caller
from tests.support.processes import wait_until
from tests.support.stack import Stack, create, get, history, kick, wait_state
from tests.support.trees import git, manifest
from worker.celery_app import create_celery
from worker.config import Settings
from worker.providers.file_snapshots import FileSnapshotStore
from worker.providers.local_git import LocalGitRepoHost

pytestmark = pytest.mark.e2e


def assert_versions_step_by_one(runs: list[dict[str, Any]], final_version: int) -> None:
    moved = [r for r in runs if r["toVersion"] is not None]
    for r in moved:
        assert r["toVersion"] == r["fromVersion"] + 1, r
    assert sorted(r["toVersion"] for r in moved) == list(range(1, final_version + 1))


def drive_full_lifecycle(stack: Stack, caller: Caller) -> None:
    with stack.client(caller) as client:
        created = create(client, title="e2e")
        sid = created["id"]
        assert created["lifecycleVersion"] == 0
        s = wait_state(client, sid, "active")
        # 1. provisioned and started with no further call
        assert s["repoOwner"] == "recoupable" and s["repoName"] == str(caller.account_id)
        assert s["branch"] and s["cloneUrl"].startswith("file://") and s["isNewBranch"] is True
        host = LocalGitRepoHost(stack.data_dir / "repos")
        assert host.count_repos() == 1
        assert s["branch"] in host.list_branches("recoupable", str(caller.account_id))
        assert s["lastActivityAt"] and s["hibernateAfter"] and s["sandboxExpiresAt"]
        assert_versions_step_by_one(history(client, sid), s["lifecycleVersion"])
        assert s["lifecycleVersion"] == 2  # provision, start

        # 2. work in the sandbox, then a true cached diff
        work = Path(s["sandboxState"]["workdir"])
        (work / "README.md").write_text(
            (work / "README.md").read_text() + "one more line\nand another\n"
        )
        (work / "notes.txt").write_text("alpha\nbeta\ngamma")  # untracked, no trailing newline
        (work / "image.bin").write_bytes(bytes(range(256)) * 8)  # binary, untracked
        git(work, "add", "-A")
        git(work, "commit", "-qm", "agent work")
        (work / "notes.txt").write_text("alpha\nBETA\ngamma\ndelta\n")  # uncommitted edit
        (work / "scratch.py").write_text("print('hi')\n")  # untracked
        (work / "README.md").unlink()  # deleted (tracked on main)
        kick(client, sid, "diff")
        s = wait_until(lambda: (x := get(client, sid))["cachedDiff"] and x, what="cached diff")
        diff = s["cachedDiff"]
        files = {f["path"]: f for f in diff["files"]}
        assert files["README.md"]["status"] == "deleted"
        assert files["notes.txt"]["status"] == "added"
        assert files["scratch.py"]["status"] == "added" and files["scratch.py"]["additions"] == 1
        assert files["image.bin"].get("binary") is True
        # What git itself says against the merge-base, untracked files counted as added.
        base = git(work, "merge-base", "HEAD", "origin/main").strip()
        check = work.parent / f"check-{uuid.uuid4().hex}"
        subprocess.run(["cp", "-a", str(work), str(check)], check=True)
        git(check, "add", "-A")
        added = removed = 0
        for line in git(check, "diff", "--cached", "--numstat", base).splitlines():
            a, r, _ = line.split("\t", 2)
            if a != "-":
                added, removed = added + int(a), removed + int(r)
        subprocess.run(["rm", "-rf", str(check)], check=True)
        assert (s["linesAdded"], s["linesRemoved"]) == (added, removed)
        assert diff["summary"]["totalAdditions"] == added
        assert r_get_diff(client, sid)["diff"] == diff

        # 3. hibernate: snapshot recorded, working directory gone
        before = manifest(work)
        kick(client, sid, "hibernate")
        s = wait_state(client, sid, "hibernated")
        assert s["snapshotUrl"].startswith("file://") and s["snapshotCreatedAt"]
        snap = Path(s["snapshotUrl"].removeprefix("file://"))
        assert s["snapshotSizeBytes"] == snap.stat().st_size > 0
        assert not work.exists()
        assert "workdir" not in s["sandboxState"]
        # resume: byte-for-byte what it was
        kick(client, sid, "sandbox")
        s = wait_state(client, sid, "active")
        assert Path(s["sandboxState"]["workdir"]) == work
        assert manifest(work) == before
        assert_versions_step_by_one(history(client, sid), s["lifecycleVersion"])
        assert s["lifecycleVersion"] == 5  # provision, start, diff, hibernate, start


def r_get_diff(client: httpx.Client, sid: str) -> dict[str, Any]:
    r = client.get(f"/api/sessions/{sid}/diff")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_full_lifecycle_on_redis(stack: Stack, caller: Caller) -> None:
    drive_full_lifecycle(stack, caller)


def test_full_lifecycle_on_rabbitmq(rabbit_stack: Stack, caller: Caller) -> None:
    drive_full_lifecycle(rabbit_stack, caller)


def _publish(stack: Stack, task: str, kwargs: dict[str, Any]) -> str:
    app = create_celery(Settings(broker_url=stack.env["LIFECYCLE_BROKER_URL"]))
    task_id = str(uuid.uuid4())
    app.send_task(task, kwargs=kwargs, task_id=task_id)
    return task_id


def _wait_handled(stack: Stack, task_id: str) -> dict[str, Any]:
    def seen() -> dict[str, Any] | None:
        for line in stack.logs_text().splitlines():
            if task_id in line and '"lifecycle.run"' in line:
                return json.loads(line[line.index("{") :])  # type: ignore[no-any-return]
        return None

    return wait_until(seen, what=f"task {task_id} to be handled")  # type: ignore[no-any-return]


def test_duplicate_and_stale_deliveries_change_nothing(stack: Stack, caller: Caller) -> None:
    with stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        kick(client, sid, "hibernate")
        s = wait_state(client, sid, "hibernated")
        runs = {r["kind"]: r for r in history(client, sid)}
        store = FileSnapshotStore(stack.data_dir / "snapshots")
        snapshots_before = store.count()
        host = LocalGitRepoHost(stack.data_dir / "repos")
        branches_before = host.list_branches("recoupable", str(caller.account_id))
        # The same messages again (duplicates), and old ones after newer transitions.
        for kind in ("provision", "start", "hibernate"):
            run = runs[kind]
            tid = _publish(
                stack,
                f"lifecycle.{kind}",
                {"session_id": sid, "run_id": run["id"], "version": run["issuedVersion"]},
            )
            assert _wait_handled(stack, tid)["outcome"] == "skipped"
        # A forged message for a run that does not exist, at the current version.
        tid = _publish(
            stack,
            "lifecycle.start",
            {"session_id": sid, "run_id": str(uuid.uuid4()), "version": s["lifecycleVersion"]},
        )
        assert _wait_handled(stack, tid)["outcome"] == "skipped"
        after = get(client, sid)
        assert after["lifecycleVersion"] == s["lifecycleVersion"]
        assert after["lifecycleState"] == "hibernated"
        assert after["snapshotUrl"] == s["snapshotUrl"]
        assert store.count() == snapshots_before
        assert len(list((stack.data_dir / "snapshots").glob(f"{sid}-*"))) == 1
        assert host.list_branches("recoupable", str(caller.account_id)) == branches_before
        assert host.count_repos() >= 1
        assert [r["state"] for r in history(client, sid)] == ["succeeded"] * 3


def _evil_archive(path: Path, member: str, *, link: str | None = None) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("README.md")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"hi\n"))
        info = tarfile.TarInfo(member)
        if link is not None:  # a link (kept as such), then a file written through it
            info.type = tarfile.SYMTYPE
            info.linkname = link
            tar.addfile(info)
            through = tarfile.TarInfo(f"{member}/escape")
            through.size = 8
            tar.addfile(through, io.BytesIO(b"escaped\n"))
        else:
            data = b"escaped\n"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))


@pytest.mark.parametrize(
    ("member", "link"),
    [
        ("../escape", None),
        ("/tmp/lifecycle-e2e-abs-escape", None),
        ("evil-link", "/tmp/lifecycle-e2e-link-target"),
    ],
)
def test_unsafe_snapshot_is_refused(
    stack: Stack, caller: Caller, member: str, link: str | None
) -> None:
    with stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        kick(client, sid, "hibernate")
        s = wait_state(client, sid, "hibernated")
        snap = Path(s["snapshotUrl"].removeprefix("file://"))
        _evil_archive(snap, member, link=link)
        outside = [stack.data_dir / "sandboxes" / "escape", Path("/tmp/lifecycle-e2e-abs-escape")]
        if link is not None:  # the link's target exists: a write through it would land
            Path(link).mkdir(exist_ok=True)
            outside.append(Path(link) / "escape")
        kick(client, sid, "sandbox")
        s = wait_state(client, sid, "failed")
        assert "refused" in s["lifecycleError"] or "outside" in s["lifecycleError"], s[
            "lifecycleError"
        ]
        for p in outside:
            assert not p.exists()
        assert not (stack.data_dir / "sandboxes" / f"s-{sid}").exists()


def test_transient_failures_retry_then_succeed(stack: Stack, caller: Caller) -> None:
    stack.plan_faults(
        {
            "repo_host.ensure_repo": [
                {"error": "transient", "message": "upstream 502"},
                {"error": "transient"},
            ]
        }
    )
    with stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        provision = next(r for r in history(client, sid) if r["kind"] == "provision")
        assert provision["state"] == "succeeded"
        assert provision["attempts"] == 3


def test_permanent_failure_fails_then_a_kick_recovers(stack: Stack, caller: Caller) -> None:
    stack.plan_faults(
        {
            "sandbox.start_from_clone": [
                {"error": "permanent", "message": "quota exceeded for sandboxes"}
            ]
        }
    )
    with stack.client(caller) as client:
        sid = create(client)["id"]
        s = wait_state(client, sid, "failed")
        assert s["lifecycleError"] == "quota exceeded for sandboxes"
        failed = [r for r in history(client, sid) if r["state"] == "failed"]
        assert len(failed) == 1 and failed[0]["attempts"] == 1
        kick(client, sid, "sandbox")
        s = wait_state(client, sid, "active")
        assert s["lifecycleError"] is None


def test_kicks_coalesce(stack: Stack, caller: Caller) -> None:
    with stack.client(caller) as client:
        sid = create(client)["id"]
        first = kick(client, sid, "sandbox")  # provisioning in flight: coalesces onto it
        assert first["kind"] == "provision"
        wait_state(client, sid, "active")
        runs_before = len(history(client, sid))
        # Already satisfied: 200, nothing recorded, and the answer says so (no old run).
        r = client.post(f"/api/sessions/{sid}/sandbox")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["run"] is None and body["reason"] == "the sandbox is already running"
        assert body["session"]["lifecycleState"] == "active"
        assert len(history(client, sid)) == runs_before
