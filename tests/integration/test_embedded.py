"""Embedded PostgreSQL / Redis (worker.ops.embedded) and the test-server helpers (tests.support.servers)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

from tests.support.servers import (
    DEFAULT_POSTGRES_URL,
    DEFAULT_REDIS_URL,
    conninfo,
    create_fresh_database,
    ensure_postgres,
    ensure_redis,
    postgres_answers,
    redis_answers,
)
from worker.ops.embedded import EmbeddedPostgres, EmbeddedRedis, find_free_port


@pytest.fixture
def pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path / "pg", find_free_port(), durable=False)
    try:
        yield server
    finally:
        server.stop(mode="immediate")


@pytest.fixture
def rds(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis", find_free_port())
    try:
        yield server
    finally:
        server.stop()


def test_find_free_port_is_bindable() -> None:
    import socket

    port = find_free_port()
    assert 1024 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_embedded_postgres_lifecycle(pg: EmbeddedPostgres) -> None:
    assert not pg.is_running()
    assert pg.start() is True
    assert pg.is_running()
    port = pg.port
    assert pg.url == f"postgresql+psycopg://postgres@127.0.0.1:{port}/lifecycle"
    assert pg.start() is False  # already running: no-op

    with psycopg.connect(conninfo(pg.url), autocommit=True) as conn:
        row = conn.execute("SELECT current_database(), current_user, 40 + 2").fetchone()
        assert row == ("lifecycle", "postgres", 42)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)
        conn.execute("CREATE TABLE kept (v text)")
        conn.execute("INSERT INTO kept VALUES ('survives restart')")
    assert any(pg.socket_dir.glob(".s.PGSQL.*"))  # unix socket inside the data dir

    pg.stop()
    assert not pg.is_running()

    # restart on the same port; data kept (a new object reads the remembered port)
    again = EmbeddedPostgres(pg.data_dir, durable=False)
    assert again.start() is True
    assert again.port == port
    with psycopg.connect(conninfo(again.url)) as conn:
        assert conn.execute("SELECT v FROM kept").fetchall() == [("survives restart",)]

    # crash: SIGKILL the postmaster, then start again on the same port
    again.kill()
    assert not again.is_running()
    assert again.start() is True
    assert again.port == port
    with psycopg.connect(conninfo(again.url)) as conn:
        assert conn.execute("SELECT count(*) FROM kept").fetchone() == (1,)

    # context manager stops it
    again.stop()
    with EmbeddedPostgres(pg.data_dir, database="other", durable=False) as ctx:
        assert ctx.is_running()
        with psycopg.connect(conninfo(ctx.url)) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("other",)
    assert not ctx.is_running()


def test_embedded_redis_restart_on_same_port(rds: EmbeddedRedis) -> None:
    assert rds.start() is True
    assert rds.start() is False
    port = rds.port
    assert rds.url == f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(rds.url)
    try:
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert client.config_get("save") == {"save": ""}
    finally:
        client.close()

    rds.stop()
    assert not rds.is_running()
    assert not redis_answers(rds.url, timeout=0.5)

    assert rds.start() is True
    assert rds.port == port
    assert redis_answers(rds.url)

    rds.kill()
    assert not rds.is_running()
    assert rds.start() is True
    assert rds.port == port
    assert redis_answers(rds.url)


def test_embedded_redis_appendonly_keeps_data(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path / "aof", appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        client.set("durable", "yes")
        client.close()
    with EmbeddedRedis(tmp_path / "aof", appendonly=True) as server:
        client = redis.Redis.from_url(server.url)
        assert client.get("durable") == b"yes"
        client.close()


@pytest.mark.skipif(
    not postgres_answers(DEFAULT_POSTGRES_URL), reason="machine PostgreSQL not running"
)
def test_ensure_postgres_prefers_machine_server(tmp_path: Path) -> None:
    assert ensure_postgres(None, tmp_path) == DEFAULT_POSTGRES_URL
    assert ensure_postgres("postgresql+psycopg://x@h/db", tmp_path) == (
        "postgresql+psycopg://x@h/db"
    )
    assert not (tmp_path / "postgres").exists()  # nothing embedded was started

    name = f"fresh_{uuid.uuid4().hex[:8]}"
    url = create_fresh_database(DEFAULT_POSTGRES_URL, name)
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    try:
        with psycopg.connect(conninfo(url)) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.commit()
        # a held connection does not block the re-creation (WITH (FORCE))
        with psycopg.connect(conninfo(url), autocommit=True) as held:
            held.execute("SELECT 1")
            assert create_fresh_database(DEFAULT_POSTGRES_URL, name) == url
        with psycopg.connect(conninfo(url)) as conn:
            assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
    finally:
        with psycopg.connect(conninfo(DEFAULT_POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.skipif(not redis_answers(DEFAULT_REDIS_URL), reason="machine Redis not running")
def test_ensure_redis_prefers_machine_server(tmp_path: Path) -> None:
    assert ensure_redis(None, tmp_path) == DEFAULT_REDIS_URL
    assert ensure_redis("redis://h:1/2", tmp_path) == "redis://h:1/2"
    assert not (tmp_path / "redis").exists()


def test_create_fresh_database_on_embedded_server(pg: EmbeddedPostgres) -> None:
    pg.start()
    admin = pg.url.rsplit("/", 1)[0] + "/postgres"
    url = create_fresh_database(admin, "fresh")
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/fresh"
    with psycopg.connect(conninfo(url)) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("fresh",)


def test_ensure_falls_back_to_embedded_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import tests.support.servers as servers

    # pretend the machine servers are absent: defaults point at closed ports,
    # and neither pg_ctlcluster nor a system redis-server can be found
    monkeypatch.setattr(
        servers,
        "DEFAULT_POSTGRES_URL",
        f"postgresql+psycopg://postgres@127.0.0.1:{find_free_port()}/test",
    )
    monkeypatch.setattr(servers, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{find_free_port()}/0")
    monkeypatch.setattr(shutil, "which", lambda *a, **k: None)
    monkeypatch.setattr(servers, "system_which", lambda name: None)

    pg_url = servers.ensure_postgres(None, tmp_path)
    redis_url = servers.ensure_redis(None, tmp_path)
    try:
        assert pg_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
        assert pg_url.endswith("/test")
        assert postgres_answers(pg_url)
        assert redis_answers(redis_url)
        # a second call reuses the running embedded servers
        assert servers.ensure_postgres(None, tmp_path) == pg_url
        assert servers.ensure_redis(None, tmp_path) == redis_url
    finally:
        EmbeddedPostgres(tmp_path / "postgres").stop(mode="immediate")
        EmbeddedRedis(tmp_path / "redis").stop()
