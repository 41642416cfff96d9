"""Persistence: SQLAlchemy models, engine (lazy, per process), unit of work, migrations."""

# Every table in Base.metadata, whichever model module a caller imports first.
from worker.db import event_models as _event_models  # noqa: F401
