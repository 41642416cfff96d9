"""A worker survives losing Redis while a task runs. kombu used the lost channel (its
transport or client already gone) to restore unacknowledged messages on close and to
acknowledge a task that finished after the reconnect; the AttributeError killed the
whole worker."""

from __future__ import annotations

from typing import Any

import pytest
import redis

import worker.celery_app  # noqa: F401  (installs the fix)


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
