"""A worker survives losing Redis while a task runs (kombu's restore of unacknowledged
messages on a connection that is already gone used to kill the whole worker)."""

from __future__ import annotations

from typing import Any

import worker.celery_app  # noqa: F401  (installs the fix)


def test_closing_a_lost_channel_with_unacked_messages_does_not_raise(
    server_urls: dict[str, str],
) -> None:
    from kombu import Connection

    conn = Connection(server_urls["broker_url"])
    channel: Any = conn.channel()
    # A message the worker received and has not acknowledged (acks_late: a running task).
    channel.qos._delivered["tag-1"] = object()
    channel.qos._delivered.restored = False
    # What the consumer's error path leaves behind: the transport's client released.
    channel.connection.client = None
    channel.close()  # kombu 5.7 alone: AttributeError ('NoneType' ... 'hostname')
    assert channel.closed
