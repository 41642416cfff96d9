"""One place for what the test suites share.

- :mod:`~tests.support.servers`: find or start PostgreSQL and Redis, fresh databases.
- :mod:`~tests.support.processes`: spawn ``python -m worker`` processes, bounded polling.
- :mod:`~tests.support.factories`: accounts and API keys through the real services.
- :mod:`~tests.support.lifecycle`: the in-process lifecycle service (the ``svc`` fixture).
- :mod:`~tests.support.sessions`: sessions and runs for the service tests, and their rows.
- :mod:`~tests.support.drains`: the job a worker would receive, delivered in-process.
- :mod:`~tests.support.rows`: rows read and counted straight through the engine.
- :mod:`~tests.support.api`: the in-process HTTP API's create call and error body.
- :mod:`~tests.support.stack`: the end-to-end stack of real processes, driven over HTTP.
- :mod:`~tests.support.hostile`: hooks and git config an agent could plant in a sandbox.
- :mod:`~tests.support.bwrap`: temporary directories sandbox uids can pass; their processes.
- :mod:`~tests.support.trees`: working trees compared byte for byte; git run in them.
- :mod:`~tests.support.s3`: a real S3 API (moto in server mode); a pytest plugin whose
  ``s3_server`` / ``s3_bucket`` fixtures ``tests/conftest.py`` loads.

Fixtures stay in the ``conftest.py`` files; what they build comes from here.
"""
