"""Session Lifecycle Worker: Celery workers that drive agent sandbox sessions."""

__version__ = "0.1.0"
