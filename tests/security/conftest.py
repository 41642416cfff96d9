"""The security suite drives the real lifecycle service like its integration tests, and
the API both in-process and as the product runs it (``lifecycle api``) on the same real
servers."""

from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import api_app, caller, client  # noqa: F401 -- fixtures
from tests.support.stack import Stack, make_stack


@pytest.fixture(scope="session")
def api_server(
    server_urls: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """The API as the product runs it (``lifecycle api``: uvicorn, httptools) in its own
    process, on the run's database and Redis; no worker."""
    stack = make_stack(
        server_urls, tmp_path_factory.mktemp("security-api"), server_urls["broker_url"]
    )
    stack.start_api()
    try:
        yield stack
    finally:
        stack.stop_all()


# Lines the security tests want in the run's summary (e.g. the schemathesis counts).
SUMMARY: list[str] = []


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in SUMMARY:
        terminalreporter.write_line(line)
