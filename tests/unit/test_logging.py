"""structlog setup: JSON off a TTY, console lines on one, and secrets redacted from
every line (structlog and stdlib loggers alike, exceptions included)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from worker.logging import REDACTED, redact_processor, redact_text

ROOT = Path(__file__).resolve().parents[2]

TOKEN = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
PAT = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
API_KEY = "slk_" + "x" * 20 + "-_Yz0123456789abcdefgh"
DB_PASSWORD = "s3cr3t-Passw0rd"
DB_URL = f"postgresql+psycopg://lifecycle:{DB_PASSWORD}@db.internal:5432/lifecycle"
SECRETS = (TOKEN, PAT, API_KEY, DB_PASSWORD)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (f"token {TOKEN} here", f"token {REDACTED} here"),
        (f"pat={PAT}", f"pat={REDACTED}"),
        (f"x-api-key: {API_KEY}", f"x-api-key: {REDACTED}"),
        (f"Authorization: Bearer {API_KEY}", f"Authorization: Bearer {REDACTED}"),
        (DB_URL, f"postgresql+psycopg://lifecycle:{REDACTED}@db.internal:5432/lifecycle"),
        ("redis://:hunter2hunter2@cache:6379/0", f"redis://:{REDACTED}@cache:6379/0"),
        ("amqp://guest:guest@rabbit:5672//", f"amqp://guest:{REDACTED}@rabbit:5672//"),
        ("postgresql://postgres@127.0.0.1:5432/db", "postgresql://postgres@127.0.0.1:5432/db"),
        ("session 5e0c9b70 moved to active", "session 5e0c9b70 moved to active"),
    ],
)
def test_redact_text(raw: str, expected: str) -> None:
    assert redact_text(raw) == expected


def test_processor_scrubs_values_nested_values_and_secret_named_keys() -> None:
    event = {
        "event": f"calling GitHub with {TOKEN}",
        "url": DB_URL,
        "headers": {"Authorization": f"Bearer {API_KEY}", "accept": "application/json"},
        "args": [f"--key={API_KEY}", 3],
        "password": "plain-but-named-password",
        "github_token": "anything",
        "exception": f"Traceback ...\nRuntimeError: connect to {DB_URL} with {TOKEN}",
        "session_id": "5e0c9b70-0000-4000-8000-000000000000",
        "count": 3,
    }
    out = redact_processor(None, "info", dict(event))
    rendered = json.dumps(out)
    for secret in (*SECRETS, "plain-but-named-password", "anything"):
        assert secret not in rendered
    assert out["password"] == REDACTED and out["github_token"] == REDACTED
    assert out["headers"]["accept"] == "application/json"
    assert out["session_id"] == event["session_id"] and out["count"] == 3


_SCRIPT = textwrap.dedent(
    f"""
    import logging
    from worker.logging import configure_logging, get_logger
    configure_logging("INFO")
    log = get_logger("probe")
    log.info("probe.structlog", url={DB_URL!r}, note="token {TOKEN}")
    logging.getLogger("celery.probe").warning("stdlib line %s key %s", {DB_URL!r}, {API_KEY!r})
    try:
        raise RuntimeError("boom with {TOKEN} and {DB_URL}")
    except RuntimeError:
        log.exception("probe.failed")
    """
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_json_lines_off_a_tty_with_secrets_redacted() -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = [json.loads(line) for line in result.stderr.splitlines() if line.strip()]
    events = {line["event"] for line in lines}
    assert {"probe.structlog", "probe.failed"} <= events
    assert any(e.startswith("stdlib line") for e in events)
    assert all({"timestamp", "level", "logger"} <= line.keys() for line in lines)
    failed = next(line for line in lines if line["event"] == "probe.failed")
    assert "RuntimeError" in failed["exception"] and REDACTED in failed["exception"]
    for secret in SECRETS:
        assert secret not in result.stderr


def test_console_lines_on_a_tty_with_secrets_redacted() -> None:
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            env=_env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=follower,
            timeout=60,
            check=True,
        )
        assert proc.returncode == 0
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the other side is closed and drained
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        if follower != -1:
            os.close(follower)
        os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert "probe.structlog" in text and "probe.failed" in text
    assert not any(line.lstrip().startswith("{") for line in text.splitlines() if line.strip())
    for secret in SECRETS:
        assert secret not in text


def test_key_value_secrets_in_free_text_are_redacted() -> None:
    from worker.logging import redact_text

    text = redact_text("connect host=db password=hunter2 user=bob; token: abc123 api_key=zzz9")
    for secret in ("hunter2", "abc123", "zzz9"):
        assert secret not in text
    assert "host=db" in text and "user=bob" in text


_FAST_SCRIPT = textwrap.dedent(
    f"""
    import logging, structlog
    from worker.logging import configure_logging, get_logger, write_json_line
    configure_logging("INFO")
    fields = dict(method="POST", route="/api/sessions", status=200, duration_ms=1.5,
                  account_id=None, note="token {TOKEN}")
    with structlog.contextvars.bound_contextvars(request_id="req-1"):
        get_logger("api.access").info("http.request", **fields)
        assert write_json_line("api.access", "http.request", fields)
        logging.getLogger().addHandler(logging.NullHandler())  # someone else listens
        assert not write_json_line("api.access", "http.request", fields)
    """
)


def test_the_fast_json_line_is_the_structlog_line() -> None:
    """The access log's direct write renders what structlog would (same keys and
    values, the bound context, secrets redacted), and steps aside when another handler
    listens (a test's capture) so nothing is missed."""
    result = subprocess.run(
        [sys.executable, "-c", _FAST_SCRIPT],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    slow, fast = (json.loads(line) for line in result.stderr.splitlines() if line.strip())
    assert slow.pop("timestamp")[:10] == fast.pop("timestamp")[:10]
    assert slow == fast
    assert fast["request_id"] == "req-1" and fast["note"] == f"token {REDACTED}"
    assert TOKEN not in result.stderr
