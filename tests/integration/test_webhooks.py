"""Webhooks against a real HTTP receiver on loopback: Standard Webhooks signatures
checked by an independent implementation, retries after 5xx, a stable id to
deduplicate on, SSRF refusals at create and at connect time, disabling after a day of
failures."""

from __future__ import annotations

import base64
import json
import socket
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.api import assert_error, create
from tests.support.factories import Caller, make_caller
from tests.support.rows import sql, sql_exec
from tests.support.webhooks import Receiver, verify
from worker.config import Settings, get_settings
from worker.db.engine import get_sessionmaker
from worker.providers import webhook_http
from worker.services import webhooks


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def allow_private(api_app: FastAPI) -> Iterator[Settings]:
    """The operator allows private targets (the receiver is on loopback); retries come
    at once."""
    settings = get_settings().model_copy(
        update={"webhook_allow_private": True, "webhook_retry_seconds": [0.0, 0.0, 0.0]}
    )
    previous = api_app.state.settings
    api_app.state.settings = settings
    yield settings
    api_app.state.settings = previous


def _hook(client: TestClient, caller: Caller, url: str, **extra: Any) -> dict[str, Any]:
    r = client.post("/api/webhooks", json={"url": url, **extra}, headers=caller.headers)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def _open_deliveries(webhook_id: str) -> list[int]:
    rows = sql(
        "SELECT id FROM webhook_deliveries WHERE webhook_id = :w AND state = 'queued' ORDER BY id",
        w=webhook_id,
    )
    return [r[0] for r in rows]


def _deliver_all(settings: Settings, webhook_id: str) -> list[str]:
    """Run every queued delivery once, as the task would (queued again when due)."""
    outcomes = []
    for delivery_id in _open_deliveries(webhook_id):
        outcomes.append(webhooks.deliver(get_sessionmaker(), settings, delivery_id))
    return outcomes


def test_deliveries_are_signed_retried_and_deduplicable(
    client: TestClient, caller: Caller, allow_private: Settings, svc: Any
) -> None:
    rx = Receiver([500, 503])
    try:
        created = _hook(client, caller, rx.url, eventTypes=["session.created"])
        secret, hook = created["secret"], created["webhook"]
        assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 24
        assert (
            "secret" not in client.get(f"/api/webhooks/{hook['id']}", headers=caller.headers).text
        )
        sid = create(client, caller)["session"]["id"]
        assert _deliver_all(allow_private, hook["id"]) == ["waiting"]  # 500
        assert webhooks.retry_due(svc) == {"queued": 1}
        assert _deliver_all(allow_private, hook["id"]) == ["waiting"]  # 503
        webhooks.retry_due(svc)
        assert _deliver_all(allow_private, hook["id"]) == ["succeeded"]
        # A duplicate of the job (the relay published it twice) sends nothing more.
        delivery_id = sql("SELECT id FROM webhook_deliveries WHERE webhook_id = :w", w=hook["id"])
        assert webhooks.deliver(get_sessionmaker(), allow_private, delivery_id[0][0]) == "skipped"
    finally:
        rx.close()
    assert len(rx.received) == 3
    ids = {r["headers"]["webhook-id"] for r in rx.received}
    assert len(ids) == 1, "the id to deduplicate on changed between retries"
    for request in rx.received:
        assert verify(secret, request["headers"], request["body"])
        assert not verify(
            secret.replace(secret[8], "A" if secret[8] != "A" else "B"),
            request["headers"],
            request["body"],
        )
        assert request["headers"]["Host"] == f"127.0.0.1:{rx.port}"
        # Nothing but the signature carries a secret.
        assert caller.key not in json.dumps(request["headers"]) + request["body"].decode()
        assert secret not in json.dumps(request["headers"]) + request["body"].decode()
    body = json.loads(rx.received[-1]["body"])
    assert body["type"] == "session.created" and str(body["id"]) == ids.pop()
    assert body["data"]["sessionId"] == sid and body["data"]["reason"].startswith("created by key")
    page = client.get(f"/api/webhooks/{hook['id']}/deliveries", headers=caller.headers).json()
    (delivery,) = page["deliveries"]
    assert delivery["state"] == "succeeded" and delivery["attempts"] == 3
    assert delivery["eventId"] == body["id"] and delivery["eventType"] == "session.created"
    assert [a["statusCode"] for a in delivery["attemptLog"]] == [500, 503, 200]
    assert delivery["attemptLog"][0]["error"].startswith("HTTP 500")


def test_event_type_filters(
    client: TestClient, caller: Caller, allow_private: Settings, receiver: Receiver
) -> None:
    everything = _hook(client, caller, receiver.url)["webhook"]
    runs_only = _hook(client, caller, receiver.url, eventTypes=["run.*"])["webhook"]
    create(client, caller)
    types = {
        w: [
            r[0]
            for r in sql(
                "SELECT e.type FROM webhook_deliveries d JOIN events e ON e.id = d.event_id"
                " WHERE d.webhook_id = :w ORDER BY d.id",
                w=w,
            )
        ]
        for w in (everything["id"], runs_only["id"])
    }
    assert types[everything["id"]] == ["session.created", "run.queued"]
    assert types[runs_only["id"]] == ["run.queued"]
    # Another account's sessions reach none of them.
    create(client, make_caller("Eve"))
    assert sql("SELECT count(*) FROM webhook_deliveries")[0][0] == 3


