"""The security suite drives the real lifecycle service like its integration tests, and
the API in-process on the same real servers."""

from tests.integration.conftest import api_app, caller, client  # noqa: F401 -- fixtures
from tests.integration.test_lifecycle_service import svc  # noqa: F401 -- fixture
