"""Any host can resume: two in-process worker hosts (own data directories, own queues)
sharing PostgreSQL and a snapshot store on a real S3 API (moto over HTTP)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from tests.support.drains import drain
from tests.support.lifecycle import beat_long_ago, make_service, service_settings
from tests.support.s3 import MotoS3
from tests.support.sessions import kick, load_session, new_session
from worker.db.models import SessionRecord
from worker.domain.lifecycle import RunKind
from worker.providers.s3_snapshots import S3SnapshotStore
from worker.routing import host_queue, queue_for
from worker.services import hosts, sessions, sweeps
from worker.services.lifecycle import LifecycleService
from worker.task_names import DEFAULT_QUEUE


def _host(name: str, tmp_path: Path, s3: MotoS3, bucket: str) -> LifecycleService:
    settings = service_settings(
        tmp_path / name,
        fault_plan=tmp_path / "faults.json",
        snapshot_store=f"s3://{bucket}/snapshots",
        s3_endpoint_url=s3.endpoint_url,
    )
    return make_service(settings, hostname_queue=host_queue(f"{name}-{uuid.uuid4().hex[:6]}"))


@pytest.fixture
def two_hosts(
    db_clean: dict[str, str],
    redis_client: Any,
    tmp_path: Path,
    s3_server: MotoS3,
    s3_bucket: str,
) -> tuple[LifecycleService, LifecycleService]:
    return _host("a", tmp_path, s3_server, s3_bucket), _host("b", tmp_path, s3_server, s3_bucket)


def _store(svc: LifecycleService) -> S3SnapshotStore:
    store = getattr(svc.providers.snapshots, "_inner", svc.providers.snapshots)  # fault wrapper
    assert isinstance(store, S3SnapshotStore)
    return store


def _workdir(svc: LifecycleService, sid: uuid.UUID) -> Path:
    return Path(load_session(svc, sid).sandbox_state["workdir"])


def test_a_session_hibernated_on_one_host_resumes_on_another(
    two_hosts: tuple[LifecycleService, LifecycleService],
) -> None:
    a, b = two_hosts
    sid = new_session(a)
    assert drain(a, sid) == ["succeeded", "succeeded"]  # provision, start on A
    state = load_session(a, sid).sandbox_state
    assert (state["queue"], state["host"]) == (a.queue, a.queue.split(".host.")[1])
    work_a = _workdir(a, sid)
    (work_a / "untracked.txt").write_bytes(b"untracked \x00\xff bytes\n")
    (work_a / "README.md").write_text("changed, not committed\n")

    kick(a, sid, RunKind.HIBERNATE)
    assert drain(a, sid) == ["succeeded"]
    s = load_session(a, sid)
    assert s.lifecycle_state == "hibernated"
    assert s.snapshot_url and s.snapshot_url.startswith(f"s3://{_store(a).bucket}/snapshots/")
    head = _store(a).client.head_object(
        Bucket=_store(a).bucket, Key=s.snapshot_url.split("/", 3)[3]
    )
    assert s.snapshot_size_bytes == head["ContentLength"]
    # The rule in worker/routing.py: a shared store's snapshot names no host.
    assert "snapshotQueue" not in s.sandbox_state
    assert queue_for("start", s.sandbox_state) == DEFAULT_QUEUE
    assert not work_a.exists()

    kick(a, sid, RunKind.START)
    assert drain(b, sid) == ["succeeded"]  # host B took the start from the default queue
    s = load_session(b, sid)
    assert s.lifecycle_state == "active"
    assert (s.sandbox_state["queue"], s.sandbox_state["host"]) == (
        b.queue,
        b.queue.split(".host.")[1],
    )
    work_b = _workdir(b, sid)
    assert work_b.is_relative_to(b.settings.data_dir)
    assert (work_b / "untracked.txt").read_bytes() == b"untracked \x00\xff bytes\n"
    assert (work_b / "README.md").read_text() == "changed, not committed\n"
    # Runs that need the live sandbox now go to B.
    assert queue_for("diff", s.sandbox_state) == b.queue


def test_a_lost_hosts_session_resumes_on_another_host_from_its_checkpoint(
    two_hosts: tuple[LifecycleService, LifecycleService],
) -> None:
    a, b = two_hosts
    sid = new_session(a)
    drain(a, sid)
    work_a = _workdir(a, sid)
    (work_a / "kept.txt").write_text("in the checkpoint\n")
    kick(a, sid, RunKind.SNAPSHOT)
    assert drain(a, sid) == ["succeeded"]
    (work_a / "lost.txt").write_text("after the checkpoint\n")
    beat_long_ago(a)
    assert hosts.recover_lost_hosts(b) == {"lost": 1, "sessions": 1}
    s = load_session(b, sid)
    assert s.lifecycle_state == "hibernated" and s.snapshot_url
    assert "work done after that snapshot is gone" in (s.lifecycle_error or "")

    kick(b, sid, RunKind.START)
    assert queue_for("start", load_session(b, sid).sandbox_state) == DEFAULT_QUEUE
    assert drain(b, sid) == ["succeeded"]
    work_b = _workdir(b, sid)
    assert load_session(b, sid).sandbox_state["queue"] == b.queue
    assert (work_b / "kept.txt").read_text() == "in the checkpoint\n"
    assert not (work_b / "lost.txt").exists()


def test_superseded_and_expired_snapshots_are_deleted_from_the_bucket(
    two_hosts: tuple[LifecycleService, LifecycleService],
) -> None:
    a, _ = two_hosts
    store = _store(a)
    sid = new_session(a)
    drain(a, sid)
    for _ in range(3):  # each checkpoint replaces the one before
        kick(a, sid, RunKind.SNAPSHOT)
        assert drain(a, sid) == ["succeeded"]
    assert store.count() == 1
    url = load_session(a, sid).snapshot_url
    assert url is not None

    with a.factory.begin() as db:
        s = db.get(SessionRecord, sid, with_for_update=True)
        assert s is not None
        sessions.patch_session(
            db, a.settings, s, sessions.SessionPatch(status=sessions.SessionStatus.ARCHIVED)
        )
    drain(a, sid)
    assert store.count() == 1  # archived, kept for the retention
    with a.factory.begin() as db:
        db.execute(
            update(SessionRecord)
            .where(SessionRecord.id == sid)
            .values(archived_at=datetime.now(UTC) - timedelta(days=31))
        )
    assert sweeps.expire_snapshots(a) == {"deleted": 1}
    assert load_session(a, sid).snapshot_url is None
    assert store.count() == 0
    listing = store.client.list_objects_v2(Bucket=store.bucket)
    assert listing.get("KeyCount", 0) == 0  # the checksum records went too
