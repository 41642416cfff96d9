"""A pooled connection is pinged before use only after sitting idle: a busy process
pays no round trip per checkout, and a connection the server dropped while idle is
replaced, not handed out."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, text

from worker.db import engine as engine_mod


def _engine(url: str) -> Any:
    engine = create_engine(url, pool_size=1, max_overflow=0)
    engine_mod.ping_when_idle(engine)
    return engine


def _backend(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def test_a_connection_in_steady_use_is_not_pinged(
    db_clean: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(db_clean["database_url"])
    pings: list[object] = []
    real = engine.dialect.do_ping
    monkeypatch.setattr(engine.dialect, "do_ping", lambda c: pings.append(c) or real(c))
    try:
        first = _backend(engine)
        for _ in range(5):
            assert _backend(engine) == first
        assert pings == []
        monkeypatch.setattr(engine_mod, "PING_AFTER_IDLE_SECONDS", -1.0)  # everything is idle
        assert _backend(engine) == first
        assert len(pings) == 1
    finally:
        engine.dispose()


def test_the_process_engine_pings_only_idle_connections(db_clean: dict[str, str]) -> None:
    engine = engine_mod.get_engine()
    assert not engine.pool._pre_ping  # not a ping per checkout: ping_when_idle instead
    assert engine_mod.ping_when_idle.__name__ in {
        getattr(fn, "__qualname__", "").split(".")[0]
        for fn in engine.pool.dispatch.checkout  # the listener ping_when_idle installed
    }


def test_a_connection_dropped_while_idle_is_replaced(
    db_clean: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(db_clean["database_url"])
    try:
        dropped = _backend(engine)
        other = create_engine(db_clean["database_url"])
        with other.begin() as conn:  # the server drops the idle pooled connection
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": dropped})
        other.dispose()
        monkeypatch.setattr(engine_mod, "PING_AFTER_IDLE_SECONDS", -1.0)
        with engine.connect() as conn:  # the ping fails, the pool connects again
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != dropped
    finally:
        engine.dispose()
