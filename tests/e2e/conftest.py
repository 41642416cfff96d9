"""Fixtures of the end-to-end tests: the real API process (uvicorn) and a real Celery worker
process against the real PostgreSQL and broker (:mod:`tests.support.stack`)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.support.factories import Caller, make_caller
from tests.support.stack import Stack, amqp_up, make_stack, running


@pytest.fixture(scope="module")
def stack(server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """API + one worker (prefork, 2 processes) on Redis."""
    s = make_stack(server_urls, tmp_path_factory.mktemp("e2e"), server_urls["broker_url"])
    with running(s):
        yield s


@pytest.fixture(scope="module")
def rabbit_stack(
    server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The same stack with RabbitMQ as the broker: only LIFECYCLE_BROKER_URL changes."""
    url = os.environ.get("LIFECYCLE_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
    if not amqp_up():
        pytest.skip("no RabbitMQ answers on 127.0.0.1:5672 (set LIFECYCLE_TEST_AMQP_URL)")
    s = make_stack(server_urls, tmp_path_factory.mktemp("e2e-amqp"), url)
    with running(s, flush=False):
        yield s


@pytest.fixture
def caller(db_clean: dict[str, str]) -> Caller:
    return make_caller(f"e2e-{uuid.uuid4().hex[:6]}")
