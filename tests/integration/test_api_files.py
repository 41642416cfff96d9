"""GET/PUT/DELETE /api/sessions/{id}/files…: the contract, through the API and a worker.

The API records each operation and waits for the worker holding the sandbox to answer
(``worker/services/files.py``). Here that worker is a thread of this process running the
real worker-side function (``files.execute``) over a real tree on disk; the API side is
the real app. End to end with a worker process: tests/e2e/test_commands_e2e.py.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create, new_uuid
from tests.support.factories import Caller, make_caller
from tests.support.rows import sql, sql_exec
from worker.config import Settings
from worker.db.engine import get_sessionmaker
from worker.domain.lifecycle import sandbox_name
from worker.providers.local_sandbox import LocalSandboxProvider
from worker.providers.noop import NoopRepoHost, NoopSnapshotStore
from worker.providers.registry import Providers
from worker.services import files

HOST_QUEUE = "lifecycle.host.box-host-1"


class FakeHost:
    """The worker side of the sandbox's host: a thread doing every queued operation."""

    def __init__(self, settings: Settings, sandboxes: Path) -> None:
        self.provider = LocalSandboxProvider(sandboxes)
        self.providers = Providers(
            repo_host=NoopRepoHost(), sandbox=self.provider, snapshots=NoopSnapshotStore()
        )
        self.settings = settings
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            for (op_id,) in sql("SELECT id FROM file_ops WHERE status = 'queued'"):
                files.execute(get_sessionmaker(), self.settings, self.providers, op_id)

    def tree(self, sid: str) -> Path:
        return self.provider.workdir(sandbox_name(uuid.UUID(sid)))


@pytest.fixture
def settings(api_app: FastAPI, monkeypatch: pytest.MonkeyPatch) -> Settings:
    s: Settings = api_app.state.settings
    monkeypatch.setattr(s, "file_max_bytes", 4096)
    monkeypatch.setattr(s, "file_op_timeout_seconds", 30.0)
    return s


@pytest.fixture
def host(settings: Settings, tmp_path: Path) -> Iterator[FakeHost]:
    h = FakeHost(settings, tmp_path / "data" / "sandboxes")
    h.thread.start()
    yield h
    h.stop.set()
    h.thread.join()


def _activate(sid: str, sandbox_type: str = "bwrap") -> None:
    state = {"type": sandbox_type, "sandboxName": f"s-{sid}", "queue": HOST_QUEUE}
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', sandbox_state = CAST(:s AS jsonb),"
        " sandbox_expires_at = now() + interval '1 hour',"
        " hibernate_after = now() + interval '1 minute' WHERE id = :id",
        s=json.dumps(state),
        id=sid,
    )


@pytest.fixture
def active(client: TestClient, caller: Caller, host: FakeHost) -> str:
    sid: str = create(client, caller)["session"]["id"]
    _activate(sid)
    tree = host.tree(sid)
    tree.mkdir(parents=True)
    (tree / "README.md").write_text("hello\n")
    return sid


def _url(sid: str, content: bool = False) -> str:
    return f"/api/sessions/{sid}/files" + ("/content" if content else "")


def test_write_read_list_delete_round_trip(
    client: TestClient, caller: Caller, active: str, host: FakeHost
) -> None:
    h = caller.headers
    before = sql("SELECT hibernate_after FROM sessions WHERE id = :id", id=active)[0][0]
    blob = bytes(range(256)) * 4
    r = client.put(_url(active, True), params={"path": "src/pkg/data.bin"}, content=blob, headers=h)
    assert r.status_code == 200, r.text
    assert r.json() == {"file": {"path": "src/pkg/data.bin", "size": 1024, "created": True}}
    assert (host.tree(active) / "src" / "pkg" / "data.bin").read_bytes() == blob
    # A file operation is activity.
    after = sql("SELECT hibernate_after FROM sessions WHERE id = :id", id=active)[0][0]
    assert after > before
    # Its job went to the sandbox's host queue.
    (task, queue), *_ = sql("SELECT task_name, queue FROM outbox ORDER BY id DESC LIMIT 1")
    assert (task, queue) == ("sandbox.files", HOST_QUEUE)

    got = client.get(_url(active, True), params={"path": "src/pkg/data.bin"}, headers=h)
    assert got.status_code == 200 and got.content == blob
    assert got.headers["content-type"] == "application/octet-stream"

    root = client.get(_url(active), headers=h)
    assert root.status_code == 200, root.text
    listing = root.json()
    assert listing["path"] == "." and listing["truncated"] is False
    assert [(e["name"], e["type"]) for e in listing["entries"]] == [
        ("README.md", "file"),
        ("src", "dir"),
    ]
    readme = listing["entries"][0]
    assert readme["size"] == 6 and readme["mode"] == "0644" and readme["mtime"]
    sub = client.get(_url(active), params={"path": "src/pkg"}, headers=h).json()
    assert [e["name"] for e in sub["entries"]] == ["data.bin"]

    assert_error(client.delete(_url(active), params={"path": "src"}, headers=h), 409)
    gone = client.delete(_url(active), params={"path": "src", "recursive": "true"}, headers=h)
    assert gone.status_code == 200 and gone.json() == {"deleted": {"path": "src", "type": "dir"}}
    assert not (host.tree(active) / "src").exists()
    assert_error(
        client.get(_url(active, True), params={"path": "src/pkg/data.bin"}, headers=h), 404
    )
    # Every answer was taken: no operation row is left behind.
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 0


