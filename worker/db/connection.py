"""The connection a worker process keeps for its runs' statements."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any, cast

import psycopg
from sqlalchemy import Connection, Dialect, Engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.orm import Session, sessionmaker

#: A delivery keeps its connection between its transactions unless it sat idle longer
#: than this (a long provider call): then it checks one out again, so the pool's
#: pre-ping replaces a connection the server dropped meanwhile.
CONNECTION_REUSE_SECONDS = 1.0


class KeptConnection:
    """The pooled connection a worker runs its deliveries' statements on, in autocommit:
    every hot-path transaction is one statement (one round trip), or a few statements
    sent together in one pipeline between an explicit ``BEGIN`` and ``COMMIT`` (still one
    round trip; under READ COMMITTED each statement sees what committed before it ran).

    Checked out from the engine's pool and kept between transactions (and deliveries),
    except after an idle spell longer than ``CONNECTION_REUSE_SECONDS`` (a provider
    call, a quiet worker): then it goes back to the pool and a fresh one is checked out,
    pre-pinged by the pool. Never left inside a transaction. Driver errors are raised as
    SQLAlchemy's (``OperationalError`` …), a broken connection is invalidated."""

    __slots__ = ("_engine", "_pg", "_pid", "_sa", "_used")

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._sa: Connection | None = None
        self._pg: psycopg.Connection[Any] | None = None
        self._used = 0.0
        self._pid = os.getpid()

    def usable(self) -> bool:
        """Still this process's, not closed, and not idle long enough to need a fresh
        checkout."""
        return (
            self._pid == os.getpid()
            and time.monotonic() - self._used <= CONNECTION_REUSE_SECONDS
            and (self._pg is None or not self._pg.closed)
            and (self._sa is None or not self._sa.invalidated)
        )

    @property
    def backend_pid(self) -> int | None:
        """The PostgreSQL server process of the checked-out connection, or None when none
        is checked out (what ``pg_terminate_backend`` takes to drop it from outside)."""
        return None if self._pg is None else self._pg.info.backend_pid

    def _checkout(self) -> psycopg.Connection[Any]:
        if self._pg is not None and not self.usable():
            self.close()
        if self._pg is None:
            sa = self._engine.connect()
            try:
                # Reset to the default by the pool when the connection goes back.
                sa.execution_options(isolation_level="AUTOCOMMIT")
                pg = sa.connection.driver_connection
                assert isinstance(pg, psycopg.Connection)
            except BaseException:
                sa.close()
                raise
            self._sa, self._pg = sa, pg
        return self._pg

    def execute(self, sql: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
        """One statement, committed on its own."""
        pg = self._checkout()
        try:
            cur = pg.execute(sql, params)
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        self._used = time.monotonic()
        return cur

    def transaction(
        self, statements: list[tuple[str, dict[str, Any]]]
    ) -> list[psycopg.Cursor[Any]]:
        """``statements`` in one transaction, sent in one pipeline (one round trip); a
        failure rolls back all of them. Returns each statement's cursor."""
        pg = self._checkout()
        cursors = [pg.cursor() for _ in statements]
        try:
            with pg.pipeline():
                pg.execute("BEGIN")
                for cur, (sql, params) in zip(cursors, statements, strict=True):
                    cur.execute(sql, params)
                pg.execute("COMMIT")
        except psycopg.Error as exc:
            raise self._failed(exc) from exc
        self._used = time.monotonic()
        return cursors

    @contextlib.contextmanager
    def orm(self) -> Iterator[sessionmaker[Session]]:
        """ORM sessions on this connection, with ordinary transactions (the engine's
        default isolation) for the duration: for a synchronous caller (the outbox marking
        rows published), which then needs no pool checkout or ping."""
        self._checkout()
        sa = self._sa
        assert sa is not None
        sa.execution_options(isolation_level=self._engine.dialect.default_isolation_level)
        try:
            yield sessionmaker(bind=sa, expire_on_commit=False)
        finally:
            try:
                sa.execution_options(isolation_level="AUTOCOMMIT")
            except Exception:  # left inside a transaction, or broken: drop it
                self.close()

    def _failed(self, exc: psycopg.Error) -> Exception:
        """Drop the connection (invalidated when broken; any open transaction is rolled
        back by the pool) and return the error as SQLAlchemy raises it."""
        error = _as_sqlalchemy(self._engine.dialect, self._sa, self._pg, exc)
        self.close()
        return error

    def close(self) -> None:
        sa, self._sa, self._pg = self._sa, None, None
        if sa is not None and self._pid == os.getpid():  # never a parent's, after a fork
            with contextlib.suppress(Exception):  # a broken one is invalidated by the pool
                sa.close()


def _as_sqlalchemy(
    dialect: Dialect, sa: Connection | None, pg: psycopg.Connection[Any] | None, exc: psycopg.Error
) -> Exception:
    """A driver error as SQLAlchemy raises it (``OperationalError`` …), the connection
    invalidated when the error says it is broken."""
    broken = dialect.is_disconnect(cast(Any, exc), cast(Any, pg), None)
    if broken and sa is not None:
        with contextlib.suppress(Exception):
            sa.invalidate(exc)
    return sa_exc.DBAPIError.instance(
        None, None, exc, psycopg.Error, connection_invalidated=broken, dialect=dialect
    )


@contextlib.contextmanager
def driver(db: Session) -> Iterator[psycopg.Connection[Any]]:
    """The session's psycopg connection, in the session's transaction, for hot-path
    statements sent without SQLAlchemy's statement layer (and pipelined where they can
    be: ``with pg.pipeline(): …``). Driver errors come out as SQLAlchemy's, a broken
    connection invalidated, so callers and the API's error mapping see one kind."""
    sa = db.connection()
    pg = sa.connection.driver_connection
    assert isinstance(pg, psycopg.Connection)
    try:
        yield pg
    except psycopg.Error as exc:
        raise _as_sqlalchemy(sa.dialect, sa, pg, exc) from exc
