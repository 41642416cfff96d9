"""Worker hosts: heartbeats, a lost host's sessions set back to their checkpoint, and the
checkpoint sweep (real PostgreSQL, real local providers, in-process service)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import text

from tests.support.drains import drain
from tests.support.lifecycle import beat_long_ago, host_of
from tests.support.sessions import kick, load_session, new_session, run_history
from worker.db.models import WorkerHostRecord
from worker.domain.lifecycle import RunKind
from worker.services import hosts, sweeps
from worker.services.lifecycle import LifecycleService


def test_a_live_host_is_left_alone(svc: LifecycleService) -> None:
    sid = new_session(svc)
    drain(svc, sid)
    with svc.factory.begin() as db:
        hosts.beat(db, host_of(svc), svc.queue)
    assert hosts.recover_lost_hosts(svc) == {"lost": 0, "sessions": 0}
    assert load_session(svc, sid).lifecycle_state == "active"


def test_a_lost_host_sets_its_sessions_back_to_their_checkpoint(
    svc: LifecycleService, monkeypatch: Any
) -> None:
    # A store every host reads (as S3 is): the checkpoint can be restored elsewhere.
    monkeypatch.setattr(svc.providers.snapshots, "shared", True, raising=False)
    checkpointed, bare = new_session(svc), new_session(svc)
    for sid in (checkpointed, bare):
        assert drain(svc, sid) == ["succeeded", "succeeded"]
    work = Path(load_session(svc, checkpointed).sandbox_state["workdir"])
    (work / "kept.txt").write_text("in the checkpoint\n")
    kick(svc, checkpointed, RunKind.SNAPSHOT)
    assert drain(svc, checkpointed) == ["succeeded"]
    (work / "lost.txt").write_text("after the checkpoint\n")
    # A diff run was queued for the host when it died; a start kick waits behind it.
    kick(svc, checkpointed, RunKind.DIFF)
    version_before = load_session(svc, checkpointed).lifecycle_version
    beat_long_ago(svc)

    assert hosts.recover_lost_hosts(svc) == {"lost": 1, "sessions": 2}
    assert hosts.recover_lost_hosts(svc) == {"lost": 0, "sessions": 0}  # once

    s = load_session(svc, checkpointed)
    assert s.lifecycle_state == "hibernated"
    assert s.lifecycle_version == version_before + 1
    assert s.lifecycle_run_id is None and "queue" not in s.sandbox_state
    assert host_of(svc) in (s.lifecycle_error or "")
    assert "work done after that snapshot is gone" in (s.lifecycle_error or "")
    history = run_history(svc, checkpointed)
    diff = next(r for r in history if r.kind == "diff")
    assert diff.state == "failed" and "lost" in (diff.error or "")
    recovery = history[-1]
    assert (recovery.trigger, recovery.state) == ("host-lost", "succeeded")
    assert (recovery.from_version, recovery.to_version) == (version_before, version_before + 1)

    b = load_session(svc, bare)
    assert b.lifecycle_state == "failed" and "begin again from its branch" in (
        b.lifecycle_error or ""
    )
    with svc.factory() as db:
        host = db.get(WorkerHostRecord, host_of(svc))
        assert host is not None and host.state == "lost" and host.sessions_recovered == 2

    # Resuming restores the checkpoint (on whichever host takes the start).
    svc.providers.sandbox.stop(s.sandbox_state["sandboxName"])  # the host's disk is gone
    kick(svc, checkpointed, RunKind.START)
    assert drain(svc, checkpointed) == ["succeeded"]
    assert (work / "kept.txt").read_text() == "in the checkpoint\n"
    assert not (work / "lost.txt").exists()
    # A failed session without a checkpoint starts again from its branch.
    svc.providers.sandbox.stop(b.sandbox_state["sandboxName"])
    kick(svc, bare, RunKind.START)
    assert drain(svc, bare) == ["succeeded"]
    assert load_session(svc, bare).lifecycle_state == "active"
    # The host beats again: alive.
    with svc.factory.begin() as db:
        hosts.beat(db, host_of(svc), svc.queue)
    with svc.factory() as db:
        host = db.get(WorkerHostRecord, host_of(svc))
        assert host is not None and host.state == "alive"


def test_snapshots_on_the_lost_hosts_own_disk_are_not_trusted(svc: LifecycleService) -> None:
    sid = new_session(svc)
    drain(svc, sid)
    kick(svc, sid, RunKind.SNAPSHOT)
    drain(svc, sid)
    beat_long_ago(svc)
    hosts.recover_lost_hosts(svc)
    s = load_session(svc, sid)
    assert s.lifecycle_state == "failed" and s.snapshot_url is None
    assert "snapshot was on that host's disk" in (s.lifecycle_error or "")


def test_checkpoints_follow_activity(svc: LifecycleService) -> None:
    svc.settings = svc.settings.model_copy(update={"checkpoint_interval_seconds": 1})
    sid = new_session(svc)
    drain(svc, sid)
    with svc.factory.begin() as db:
        db.execute(
            text(
                "UPDATE sessions SET last_activity_at = now() - interval '5 seconds',"
                " sandbox_state = jsonb_set(sandbox_state, '{startedAt}',"
                " to_jsonb((now() - interval '1 minute')::text)) WHERE id = :id"
            ),
            {"id": sid},
        )
    assert sweeps.checkpoint_active(svc) == {"queued": 1}
    assert sweeps.checkpoint_active(svc) == {"queued": 0}  # its run is open
    assert drain(svc, sid) == ["succeeded"]
    assert run_history(svc, sid)[-1].trigger == "checkpoint"
    assert load_session(svc, sid).snapshot_url
    # No activity since: nothing to checkpoint.
    assert sweeps.checkpoint_active(svc) == {"queued": 0}
    svc.settings = svc.settings.model_copy(update={"checkpoint_interval_seconds": 0})
    assert sweeps.checkpoint_active(svc) == {"queued": 0}
