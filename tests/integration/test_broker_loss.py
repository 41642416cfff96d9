"""A worker survives losing Redis while a task runs. kombu used the lost channel (its
transport or client already gone) to restore unacknowledged messages on close and to
acknowledge a task that finished after the reconnect; the AttributeError killed the
whole worker.

The fix is installed by each process that talks to the broker (a worker at
``worker_init``), never by importing the Celery app."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import redis

from worker.providers.broker import survive_broker_loss


@pytest.fixture(autouse=True)
def _fixed() -> None:
    survive_broker_loss()  # idempotent; what a worker does at start


def _lost_channel(broker_url: str, *, transport_gone: bool) -> tuple[Any, Any]:
    from kombu import Connection

    conn = Connection(broker_url)
    channel: Any = conn.channel()
    # A message the worker received and has not acknowledged (acks_late: a running task).
    channel.qos._delivered["tag-1"] = object()
    channel.qos._delivered.restored = False
    if transport_gone:
        channel.connection = None  # after the consumer's connection was released
    else:
        channel.connection.client = None  # while the consumer closes it
    return conn, channel


def test_closing_a_lost_channel_with_unacked_messages_does_not_raise(
    server_urls: dict[str, str],
) -> None:
    conn, channel = _lost_channel(server_urls["broker_url"], transport_gone=False)
    # As the consumer's error path closes it; kombu 5.7 alone raises AttributeError
    # ('NoneType' ... 'hostname') through this, which kills the worker.
    conn.maybe_close_channel(channel)
    assert channel.closed
    _forget(channel)


def test_acking_on_a_lost_channel_raises_a_connection_error(
    server_urls: dict[str, str],
) -> None:
    """A connection error is what Celery's ack path logs and survives."""
    _, channel = _lost_channel(server_urls["broker_url"], transport_gone=True)
    with pytest.raises(redis.exceptions.ConnectionError):
        channel.qos.ack("tag-1")  # kombu 5.7 alone: AttributeError ('NoneType' ... 'client')
    _forget(channel)


def _forget(channel: Any) -> None:
    """Nothing left for kombu's exit-time restore of this fake delivery to try."""
    channel.qos._delivered.clear()
    channel.qos._delivered.restored = True


ROOT = Path(__file__).resolve().parents[2]
_PATCHED = (
    "from kombu.transport import redis as r; "
    "print(getattr(r.Channel._connparams, '_lifecycle_patched', False))"
)


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_importing_the_celery_app_patches_nothing_but_a_worker_start_does() -> None:
    """``worker.celery_app`` has no import-time side effect beyond building the app; a
    worker (``worker.tasks``, loaded by every worker) installs the fix at worker_init."""
    assert _python(f"import worker.celery_app; {_PATCHED}") == "False"
    worker_start = (
        "from celery.signals import worker_init; import worker.tasks; "
        f"worker_init.send(sender=None); {_PATCHED}"
    )
    assert _python(worker_start) == "True"