BAD_PATHS = [
    "/etc/passwd",
    "/workspace/README.md",
    "../x",
    "a/../../x",
    "src/..",
    "nul\x00byte",
    "x" * 4097,
    "n" * 256,
]


@pytest.mark.parametrize("path", BAD_PATHS, ids=lambda p: repr(p)[:20])
def test_each_bad_path_is_400_for_every_operation_and_nothing_is_queued(
    client: TestClient, caller: Caller, active: str, host: FakeHost, path: str
) -> None:
    h = caller.headers
    jobs = sql("SELECT count(*) FROM outbox")[0][0]
    p = {"path": path}
    for r in (
        client.get(_url(active), params=p, headers=h),
        client.get(_url(active, True), params=p, headers=h),
        client.put(_url(active, True), params=p, content=b"x", headers=h),
        client.delete(_url(active), params={**p, "recursive": "true"}, headers=h),
    ):
        err = assert_error(r, 400, case=(r.request.method, path))
        assert err["missing_fields"] == ["path"]
    assert sql("SELECT count(*) FROM outbox")[0][0] == jobs
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 0
    assert sorted(os.listdir(host.tree(active))) == ["README.md"]


def test_the_root_is_only_listable(client: TestClient, caller: Caller, active: str) -> None:
    h = caller.headers
    for params in ({}, {"path": ""}, {"path": "."}):
        assert_error(client.get(_url(active, True), params=params, headers=h), 400)
        assert_error(client.put(_url(active, True), params=params, content=b"x", headers=h), 400)
        assert_error(client.delete(_url(active), params=params, headers=h), 400)
    bad = client.delete(_url(active), params={"path": "README.md", "recursive": "yes"}, headers=h)
    assert_error(bad, 400)


def test_missing_things_are_404_and_others_sessions_403(
    client: TestClient, caller: Caller, active: str
) -> None:
    h = caller.headers
    assert_error(client.get(_url(active, True), params={"path": "nope.txt"}, headers=h), 404)
    assert_error(client.get(_url(active), params={"path": "nope"}, headers=h), 404)
    assert_error(client.delete(_url(active), params={"path": "nope"}, headers=h), 404)
    assert_error(client.get(_url(new_uuid()), headers=h), 404)
    assert_error(client.get(_url("not-a-uuid"), headers=h), 404)
    assert_error(client.get(_url(active)), 401)
    eve = make_caller("Eve")
    p = {"path": "README.md"}
    assert_error(client.get(_url(active), headers=eve.headers), 403)
    assert_error(client.get(_url(active, True), params=p, headers=eve.headers), 403)
    assert_error(client.put(_url(active, True), params=p, content=b"x", headers=eve.headers), 403)
    assert_error(client.delete(_url(active), params=p, headers=eve.headers), 403)
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 0


def test_a_session_that_is_not_active_is_409_with_how_to_resume(
    client: TestClient, caller: Caller, host: FakeHost
) -> None:
    sid = create(client, caller)["session"]["id"]  # provisioning
    err = assert_error(client.get(_url(sid), headers=caller.headers), 409)
    assert err["lifecycleState"] == "provisioning"
    assert err["resume"] == f"/api/sessions/{sid}/sandbox"
    _activate(sid)
    sql_exec("UPDATE sessions SET lifecycle_state = 'hibernated' WHERE id = :id", id=sid)
    put = client.put(_url(sid, True), params={"path": "a"}, content=b"x", headers=caller.headers)
    assert assert_error(put, 409)["lifecycleState"] == "hibernated"
    _activate(sid, sandbox_type="noop")
    assert_error(client.get(_url(sid), headers=caller.headers), 409)
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 0


