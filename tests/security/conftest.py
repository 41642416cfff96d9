"""The security suite drives the real lifecycle service like its integration tests."""

from __future__ import annotations

import os

import pytest

from tests.integration.test_lifecycle_service import svc  # noqa: F401 -- fixture
from worker.providers.bwrap import INSTALL_HINT, find_bwrap


@pytest.fixture(scope="session")
def bwrap() -> str:
    """The ``bwrap`` binary. Missing: skip, naming the install command; under
    ``CI=true`` fail instead, so a CI machine without it never passes by skipping."""
    path = find_bwrap()
    if path is None:
        message = f"bubblewrap is not installed: {INSTALL_HINT}"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{message} (CI=true: sandbox isolation must be tested)")
        pytest.skip(message)
    return path
