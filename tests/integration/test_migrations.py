"""The schema is owned by Alembic: the migrations produce exactly what the models say."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from worker.db.engine import get_engine
from worker.db.models import Base


def test_models_match_the_migrated_schema(server_urls: dict[str, str]) -> None:
    with get_engine().connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
