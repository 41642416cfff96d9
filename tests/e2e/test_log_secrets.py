"""Logs of a full lifecycle, error paths included: every run line carries its ids, one
summary line per run outcome, and a GitHub token, an API key and a database password
appear nowhere (not in the logs, not in the session's error, not in responses)."""

from __future__ import annotations

import json
import secrets
import string
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql
from sqlalchemy import select
from sqlalchemy.engine import make_url

from tests.support.factories import make_caller
from tests.support.servers import conninfo
from tests.support.stack import Stack, create, get, history, kick, make_stack, running, wait_state
from worker.db.engine import get_sessionmaker
from worker.db.models import LifecycleRunRecord

pytestmark = pytest.mark.e2e

ALNUM = string.ascii_letters + string.digits


@pytest.fixture(scope="module")
def secret_db(server_urls: dict[str, str]) -> Iterator[tuple[str, str]]:
    """(database URL with a password, the password): a role of its own on the test
    database, so the password really travels to every process that connects."""
    role = f"lifecycle_logs_{uuid.uuid4().hex[:8]}"
    password = "pw" + "".join(secrets.choice(ALNUM) for _ in range(30))
    base = make_url(server_urls["database_url"])
    with psycopg.connect(conninfo(server_urls["database_url"]), autocommit=True) as conn:
        ident = sql.Identifier(role)
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password))
        )
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(str(base.database)), ident
            )
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(ident))
        conn.execute(sql.SQL("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {}").format(ident))
    url = base.set(username=role, password=password).render_as_string(hide_password=False)
    with psycopg.connect(conninfo(url)) as conn:  # the role can log in with its password
        conn.execute("SELECT 1 FROM sessions LIMIT 1")
    try:
        yield url, password
    finally:
        with psycopg.connect(conninfo(server_urls["database_url"]), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


@pytest.fixture(scope="module")
def token() -> str:
    return "ghp_" + "".join(secrets.choice(ALNUM) for _ in range(36))


@pytest.fixture(scope="module")
def secret_stack(
    server_urls: dict[str, str],
    secret_db: tuple[str, str],
    token: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Stack]:
    s = make_stack(
        server_urls,
        tmp_path_factory.mktemp("e2e-secrets"),
        server_urls["broker_url"],
        {"LIFECYCLE_DATABASE_URL": secret_db[0], "LIFECYCLE_GITHUB_TOKEN": token},
    )
    with running(s):
        yield s


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        if "{" not in line:
            continue
        try:
            out.append(json.loads(line[line.index("{") :]))
        except ValueError:
            continue
    return out


def test_no_secret_reaches_logs_errors_or_responses(
    secret_stack: Stack, secret_db: tuple[str, str], db_clean: dict[str, str], token: str
) -> None:
    stack = secret_stack
    db_url, password = secret_db
    caller = make_caller("secrets")
    key = caller.key
    leaky = f"upstream said: token {token}, dsn {db_url}, key {key}, Bearer {key}"
    stack.plan_faults(
        {
            # retried: a transient failure whose message carries every secret
            "repo_host.ensure_repo": [{"error": "transient", "message": leaky}],
            # then a permanent one: the session fails with that message as its error
            "sandbox.start_from_clone": [{"error": "permanent", "message": leaky}],
        }
    )
    bodies: list[str] = []
    with stack.client(caller) as client:
        sid = create(client, title="secrets")["id"]
        failed = wait_state(client, sid, "failed")
        assert failed["lifecycleError"] and "[REDACTED]" in failed["lifecycleError"]
        bodies.append(client.get(f"/api/sessions/{sid}").text)
        bodies.append(client.get(f"/api/sessions/{sid}/runs").text)
        # recovery
        kick(client, sid, "sandbox")
        s = wait_state(client, sid, "active")
        assert s["lifecycleError"] is None
        kick(client, sid, "hibernate")
        wait_state(client, sid, "hibernated")
        runs = history(client, sid)
        bodies.append(json.dumps(get(client, sid)))
        # API error paths, each carrying the key somewhere a careless log would print it
        bodies.append(client.get(f"/api/sessions/{key}").text)
        bodies.append(client.post("/api/sessions", content=f'{{"title": "{key}"').text)
        bodies.append(client.post("/api/sessions", json={"organizationId": key}).text)
    bad = httpx.get(
        f"{stack.base_url}/api/sessions",
        headers={"x-api-key": key + "x", "Authorization": f"Bearer {key}"},
        timeout=10,
    )
    bodies.append(bad.text)
    assert bad.status_code in (400, 401)

    logs = stack.logs_text()
    assert "lifecycle.run" in logs and "[REDACTED]" in logs  # the leaky paths were logged
    for name, secret in (("GitHub token", token), ("API key", key), ("DB password", password)):
        assert secret not in logs, f"the {name} is in the logs"
        for body in bodies:
            assert secret not in body, f"the {name} is in a response: {body[:300]}"
    for r in runs:
        assert token not in (r["error"] or "") and key not in (r["error"] or "")

    # Every line logged inside a run carries the run's ids; one summary line per outcome.
    lines = _json_lines(logs)
    run_lines = [
        line
        for line in lines
        if str(line.get("event", "")).startswith("lifecycle.")
        and str(line.get("logger", "")).startswith("worker.")
    ]
    assert run_lines
    for line in run_lines:
        missing = {"session_id", "run_id", "task_id", "version"} - line.keys()
        assert not missing, (missing, line)
    summaries = [line for line in run_lines if line["event"] == "lifecycle.run"]
    for line in summaries:
        assert {"outcome", "from_version", "duration_ms", "kind"} <= line.keys(), line
    mine = [line for line in summaries if line["session_id"] == sid]
    with get_sessionmaker()() as db:
        task_ids = {
            str(run_id): task_id
            for run_id, task_id in db.execute(
                select(LifecycleRunRecord.id, LifecycleRunRecord.task_id).where(
                    LifecycleRunRecord.session_id == uuid.UUID(sid)
                )
            )
        }
    for run in runs:
        ended = [
            line for line in mine if line["run_id"] == run["id"] and line["outcome"] != "retry"
        ]
        assert len(ended) == 1, (run, ended)
        assert ended[0]["outcome"] == run["state"]
        assert ended[0]["task_id"] == task_ids[run["id"]]
        retried = [
            line for line in mine if line["run_id"] == run["id"] and line["outcome"] == "retry"
        ]
        assert len(retried) == run["attempts"] - 1
    provision = next(r for r in runs if r["kind"] == "provision")
    assert provision["attempts"] == 2 and provision["state"] == "succeeded"


def test_logs_are_json_lines(secret_stack: Stack) -> None:
    """Every line the API and worker log is one JSON object (LIFECYCLE_LOG_JSON=true here;
    off a TTY that is also the default, see tests/unit/test_logging.py)."""
    text = secret_stack.logs_text()
    structured = _json_lines(text)
    assert len(structured) > 10
    levels = {line.get("level") for line in structured}
    assert "info" in levels
    assert all("timestamp" in line and "event" in line for line in structured)
