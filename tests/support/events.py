"""Events test helpers: a session created over the API with its clone URL on the
service's repo host, and a session's whole event feed."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi.testclient import TestClient

from tests.support.api import create
from tests.support.factories import Caller
from worker.db.models import SessionRecord
from worker.services.lifecycle import LifecycleService


def session_for(client: TestClient, caller: Caller, svc: LifecycleService, **body: Any) -> str:
    """A session created over the API, its clone URL pointed at the service's repo host."""
    sid = create(client, caller, body or None)["session"]["id"]
    with svc.factory.begin() as db:
        s = db.get(SessionRecord, uuid.UUID(sid))
        assert s is not None and s.repo_owner and s.repo_name
        s.clone_url = svc.providers.repo_host.clone_url(s.repo_owner, s.repo_name)
    return sid


def events_of(client: TestClient, caller: Caller, sid: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    after = 0
    while True:
        r = client.get(
            f"/api/sessions/{sid}/events", params={"after": after}, headers=caller.headers
        )
        assert r.status_code == 200, r.text
        page = r.json()
        if not page["events"]:
            return found
        found += page["events"]
        after = page["nextAfter"]
