"""A failure between the session insert and the commit leaves nothing behind
(SPEC §3 "one database transaction", issue 2 "Must show" 4)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.api import create
from tests.support.factories import Caller
from tests.support.rows import row_counts


class Boom(RuntimeError):
    pass


def _raise(*_: Any, **__: Any) -> Any:
    raise Boom("forced failure after the session insert")


@pytest.fixture
def lenient(api_app: FastAPI, db_clean: object, redis_client: object) -> Iterator[TestClient]:
    """A client that turns server exceptions into responses, as a real server would."""
    with TestClient(api_app, raise_server_exceptions=False) as c:
        yield c


# Each target runs after the statement writing the session, chat, run and outbox job,
# and before the commit.
FAILURE_POINTS = [
    "api_stub.routes.sessions.session_dict",  # the response's session is built
    "api_stub.routes.sessions.chat_dict",  # the response's chat is built
    "worker.services.idempotency.finish",  # the Idempotency-Key response is stored
]


@pytest.mark.parametrize("target", FAILURE_POINTS)
def test_failure_before_commit_leaves_no_trace(
    lenient: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch, target: str
) -> None:
    inserted: list[str] = []
    from worker.services import sessions

    insert = sessions.create_session

    def spy(*args: Any, **kwargs: Any) -> Any:
        created = insert(*args, **kwargs)  # the statement writing the session has run
        inserted.append("sessions")
        return created

    monkeypatch.setattr(sessions, "create_session", spy)
    monkeypatch.setattr(target, _raise)
    before = row_counts()
    r = lenient.post(
        "/api/sessions",
        headers={**caller.headers, "Idempotency-Key": "boom-1"},
        json={"title": "doomed"},
    )
    assert r.status_code == 500, r.text
    assert r.json() == {"status": "error", "error": "Internal server error"}
    assert "sessions" in inserted  # the failure really came after the session insert
    assert row_counts() == before  # no session, chat, outbox record, run or key


def test_the_failure_is_not_sticky(
    lenient: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a failed attempt the same request (same Idempotency-Key) succeeds once."""
    headers = {**caller.headers, "Idempotency-Key": "retry-me"}
    with monkeypatch.context() as m:
        m.setattr("worker.services.idempotency.finish", _raise)
        assert (
            lenient.post("/api/sessions", headers=headers, json={"title": "t"}).status_code == 500
        )
    body = create(lenient, caller, {"title": "t"}, headers=headers)
    assert body["session"]["title"] == "t"
    counts = row_counts()
    assert (counts["sessions"], counts["chats"], counts["outbox"], counts["lifecycle_runs"]) == (
        1,
        1,
        1,
        1,
    )


def test_internal_errors_do_not_leak_details(
    lenient: TestClient, caller: Caller, monkeypatch: pytest.MonkeyPatch
) -> None:
    def leak(*_: Any, **__: Any) -> Any:
        raise Boom(f"secret {caller.key}")

    monkeypatch.setattr("api_stub.routes.sessions.session_dict", leak)
    r = lenient.post("/api/sessions", headers=caller.headers)
    assert r.status_code == 500
    assert caller.key not in r.text and "Boom" not in r.text
