"""The security suite drives the real lifecycle service like its integration tests."""

from tests.integration.test_lifecycle_service import svc  # noqa: F401 -- fixture
