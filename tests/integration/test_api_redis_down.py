"""With the broker down the API still records sessions; the outbox relay publishes their
jobs once it is back (SPEC §6, issue 2 "Must show" 5).

Runs against a private Redis server this test starts on its own port, stops and starts
again: never the machine's shared one."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from tests.support.api import create
from tests.support.factories import Caller
from tests.support.rows import sql
from worker.celery_app import create_celery
from worker.config import Settings
from worker.db.engine import get_sessionmaker
from worker.ops.embedded import EmbeddedRedis, find_free_port
from worker.providers.broker import CeleryPublisher
from worker.services.outbox import relay
from worker.task_names import DEFAULT_QUEUE, TASK_PROVISION


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", find_free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _messages(url: str) -> list[dict[str, Any]]:
    """The task messages waiting in the default queue, decoded from kombu's JSON envelope."""
    client = redis.Redis.from_url(url)
    try:
        raw = client.lrange(DEFAULT_QUEUE, 0, -1)
    finally:
        client.close()
    out = []
    for item in raw:
        envelope = json.loads(item)
        body = envelope["body"]
        if envelope["properties"].get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, _embed = json.loads(body)
        out.append(
            {
                "task": envelope["headers"]["task"],
                "id": envelope["headers"]["id"],
                "args": args,
                "kwargs": kwargs,
            }
        )
    return out


def _outbox() -> list[Any]:
    return sql("SELECT id, task_name, payload, published_at, last_error FROM outbox ORDER BY id")


def test_sessions_are_recorded_while_redis_is_down_and_published_when_it_returns(
    private_redis: EmbeddedRedis, db_clean: object, caller: Caller
) -> None:
    from api_stub.main import create_app

    settings = Settings(broker_url=private_redis.url)
    port = private_redis.port
    with TestClient(create_app(settings)) as client:
        # The broker works: the job is published at once.
        first = create(client, caller, {"title": "while up"})
        # The request returns after its commit; the process's publisher thread publishes.
        assert client.app.state.background_publisher.flush(timeout=30)  # type: ignore[attr-defined]
        assert [m["kwargs"]["session_id"] for m in _messages(private_redis.url)] == [
            first["session"]["id"]
        ]
        assert _outbox()[0].published_at is not None

        private_redis.stop()
        assert not private_redis.is_running()
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(private_redis.url, socket_connect_timeout=1).ping()

        created = [create(client, caller, {"title": f"while down {i}"}) for i in range(3)]
        # Each publish attempt failed (or was skipped in the cooldown) and released its row.
        assert client.app.state.background_publisher.flush(timeout=30)  # type: ignore[attr-defined]

    ids = {c["session"]["id"] for c in created}
    assert len(ids) == 3
    rows = sql("SELECT id FROM sessions WHERE title LIKE 'while down %'")
    assert {str(r.id) for r in rows} == ids
    pending = [r for r in _outbox() if r.published_at is None]
    assert {r.payload["kwargs"]["session_id"] for r in pending} == ids
    assert all(r.task_name == TASK_PROVISION for r in pending)

    # A relay while Redis is still down publishes nothing and keeps every job.
    result = relay(get_sessionmaker(), CeleryPublisher(create_celery(settings)))
    assert result.published == 0 and result.failed >= 1
    assert [r.id for r in _outbox() if r.published_at is None] == [r.id for r in pending]

    # Redis comes back on the same port, empty (no persistence): the relay publishes.
    private_redis.start()
    assert private_redis.port == port
    assert _messages(private_redis.url) == []
    result = relay(get_sessionmaker(), CeleryPublisher(create_celery(settings)))
    assert (result.published, result.failed) == (3, 0)

    assert all(r.published_at is not None for r in _outbox())
    messages = _messages(private_redis.url)
    assert len(messages) == 3
    assert {m["task"] for m in messages} == {TASK_PROVISION}
    assert {m["kwargs"]["session_id"] for m in messages} == ids
    by_session = {r.payload["kwargs"]["session_id"]: r.payload for r in pending}
    for m in messages:
        payload = by_session[m["kwargs"]["session_id"]]
        assert m["id"] == payload["task_id"]
        assert m["kwargs"] == payload["kwargs"]
        assert m["kwargs"]["version"] == 0

    # Nothing is left to publish: a second relay sends nothing more.
    again = relay(get_sessionmaker(), CeleryPublisher(create_celery(settings)))
    assert (again.published, again.failed) == (0, 0)
    assert len(_messages(private_redis.url)) == 3


def test_readyz_reports_the_broker_down(private_redis: EmbeddedRedis, db_clean: object) -> None:
    from api_stub.main import create_app

    settings = Settings(broker_url=private_redis.url)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        private_redis.stop()
        r = client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["status"] == "error"
        assert r.json()["checks"]["database"] == "ok"
        assert r.json()["checks"]["broker"] != "ok"
        assert client.get("/healthz").status_code == 200
