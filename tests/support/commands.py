"""Commands test helpers: a session made to look active on a bwrap host (contract tests),
a stack whose worker confines commands with bubblewrap, and the commands API calls the
end-to-end tests make."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.support.bwrap import searchable
from tests.support.processes import wait_until
from tests.support.rows import sql_exec
from tests.support.stack import Stack, make_stack

#: The host queue the contract tests' sandboxes live on.
HOST_QUEUE = "lifecycle.host.box-host-1"


def activate(sid: str, sandbox_type: str = "bwrap") -> None:
    state = {"type": sandbox_type, "sandboxName": f"session-{sid}", "queue": HOST_QUEUE}
    sql_exec(
        "UPDATE sessions SET lifecycle_state = 'active', sandbox_state = CAST(:s AS jsonb),"
        " sandbox_expires_at = now() + interval '1 hour',"
        " hibernate_after = now() + interval '1 minute' WHERE id = :id",
        s=json.dumps(state),
        id=sid,
    )


def bwrap_stack_on(server_urls: dict[str, str], tmp: Path, broker_url: str) -> Stack:
    searchable(tmp)
    return make_stack(
        server_urls,
        tmp,
        broker_url,
        {
            "LIFECYCLE_SANDBOX_PROVIDER": "bwrap",
            # A fake secret in the worker's own environment; no command may see it.
            "GITHUB_TOKEN": "ghp_FAKEe2eSECRET0123456789",
        },
    )


def run(client: httpx.Client, sid: str, **body: Any) -> dict[str, Any]:
    r = client.post(f"/api/sessions/{sid}/commands", json=body)
    assert r.status_code == 202, r.text
    return r.json()["command"]  # type: ignore[no-any-return]


def get_command(client: httpx.Client, sid: str, cid: str) -> dict[str, Any]:
    r = client.get(f"/api/sessions/{sid}/commands/{cid}")
    assert r.status_code == 200, r.text
    return r.json()["command"]  # type: ignore[no-any-return]


def finished(client: httpx.Client, sid: str, cid: str, timeout: float = 120) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        c = get_command(client, sid, cid)
        return c if c["status"] in ("exited", "killed", "failed") else None

    return wait_until(done, timeout=timeout, what=f"command {cid} to finish")  # type: ignore[no-any-return]