def test_a_sandbox_gone_from_its_host_is_409(
    client: TestClient, caller: Caller, active: str, host: FakeHost
) -> None:
    host.provider.stop(sandbox_name(uuid.UUID(active)))  # e.g. hibernating right now
    err = assert_error(client.get(_url(active), headers=caller.headers), 409)
    assert err["reason"] == "gone"


def test_over_the_size_limit_is_413_and_nothing_is_written(
    client: TestClient, caller: Caller, active: str, host: FakeHost, settings: Settings
) -> None:
    h = caller.headers
    big = b"z" * (settings.file_max_bytes + 1)
    err = assert_error(
        client.put(_url(active, True), params={"path": "big"}, content=big, headers=h), 413
    )
    assert err["limit"] == settings.file_max_bytes
    assert not (host.tree(active) / "big").exists()
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 0
    (host.tree(active) / "big").write_bytes(big)  # made by a command, say
    err = assert_error(client.get(_url(active, True), params={"path": "big"}, headers=h), 413)
    assert err["size"] == len(big) and err["limit"] == settings.file_max_bytes
    exact = b"e" * settings.file_max_bytes
    ok = client.put(_url(active, True), params={"path": "exact"}, content=exact, headers=h)
    assert ok.status_code == 200, ok.text


def test_links_in_the_tree_are_reported_never_followed(
    client: TestClient, caller: Caller, active: str, host: FakeHost, tmp_path: Path
) -> None:
    h = caller.headers
    tree = host.tree(active)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the worker's secret")
    os.symlink("/etc/passwd", tree / "passwd")
    os.symlink(outside, tree / "out")
    os.symlink(outside / "secret.txt", tree / "secret-link")

    listing = {e["name"]: e for e in client.get(_url(active), headers=h).json()["entries"]}
    assert listing["passwd"]["type"] == "link" and listing["passwd"]["target"] == "/etc/passwd"
    assert listing["out"]["target"] == str(outside)

    r = client.get(_url(active, True), params={"path": "passwd"}, headers=h)
    err = assert_error(r, 400)
    assert err["reason"] == "link" and err["target"] == "/etc/passwd" and "root:" not in r.text
    for path in ("out/secret.txt", "secret-link"):
        r = client.get(_url(active, True), params={"path": path}, headers=h)
        assert assert_error(r, 400)["reason"] == "link" and "the worker's secret" not in r.text
        put = client.put(_url(active, True), params={"path": path}, content=b"pwned", headers=h)
        assert_error(put, 400)
    put = client.put(_url(active, True), params={"path": "out/new/x"}, content=b"x", headers=h)
    assert_error(put, 400)
    assert_error(client.get(_url(active), params={"path": "out"}, headers=h), 400)
    rm = client.delete(_url(active), params={"path": "out", "recursive": "true"}, headers=h)
    assert rm.status_code == 200 and rm.json()["deleted"]["type"] == "link"
    assert sorted(os.listdir(outside)) == ["secret.txt"]
    assert (outside / "secret.txt").read_text() == "the worker's secret"


def test_no_answer_in_time_is_504_and_the_operation_never_runs_later(
    client: TestClient,
    caller: Caller,
    active: str,
    host: FakeHost,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    host.stop.set()  # the sandbox's host stops answering
    host.thread.join()
    monkeypatch.setattr(settings, "file_op_timeout_seconds", 0.3)
    r = client.put(
        _url(active, True), params={"path": "late.txt"}, content=b"x", headers=caller.headers
    )
    err = assert_error(r, 504)
    assert "nothing was changed" in err["error"] and err["started"] is False
    assert sql("SELECT count(*) FROM file_ops")[0][0] == 0
    # The job's message arrives after all: nothing to do.
    (payload,) = sql("SELECT payload FROM outbox ORDER BY id DESC LIMIT 1")[0]
    op_id = uuid.UUID(payload["kwargs"]["op_id"])
    assert files.execute(get_sessionmaker(), settings, host.providers, op_id) == "skipped"
    assert not (host.tree(active) / "late.txt").exists()
