"""Files and streamed output end to end: the API process, a real Celery worker process
with the ``bwrap`` provider, real PostgreSQL, Redis and bubblewrap. Nothing in-process."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.commands import bwrap_stack_on, finished, run
from tests.support.factories import Caller
from tests.support.stack import Stack, create, wait_state

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def io_stack(
    bwrap: str, server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    import redis

    redis.Redis.from_url(server_urls["broker_url"]).flushdb()
    s = bwrap_stack_on(server_urls, tmp_path_factory.mktemp("e2e-io"), server_urls["broker_url"])
    s.start_api()
    s.start_worker(concurrency=3)
    try:
        yield s
    finally:
        s.stop_all()


def _events(response: httpx.Response, stop_after: int | None = None) -> list[dict[str, Any]]:
    """SSE events of a streamed response; with ``stop_after``, the connection is left
    after that many output events (a client going away mid-stream)."""
    events: list[dict[str, Any]] = []
    fields: dict[str, str] = {}
    for line in response.iter_lines():
        if line.startswith(":"):
            continue
        if line:
            key, _, value = line.partition(": ")
            fields[key] = value
            continue
        if not fields:
            continue
        events.append({**fields, "data": json.loads(fields["data"])})
        fields = {}
        if events[-1]["event"] == "exit":
            break
        if stop_after is not None and len(events) >= stop_after:
            break
    return events


def test_files_through_the_api_meet_commands_in_the_sandbox(
    io_stack: Stack, caller: Caller
) -> None:
    with io_stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        files = f"/api/sessions/{sid}/files"

        script = b"import pathlib\npathlib.Path('out/result.txt').write_text('made inside\\n')\n"
        r = client.put(f"{files}/content", params={"path": "tools/make.py"}, content=script)
        assert r.status_code == 200 and r.json()["file"]["created"] is True, r.text
        done = finished(
            client, sid, run(client, sid, cmd="mkdir -p out && python3 tools/make.py")["id"]
        )
        assert done["exitCode"] == 0, done
        got = client.get(f"{files}/content", params={"path": "out/result.txt"})
        assert got.status_code == 200 and got.content == b"made inside\n"

        # What a command plants is reported, never followed by the worker.
        planted = run(client, sid, cmd="ln -s /etc/passwd leak && ln -s / root")
        assert finished(client, sid, planted["id"])["exitCode"] == 0
        listing = {e["name"]: e for e in client.get(files).json()["entries"]}
        assert listing["leak"] == {**listing["leak"], "type": "link", "target": "/etc/passwd"}
        leak = client.get(f"{files}/content", params={"path": "leak"})
        assert leak.status_code == 400 and "root:" not in leak.text
        through = client.get(f"{files}/content", params={"path": "root/etc/passwd"})
        assert through.status_code == 400 and through.json()["reason"] == "link"
        put = client.put(f"{files}/content", params={"path": "root/tmp/x"}, content=b"x")
        assert put.status_code == 400

        gone = client.delete(files, params={"path": "out", "recursive": "true"})
        assert gone.status_code == 200, gone.text
        ls = finished(client, sid, run(client, sid, cmd="ls")["id"])
        assert "out" not in ls["stdout"].split() and "tools" in ls["stdout"].split()


def test_ten_thousand_lines_streamed_with_a_reconnect_in_the_middle(
    io_stack: Stack, caller: Caller
) -> None:
    program = (
        "import sys, time\n"
        "for i in range(10000):\n"
        "    print(f'line {i}', flush=True)\n"
        "    if i % 2500 == 0:\n"
        "        print(f'progress {i}', file=sys.stderr, flush=True)\n"
        "    if i % 500 == 0:\n"
        "        time.sleep(0.1)\n"
    )
    with io_stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        cid = run(client, sid, argv=["python3", "-c", program])["id"]
        url = f"/api/sessions/{sid}/commands/{cid}/output"
        with client.stream("GET", url, timeout=120) as first:
            assert first.status_code == 200
            assert first.headers["content-type"].startswith("text/event-stream")
            head = _events(first, stop_after=5)
        assert head and all(e["event"] in ("stdout", "stderr") for e in head)
        resume_at = head[-1]["id"]
        with client.stream("GET", url, headers={"Last-Event-ID": resume_at}, timeout=120) as rest:
            tail = _events(rest)
        assert tail[-1]["event"] == "exit"
        assert tail[-1]["data"]["status"] == "exited" and tail[-1]["data"]["exitCode"] == 0

        output = head + tail[:-1]
        ids = [int(e["id"]) for e in output]
        assert ids == sorted(set(ids)), "ids are byte offsets, strictly increasing"
        stdout = "".join(e["data"]["text"] for e in output if e["event"] == "stdout")
        stderr = "".join(e["data"]["text"] for e in output if e["event"] == "stderr")
        assert stdout == "".join(f"line {i}\n" for i in range(10000))  # nothing lost or repeated
        assert stderr == "".join(f"progress {i}\n" for i in range(0, 10000, 2500))
        # The offsets add up: the last id is every byte of both streams.
        assert ids[-1] == len(stdout.encode()) + len(stderr.encode())
        # The command's row holds the same output.
        final = finished(client, sid, cid)
        assert final["stdout"] == stdout and final["stderrBytes"] == len(stderr)
