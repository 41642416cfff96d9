"""Engine and sessionmaker, built lazily once per process (safe across fork)."""

from __future__ import annotations

import os
import threading
import time
from typing import Any, cast

from sqlalchemy import Engine, create_engine, event
from sqlalchemy import exc as sa_exc
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
                pool_size=10,
                max_overflow=20,
                pool_timeout=10,
                connect_args={"connect_timeout": 5},
            )
            ping_when_idle(_engine)
            _factory = sessionmaker(_engine, expire_on_commit=False)
            _pid = os.getpid()
        return _engine


#: A pooled connection idle longer than this is pinged before it is handed out; one in
#: steady use is not (a ping is a round trip: a sixth of a create's).
PING_AFTER_IDLE_SECONDS = 1.0


def ping_when_idle(engine: Engine) -> None:
    """``pool_pre_ping``, but only for connections that sat in the pool a while: a
    connection the server dropped (a restart, an idle timeout) is replaced before use,
    and a busy process pays no round trip per checkout. A ping that fails makes the pool
    discard the connection and hand out another (SQLAlchemy retries the checkout)."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi: Any, record: Any) -> None:
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("idle_since")
        if since is None or time.monotonic() - since <= PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi)
            dbapi.rollback()  # the ping's implicit transaction: hand the connection out idle
        except Exception as exc:
            if engine.dialect.is_disconnect(cast(Any, exc), dbapi, None):
                raise sa_exc.DisconnectionError(str(exc)) from exc
            raise
        if not alive:
            raise sa_exc.DisconnectionError("the connection did not answer a ping")


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
