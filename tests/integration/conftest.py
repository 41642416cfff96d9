"""Fixtures of the HTTP API tests: an in-process client on the real servers and a
caller; the helpers they call are in :mod:`tests.support.api` and :mod:`tests.support.rows`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from tests.support.factories import Caller, make_caller
from tests.support.processes import ROOT, answers_ok, wait_until
from worker.ops.embedded import find_free_port


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


@pytest.fixture
def live_api(db_clean: dict[str, str], redis_client: object, tmp_path: Path) -> Iterator[str]:
    """``uvicorn api_stub.main:create_app`` on a free port, on this run's servers."""
    port = find_free_port()
    log = (tmp_path / "uvicorn.log").open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "api_stub.main:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**os.environ, "LIFECYCLE_LOG_JSON": "true"},
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"

    def exited() -> str | None:
        if proc.poll() is None:
            return None
        return f"uvicorn exited: {(tmp_path / 'uvicorn.log').read_text()}"

    try:
        wait_until(
            lambda: answers_ok(f"{url}/healthz"),
            timeout=60,
            what="uvicorn to answer /healthz",
            alive=exited,
        )
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
