"""Shared fixtures: real PostgreSQL (a fresh, migrated database per test run) and real
Redis, found or started by :mod:`tests.support.servers`."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text

from tests.support import servers

if TYPE_CHECKING:
    from worker.services.lifecycle import LifecycleService

# s3_server / s3_bucket: a real S3 API (moto in server mode) for any test that asks.
pytest_plugins = ["tests.support.s3"]

_STATE_DIR = Path(os.environ.get("LIFECYCLE_TEST_STATE_DIR", "/tmp/lifecycle-test-servers"))


@pytest.fixture(scope="session")
def server_urls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """Point the whole process at a fresh database and a private Redis database index."""
    from worker.config import get_settings
    from worker.db.engine import reset_engine
    from worker.db.migrate import upgrade

    _STATE_DIR.mkdir(parents=True, exist_ok=True)
    admin_url = servers.ensure_postgres(os.environ.get("LIFECYCLE_DATABASE_URL"), _STATE_DIR / "pg")
    redis_url = servers.ensure_redis(os.environ.get("LIFECYCLE_BROKER_URL"), _STATE_DIR / "redis")
    db_name = f"lifecycle_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    database_url = servers.create_fresh_database(admin_url, db_name)
    upgrade(database_url)
    broker_url = servers.redis_db_url(redis_url, 0)
    data_dir = tmp_path_factory.mktemp("lifecycle-data")
    previous = {
        k: os.environ.get(k)
        for k in ("LIFECYCLE_DATABASE_URL", "LIFECYCLE_BROKER_URL", "LIFECYCLE_DATA_DIR")
    }
    os.environ["LIFECYCLE_DATABASE_URL"] = database_url
    os.environ["LIFECYCLE_BROKER_URL"] = broker_url
    os.environ["LIFECYCLE_DATA_DIR"] = str(data_dir)
    get_settings.cache_clear()
    reset_engine()
    try:
        yield {
            "admin_url": admin_url,
            "database_url": database_url,
            "broker_url": broker_url,
            "redis_url": redis_url,
            "data_dir": str(data_dir),
        }
    finally:
        reset_engine()
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
        try:
            servers.drop_database(admin_url, db_name)
        except Exception as exc:  # leave it; a later run does not reuse the name
            print(f"could not drop {db_name}: {exc}")


TABLES = (
    "outbox, idempotency_keys, lifecycle_runs, chats, sessions, api_keys, org_memberships,"
    " accounts, worker_hosts, events, webhook_attempts, webhook_deliveries, webhooks"
)


@pytest.fixture
def db_clean(server_urls: dict[str, str]) -> Iterator[dict[str, str]]:
    """Empty tables before the test (API tests commit through their own connections)."""
    from worker.db.engine import get_engine

    with get_engine().begin() as conn:
        conn.execute(text(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE"))
    yield server_urls


@pytest.fixture(scope="session")
def bwrap() -> str:
    """The ``bwrap`` binary. Missing: skip, naming the install command; under
    ``CI=true`` fail instead, so a CI machine without it never passes by skipping."""
    from worker.providers.bwrap import INSTALL_HINT, find_bwrap

    path = find_bwrap()
    if path is None:
        message = f"bubblewrap is not installed: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI=true: sandbox isolation must be tested)")
        pytest.skip(message)
    return path


@pytest.fixture
def redis_client(server_urls: dict[str, str]) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(server_urls["broker_url"])
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def svc(db_clean: dict[str, str], redis_client: object, tmp_path: Path) -> LifecycleService:
    """The lifecycle service in-process on empty tables, with a data directory and a fault
    plan file of the test's own (:func:`tests.support.lifecycle.service_settings`)."""
    from tests.support.lifecycle import make_service, service_settings

    return make_service(service_settings(tmp_path))
