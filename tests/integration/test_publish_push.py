"""The Redis fast path of CeleryPublisher.publish_many writes what Celery's send_task
writes: the same envelope, headers, properties and body, to the same list."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from worker.celery_app import DEFAULT_QUEUE, create_celery
from worker.config import Settings
from worker.services.outbox import CeleryPublisher


def _drain(client: Any, key: str) -> list[dict[str, Any]]:
    raw = client.lrange(key, 0, -1)
    client.delete(key)
    return [json.loads(m) for m in reversed(raw)]  # LPUSH: newest first


def _comparable(message: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(message))
    props = out["properties"]
    assert uuid.UUID(props.pop("delivery_tag"))  # a fresh tag per message, on both paths
    # send_task also copies its argsrepr/kwargsrepr options into the properties (unused:
    # workers read them from the headers, where both paths put them).
    props.pop("argsrepr", None)
    props.pop("kwargsrepr", None)
    out["body"] = json.loads(base64.b64decode(out["body"]))
    return out


@pytest.mark.parametrize("queue", [None, DEFAULT_QUEUE, "lifecycle.host.test-host"])
def test_pushed_messages_equal_what_send_task_writes(
    server_urls: dict[str, str], redis_client: Any, queue: str | None
) -> None:
    settings = Settings(broker_url=server_urls["broker_url"])
    publisher = CeleryPublisher(create_celery(settings))
    assert publisher._can_push()
    key = queue or DEFAULT_QUEUE
    jobs = [
        ("lifecycle.provision", {"session_id": str(uuid.uuid4()), "run_id": "r1", "version": 0}),
        ("lifecycle.hibernate", {"session_id": str(uuid.uuid4()), "run_id": "r2", "version": 7}),
    ]
    ids = [str(uuid.uuid4()) for _ in jobs]

    for (task, kwargs), task_id in zip(jobs, ids, strict=True):
        publisher(task, kwargs, task_id, queue)
    by_send_task = _drain(redis_client, key)

    publisher.publish_many(
        [(task, kwargs, task_id, queue) for (task, kwargs), task_id in zip(jobs, ids, strict=True)]
    )
    pushed = _drain(redis_client, key)

    assert len(by_send_task) == len(pushed) == 2
    for sent, ours in zip(by_send_task, pushed, strict=True):
        assert _comparable(ours) == _comparable(sent)
    assert [m["headers"]["id"] for m in pushed] == ids


def test_without_the_fast_path_publish_many_still_sends_every_job(
    server_urls: dict[str, str], redis_client: Any
) -> None:
    """Task-sent events on: publish_many goes through send_task (in one producer batch)."""
    settings = Settings(broker_url=server_urls["broker_url"], task_sent_events=True)
    publisher = CeleryPublisher(create_celery(settings))
    assert not publisher._can_push()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    publisher.publish_many(
        [("lifecycle.start", {"session_id": i, "run_id": i, "version": 1}, i, None) for i in ids]
    )
    assert [m["headers"]["id"] for m in _drain(redis_client, DEFAULT_QUEUE)] == ids
