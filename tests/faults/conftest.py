"""Fixtures of the fault suite: its own PostgreSQL and Redis (embedded servers on free
loopback ports under a temporary directory, never the machine's shared servers), a
fresh migrated database per scenario, and the closing figures in the terminal summary.

Sizes: every scenario has a short variant (part of ``make test``) and a full one marked
``faults`` (``make test-faults``). ``FAULTS_SCALE`` (a float, default 1) multiplies the
full variant's size, e.g. ``FAULTS_SCALE=0.25 make test-faults`` for a quicker full run.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import RESULTS, Cluster, MakeCluster, OwnServers
from worker.ops.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port


@pytest.fixture(scope="session")
def own_servers() -> Iterator[OwnServers]:
    """A private PostgreSQL and Redis for the whole fault suite (the scenarios stop and
    restart them; nothing else uses them).

    Their files live in a temporary directory of their own, not under pytest's base
    temp: running as root, PostgreSQL runs as another user that must traverse the path,
    and a concurrent pytest session re-tightens ``/tmp/pytest-of-<user>`` to 0700."""
    root = Path(tempfile.mkdtemp(prefix="lifecycle-faults-"))
    # fsync off for speed, but every commit is written before it is acknowledged, so a
    # crash of the server (SIGKILL) loses nothing that was answered.
    pg = EmbeddedPostgres(
        root / "pg",
        find_free_port(),
        database="faults",
        durable=False,
        settings={"synchronous_commit": "on"},
    )
    redis_server = EmbeddedRedis(root / "redis", find_free_port())

    def shut_down() -> None:
        """Stop both (idempotent); SIGKILL whatever still runs after the stop."""
        try:
            redis_server.stop()
            pg.stop(mode="immediate")
        finally:
            for server in (redis_server, pg):
                if server.is_running():
                    server.kill()
            shutil.rmtree(root, ignore_errors=True)

    atexit.register(shut_down)  # in case the session ends without fixture teardown
    pg.start()
    redis_server.start()
    try:
        yield OwnServers(pg, redis_server)
    finally:
        shut_down()
        atexit.unregister(shut_down)


@pytest.fixture
def make_cluster(
    own_servers: OwnServers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MakeCluster]:
    """``make_cluster(name, env)``: a fresh migrated database, an empty Redis and a
    :class:`Cluster` whose processes are all stopped when the test ends."""
    import redis

    from tests.support.servers import create_fresh_database, drop_database
    from worker.db.migrate import upgrade

    made: list[tuple[Cluster, str]] = []

    def make(name: str, env: dict[str, str]) -> Cluster:
        own_servers.ensure_up()
        db_name = f"faults_{name}_{uuid.uuid4().hex[:8]}"
        database_url = create_fresh_database(own_servers.pg.url, db_name)
        upgrade(database_url)
        client = redis.Redis.from_url(own_servers.redis.url)
        client.flushall()
        client.close()
        root = Path(tmp_path_factory.mktemp(f"fault-{name}"))
        cluster = Cluster(root, database_url, own_servers.redis.url, env)
        made.append((cluster, db_name))
        return cluster

    try:
        yield make
    finally:
        for cluster, db_name in made:
            cluster.stop_all()
            try:
                own_servers.ensure_up()
                drop_database(own_servers.pg.url, db_name)
            except Exception as exc:  # leave it: the servers' directory is temporary
                print(f"could not drop {db_name}: {exc}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if RESULTS:
        terminalreporter.write_sep("=", "fault scenarios")
        for line in RESULTS:
            terminalreporter.write_line(line)
