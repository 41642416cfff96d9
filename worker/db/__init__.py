"""Persistence: SQLAlchemy models, engine (lazy, per process), unit of work, migrations."""
