"""Commands end to end: the API process, a real Celery worker process with the ``bwrap``
provider, real PostgreSQL, the broker and bubblewrap. Nothing in-process."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support.commands import bwrap_stack_on, finished, get_command, run
from tests.support.factories import Caller
from tests.support.processes import wait_until
from tests.support.stack import Stack, amqp_up, create, kick, running, wait_state

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def bwrap_stack(
    bwrap: str, server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = bwrap_stack_on(server_urls, tmp_path_factory.mktemp("e2e-bwrap"), server_urls["broker_url"])
    with running(s, concurrency=3):
        yield s


@pytest.fixture(scope="module")
def bwrap_rabbit_stack(
    bwrap: str, server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    url = os.environ.get("LIFECYCLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    if not amqp_up():
        pytest.skip("no RabbitMQ answers on 127.0.0.1:5672 (set LIFECYCLE_TEST_AMQP_URL)")
    s = bwrap_stack_on(server_urls, tmp_path_factory.mktemp("e2e-bwrap-amqp"), url)
    with running(s, concurrency=3, flush=False):
        yield s


def _commands_round(stack: Stack, caller: Caller) -> None:
    with stack.client(caller) as client:
        sid = create(client)["id"]
        session = wait_state(client, sid, "active")
        assert session["sandboxState"]["type"] == "bwrap"

        hi = finished(client, sid, run(client, sid, argv=["echo", "hi"])["id"])
        assert hi["status"] == "exited" and hi["exitCode"] == 0 and hi["signal"] is None
        assert hi["stdout"] == "hi\n" and hi["stdoutBytes"] == 3 and hi["host"]

        status = finished(client, sid, run(client, sid, cmd="git status --short --branch")["id"])
        assert status["exitCode"] == 0 and status["stdout"].startswith("## "), status
        py = finished(
            client,
            sid,
            run(
                client,
                sid,
                argv=["python3", "-c", "import os, sys; print(sys.stdin.read(), os.environ['X'])"],
                env={"X": "from-env"},
                stdin="from-stdin",
            )["id"],
        )
        assert py["stdout"] == "from-stdin from-env\n", py
        assert py["envNames"] == ["X"]

        failing = finished(client, sid, run(client, sid, cmd="echo bad >&2; exit 7")["id"])
        assert failing["status"] == "exited" and failing["exitCode"] == 7
        assert failing["stderr"] == "bad\n"

        slow = finished(
            client, sid, run(client, sid, argv=["sleep", "600"], timeoutSeconds=1)["id"]
        )
        assert slow["status"] == "killed" and slow["killedBy"] == "timeout"
        assert slow["signal"] == 9 and slow["exitCode"] is None

        secrets = finished(client, sid, run(client, sid, cmd="env; cat /proc/1/environ")["id"])
        assert "ghp_FAKE" not in secrets["stdout"] and "LIFECYCLE_" not in secrets["stdout"]
        assert "postgresql" not in secrets["stdout"]

        # Kill a running command over the API.
        long = run(client, sid, argv=["sleep", "600"], timeoutSeconds=600)
        wait_until(
            lambda: get_command(client, sid, long["id"])["status"] == "running",
            timeout=60,
            what="the command to start",
        )
        r = client.post(f"/api/sessions/{sid}/commands/{long['id']}/kill")
        assert r.status_code == 202, r.text
        killed = finished(client, sid, long["id"])
        assert killed["status"] == "killed" and killed["killedBy"] == "request"

        page = client.get(f"/api/sessions/{sid}/commands", params={"limit": "100"}).json()
        assert len(page["commands"]) == 7

        # A detached process is running when the session hibernates: it ends with it.
        server = run(client, sid, cmd="echo kept > kept.txt; exec sleep 100000", detached=True)
        # "running" is recorded when the worker claims the command, before its process
        # starts: wait for what it writes (through the files API), then hibernate.
        wait_until(
            lambda: (
                client.get(
                    f"/api/sessions/{sid}/files/content", params={"path": "kept.txt"}
                ).status_code
                == 200
            ),
            timeout=60,
            what="the detached command to write kept.txt",
        )
        assert get_command(client, sid, server["id"])["status"] == "running"
        kick(client, sid, "hibernate")
        wait_state(client, sid, "hibernated")
        gone = finished(client, sid, server["id"])
        assert gone["signal"] == 9, gone
        r = client.post(f"/api/sessions/{sid}/commands", json={"argv": ["true"]})
        assert r.status_code == 409 and r.json()["lifecycleState"] == "hibernated"

        kick(client, sid, "sandbox")
        wait_state(client, sid, "active")
        back = finished(client, sid, run(client, sid, argv=["cat", "kept.txt"])["id"])
        assert back["stdout"] == "kept\n", back


def test_commands_through_the_api_in_a_real_bwrap_sandbox(
    bwrap_stack: Stack, caller: Caller
) -> None:
    _commands_round(bwrap_stack, caller)


def test_commands_with_rabbitmq_as_the_broker(bwrap_rabbit_stack: Stack, caller: Caller) -> None:
    _commands_round(bwrap_rabbit_stack, caller)


def test_auto_resume_starts_a_hibernated_sandbox_and_then_runs_the_command(
    bwrap_stack: Stack, caller: Caller
) -> None:
    with bwrap_stack.client(caller) as client:
        sid = create(client)["id"]
        wait_state(client, sid, "active")
        wrote = finished(client, sid, run(client, sid, cmd="echo before > before.txt")["id"])
        assert wrote["exitCode"] == 0, wrote
        kick(client, sid, "hibernate")
        wait_state(client, sid, "hibernated")

        waiting = run(client, sid, argv=["cat", "before.txt"], autoResume=True)
        assert waiting["status"] == "waiting", waiting
        # The start it asked for restores the sandbox; then the command runs there.
        done = finished(client, sid, waiting["id"])
        assert done["status"] == "exited" and done["exitCode"] == 0, done
        assert done["stdout"] == "before\n" and done["host"]
        session = client.get(f"/api/sessions/{sid}").json()["session"]
        assert session["lifecycleState"] == "active"
        assert session["sandboxState"]["type"] == "bwrap"
        runs = client.get(f"/api/sessions/{sid}/runs").json()["runs"]
        assert [(r["kind"], r["trigger"], r["state"]) for r in runs][-1] == (
            "start",
            "command",
            "succeeded",
        )
