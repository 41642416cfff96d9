"""``lifecycle up`` reports every busy port in one message, before starting anything."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from worker.stack import Stack, StackError, StackOptions


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