def test_runs_inserted_in_one_statement_each_get_their_event_and_deliveries(
    client: TestClient, caller: Caller, allow_private: Settings, receiver: Receiver, svc: Any
) -> None:
    """The sweep inserts all its runs in one statement (migration 0014: the run event and
    the fan-out run once per statement): still one event per run, in the runs' order,
    and one delivery with its outbox job per matching webhook and event, in event order."""
    from worker.services import sweeps

    sweep_hook = _hook(client, caller, receiver.url, eventTypes=["sweep.*"])["webhook"]
    all_hook = _hook(client, caller, receiver.url)["webhook"]
    sids = [create(client, caller)["session"]["id"] for _ in range(3)]
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', hibernate_after = now() - interval '1 s'"
        " WHERE id = ANY(CAST(:ids AS uuid[]))",
        ids=sids,
    )
    sql_exec("DELETE FROM lifecycle_runs WHERE session_id = ANY(CAST(:ids AS uuid[]))", ids=sids)
    before = sql("SELECT coalesce(max(id), 0) FROM events")[0][0]
    assert sweeps.hibernate_idle(svc) == {"queued": 3}

    runs = sql(
        "SELECT r.id, r.session_id, e.id AS event_id, e.type, e.user_id, e.reason"
        " FROM lifecycle_runs r JOIN events e ON e.run_id = r.id AND e.id > :b"
        " WHERE r.trigger = 'sweep' ORDER BY e.id",
        b=before,
    )
    assert sorted(str(r.session_id) for r in runs) == sorted(sids)
    assert {r.type for r in runs} == {"sweep.hibernate"}
    assert all(r.user_id is not None and r.reason.startswith("idle for") for r in runs)
    event_ids = [r.event_id for r in runs]
    for hook in (sweep_hook, all_hook):
        got = sql(
            "SELECT d.event_id, o.payload FROM webhook_deliveries d"
            " JOIN outbox o ON o.task_name = 'lifecycle.webhook_deliver'"
            "  AND (o.payload -> 'kwargs' ->> 'delivery_id')::bigint = d.id"
            " WHERE d.webhook_id = :w AND d.event_id > :b ORDER BY d.id",
            w=hook["id"],
            b=before,
        )
        assert [g.event_id for g in got] == event_ids


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
        "http://localhost/",
        "http://192.168.0.10/",
    ],
)
def test_private_targets_are_refused_without_the_setting(
    client: TestClient, caller: Caller, url: str
) -> None:
    body = assert_error(
        client.post("/api/webhooks", json={"url": url}, headers=caller.headers), 400
    )
    assert "non-public" in body["error"] and body["missing_fields"] == ["url"]


def test_bad_webhook_input(client: TestClient, caller: Caller) -> None:
    for body, fragment in (
        ({}, "url is required"),
        ({"url": "ftp://example.com/"}, "http:// or https://"),
        ({"url": "https://user:pw@example.com/"}, "credentials"),
        ({"url": "https://example.com/", "eventTypes": "session.*"}, "eventTypes"),
        ({"url": "https://example.com/", "eventTypes": ["no spaces"]}, "eventTypes"),
    ):
        r = client.post("/api/webhooks", json=body, headers=caller.headers)
        assert fragment in assert_error(r, 400, case=body)["error"]
    assert_error(client.get("/api/webhooks"), 401)
    assert_error(client.get(f"/api/webhooks/{uuid.uuid4()}", headers=caller.headers), 404)
    assert_error(client.get("/api/webhooks/nope", headers=caller.headers), 404)


def test_only_the_owner_sees_or_deletes_a_webhook(
    client: TestClient, caller: Caller, allow_private: Settings, receiver: Receiver
) -> None:
    hook = _hook(client, caller, receiver.url)["webhook"]
    eve = make_caller("Eve")
    for method, path in (
        ("GET", f"/api/webhooks/{hook['id']}"),
        ("DELETE", f"/api/webhooks/{hook['id']}"),
        ("GET", f"/api/webhooks/{hook['id']}/deliveries"),
    ):
        assert_error(client.request(method, path, headers=eve.headers), 403, "Forbidden")
    assert client.get("/api/webhooks", headers=eve.headers).json() == {"webhooks": []}
    listed = client.get("/api/webhooks", headers=caller.headers).json()["webhooks"]
    assert [w["id"] for w in listed] == [hook["id"]]
    assert client.delete(f"/api/webhooks/{hook['id']}", headers=caller.headers).status_code == 204
    assert client.get("/api/webhooks", headers=caller.headers).json() == {"webhooks": []}


