"""``lifecycle up`` reports every busy port in one message, before starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from worker.ops.stack import Stack, StackError, StackOptions


def _hold() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def test_both_busy_ports_are_named_at_once(tmp_path: Path) -> None:
    api, flower = _hold(), _hold()
    try:
        api_port, flower_port = api.getsockname()[1], flower.getsockname()[1]
        stack = Stack(StackOptions(tmp_path, api_port=api_port, flower_port=flower_port))
        with pytest.raises(StackError) as err:
            stack.run()
        message = str(err.value)
        assert f"port {api_port} for the API" in message
        assert f"port {flower_port} for the Flower" in message
        assert "API_PORT=" in message and "--flower-port" in message
        # Nothing was started: no database or broker directory in the data directory.
        assert not any(p.name in ("postgres", "redis") for p in tmp_path.iterdir())
    finally:
        api.close()
        flower.close()


def test_logs_are_appended_across_starts_and_rotated_by_size(tmp_path: Path) -> None:
    import sys

    from worker.ops.supervisor import Supervisor, rotate_log

    logs = tmp_path / "logs"
    for run in ("first", "second"):
        sup = Supervisor({}, logs, echo=None, say=lambda _m: None)
        sup.add("child", [sys.executable, "-c", f"print('{run} run')"])
        sup.start_all()
        child = sup.children["child"]
        assert child.proc is not None and child.reader is not None
        child.proc.wait(timeout=60)
        child.reader.join(timeout=60)
    text = (logs / "child.log").read_text()
    assert "first run" in text and "second run" in text
    assert text.count("starting ---") == 2

    path = logs / "child.log"
    assert not rotate_log(path, limit=10**9)
    for generation in range(5):
        path.write_text(f"generation {generation}\n")
        assert rotate_log(path, limit=1, keep=3)
    assert not path.exists()
    kept = sorted(p.name for p in logs.iterdir())
    assert kept == ["child.log.1", "child.log.2", "child.log.3"]
    assert (logs / "child.log.1").read_text() == "generation 4\n"
    assert (logs / "child.log.3").read_text() == "generation 2\n"
