"""Engine and sessionmaker, built lazily once per process (safe across fork)."""

from __future__ import annotations

import os
import threading

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session, sessionmaker

from worker.config import get_settings

_lock = threading.Lock()
_engine: Engine | None = None
_factory: sessionmaker[Session] | None = None
_pid: int | None = None


def get_engine() -> Engine:
    """The process's engine; a forked child builds its own instead of sharing sockets."""
    global _engine, _factory, _pid
    with _lock:
        if _engine is None or _pid != os.getpid():
            if _engine is not None:
                # Inherited from the parent: drop the pool without closing its sockets.
                _engine.dispose(close=False)
            settings = get_settings()
            _engine = create_engine(
                settings.database_url,
                pool_pre_ping=True,
                pool_size=10,
                max_overflow=20,
                pool_timeout=10,
                connect_args={"connect_timeout": 5},
            )
            _factory = sessionmaker(_engine, expire_on_commit=False)
            _pid = os.getpid()
        return _engine


def get_sessionmaker() -> sessionmaker[Session]:
    get_engine()
    assert _factory is not None
    return _factory


def reset_engine() -> None:
    """Dispose the engine (tests, settings changes)."""
    global _engine, _factory, _pid
    with _lock:
        if _engine is not None:
            _engine.dispose()
        _engine = None
        _factory = None
        _pid = None