def test_the_target_is_checked_again_at_connect_time(
    client: TestClient, caller: Caller, allow_private: Settings, receiver: Receiver
) -> None:
    """Allowed when created; refused when delivering once the operator no longer allows
    private targets: nothing reaches the receiver."""
    hook = _hook(client, caller, receiver.url, eventTypes=["session.created"])["webhook"]
    create(client, caller)
    strict = allow_private.model_copy(update={"webhook_allow_private": False})
    assert _deliver_all(strict, hook["id"]) == ["waiting"]
    assert receiver.received == []
    (error,) = sql("SELECT last_error FROM webhook_deliveries WHERE webhook_id = :w", w=hook["id"])
    assert error[0].startswith("refused: 127.0.0.1 resolves to a non-public address")


def test_a_name_is_resolved_once_and_the_checked_address_is_used(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    """DNS rebinding: the first answer (public) is checked and used; a second lookup
    that would answer loopback never happens."""
    answers = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.10", receiver.port))]]
    answers.append([(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", receiver.port))])
    calls: list[str] = []

    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(host)
        return answers.pop(0)

    monkeypatch.setattr(webhook_http.socket, "getaddrinfo", fake_getaddrinfo)
    connected: list[Any] = []

    def fake_connect(address: Any, timeout: Any = None) -> Any:
        connected.append(address)
        raise OSError("unreachable in the test")

    monkeypatch.setattr(webhook_http.socket, "create_connection", fake_connect)
    # 192.0.2.0/24 is documentation space: not public either, so allow for this check.
    with pytest.raises(OSError):
        webhook_http.post(
            f"http://hooks.example.test:{receiver.port}/",
            b"{}",
            {},
            allow_private=True,
            timeout=1,
        )
    assert calls == ["hooks.example.test"]
    assert connected == [("192.0.2.10", receiver.port)]
    assert receiver.received == []


def test_the_pinned_connection_keeps_the_name_in_the_host_header(
    monkeypatch: pytest.MonkeyPatch, receiver: Receiver
) -> None:
    real = socket.getaddrinfo

    def resolve_to_loopback(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1", port, *args, **kwargs)

    monkeypatch.setattr(webhook_http.socket, "getaddrinfo", resolve_to_loopback)
    answer = webhook_http.post(
        f"http://hooks.example.test:{receiver.port}/in", b"{}", {}, allow_private=True, timeout=5
    )
    assert answer.status == 200
    assert receiver.received[0]["headers"]["Host"] == f"hooks.example.test:{receiver.port}"


def test_redirects_are_not_followed(receiver: Receiver) -> None:
    receiver.statuses = [302]
    answer = webhook_http.post(receiver.url, b"{}", {}, allow_private=True, timeout=5)
    assert answer.status == 302 and len(receiver.received) == 1


def test_an_endpoint_failing_for_a_day_is_disabled_with_an_event(
    client: TestClient, caller: Caller, allow_private: Settings, receiver: Receiver
) -> None:
    receiver.statuses = [500] * 10
    hook = _hook(client, caller, receiver.url, eventTypes=["session.created"])["webhook"]
    for _ in range(2):
        create(client, caller)
    first, second = _open_deliveries(hook["id"])
    assert webhooks.deliver(get_sessionmaker(), allow_private, first) == "waiting"
    sql_exec(
        "UPDATE webhooks SET failing_since = :t WHERE id = :w",
        t=datetime.now(UTC) - timedelta(days=1, seconds=1),
        w=hook["id"],
    )
    sql_exec("UPDATE webhook_deliveries SET state = 'queued' WHERE id = :d", d=first)
    assert webhooks.deliver(get_sessionmaker(), allow_private, first) == "failed"
    got = client.get(f"/api/webhooks/{hook['id']}", headers=caller.headers).json()["webhook"]
    assert got["enabled"] is False and got["disabledReason"].startswith("failing for 86401 s")
    assert "HTTP 500" in got["disabledReason"]
    # The other waiting delivery is cancelled; a new event makes no delivery for it.
    assert sql("SELECT state FROM webhook_deliveries WHERE id = :d", d=second)[0][0] == "cancelled"
    create(client, caller)
    assert len(sql("SELECT id FROM webhook_deliveries WHERE webhook_id = :w", w=hook["id"])) == 2
    feed = client.get("/api/events", params={"limit": 500}, headers=caller.headers).json()
    disabled = [e for e in feed["events"] if e["type"] == "webhook.disabled"]
    assert len(disabled) == 1 and disabled[0]["data"]["webhookId"] == hook["id"]
    assert disabled[0]["reason"].startswith(f"webhook {receiver.url} disabled: failing for")


def test_the_trigger_names_the_task_and_queue_the_worker_serves() -> None:
    from worker.task_names import DEFAULT_QUEUE, TASK_WEBHOOK_DELIVER

    source = (
        __import__("pathlib").Path(__file__).parents[2]
        / "worker/db/migrations/versions/0008_webhooks.py"
    ).read_text()
    assert f"'{TASK_WEBHOOK_DELIVER}'" in source and f"'{DEFAULT_QUEUE}', now()" in source
