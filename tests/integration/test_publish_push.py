"""The Redis fast path of CeleryPublisher.publish_many writes what Celery's send_task
writes: the same envelope, headers, properties and body, to the same list."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

import pytest

from worker.celery_app import create_celery
from worker.config import Settings
from worker.providers.broker import CeleryPublisher
from worker.task_names import DEFAULT_QUEUE


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
    assert publisher.fast_path
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
    assert not publisher.fast_path
    ids = [str(uuid.uuid4()) for _ in range(3)]
    publisher.publish_many(
        [("lifecycle.start", {"session_id": i, "run_id": i, "version": 1}, i, None) for i in ids]
    )
    assert [m["headers"]["id"] for m in _drain(redis_client, DEFAULT_QUEUE)] == ids


def _outbox_rows(n: int) -> list[tuple[int, str, dict[str, Any], str | None]]:
    """``n`` committed, claimed outbox rows, as the API writes them."""
    from worker.db.engine import get_sessionmaker
    from worker.services import outbox

    with get_sessionmaker().begin() as db:
        records = [
            outbox.add(
                db, "lifecycle.start", {"session_id": str(i), "run_id": str(i), "version": 1}
            )
            for i in range(n)
        ]
        db.flush()
        return [(r.id, r.task_name, r.payload, r.queue) for r in records]


def test_background_publisher_publishes_and_marks_every_submitted_row(
    db_clean: dict[str, str], redis_client: Any
) -> None:
    from tests.support.rows import sql
    from worker.db.engine import get_sessionmaker
    from worker.services.outbox import BackgroundPublisher

    settings = Settings(broker_url=db_clean["broker_url"])
    background = BackgroundPublisher(get_sessionmaker, CeleryPublisher(create_celery(settings)))
    rows = _outbox_rows(25)
    for row in rows:  # one at a time, as requests hand them over
        background.submit([row])
    assert background.flush(timeout=30)
    published = sql(
        "SELECT id FROM outbox WHERE published_at IS NOT NULL AND claimed_until IS NULL"
    )
    assert sorted(r.id for r in published) == sorted(r[0] for r in rows)
    queued = _drain(redis_client, DEFAULT_QUEUE)
    assert sorted(m["headers"]["id"] for m in queued) == sorted(r[2]["task_id"] for r in rows)
    background.close()


def test_background_publisher_releases_rows_the_broker_refused(
    db_clean: dict[str, str], redis_client: Any
) -> None:
    """Refused rows are released at once (claim cleared, error kept) for the relay."""
    from tests.support.rows import sql
    from worker.db.engine import get_sessionmaker
    from worker.services.outbox import BackgroundPublisher

    def refuse(task: str, kwargs: dict[str, Any], task_id: str, queue: str | None) -> None:
        raise ConnectionError("broker down")

    background = BackgroundPublisher(get_sessionmaker, refuse)
    rows = _outbox_rows(3)
    background.submit(rows)
    assert background.flush(timeout=30)
    got = sql("SELECT id, published_at, claimed_until, last_error FROM outbox ORDER BY id")
    # One failure stops the batch: the first row is released with the error, the rest
    # stay claimed until their claim runs out, then the relay takes them all.
    assert got[0].published_at is None and got[0].claimed_until is None
    assert "broker down" in got[0].last_error
    assert all(r.published_at is None for r in got)
    background.close()
