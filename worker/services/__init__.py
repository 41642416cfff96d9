"""Plain service functions: entrypoints (HTTP routes, Celery tasks, CLI) call exactly one."""
