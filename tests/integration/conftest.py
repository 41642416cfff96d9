"""Fixtures of the HTTP API tests: an in-process client on the real servers and a
caller; the helpers they call are in :mod:`tests.support.api` and :mod:`tests.support.rows`."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.factories import Caller, make_caller


@pytest.fixture(scope="session")
def api_app(server_urls: dict[str, str]) -> FastAPI:
    """One app for the run (its broker connection is reused between tests)."""
    from api_stub.main import create_app

    return create_app()


@pytest.fixture
def client(
    api_app: FastAPI, db_clean: dict[str, str], redis_client: object
) -> Iterator[TestClient]:
    """The API in-process, on the run's fresh database and private Redis db index."""
    with TestClient(api_app) as c:
        yield c


@pytest.fixture
def caller(db_clean: dict[str, str]) -> Caller:
    return make_caller("Ada")
