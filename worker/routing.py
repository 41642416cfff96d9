"""Where a run's task goes. The one place that decides routing (SPEC §2, providers).

A local sandbox lives on one host: a run that touches a live local sandbox must run on
the host holding it, through that host's own queue (named in ``sandboxState.queue``).
Runs that touch no live sandbox (provisioning, a start from the shared snapshot store
or a fresh clone) may go to any worker on the default queue.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from typing import Any

from worker.task_names import DEFAULT_QUEUE

# Kinds that need the live sandbox when one exists ("command": an agent's command;
# "files": a file operation on its tree).
_SANDBOX_BOUND = frozenset({"hibernate", "snapshot", "diff", "archive", "command", "files"})


def this_host() -> str:
    """This worker host's name: ``LIFECYCLE_HOSTNAME``, else the machine's."""
    from worker.config import get_settings

    return get_settings().hostname or socket.gethostname()


def host_queue(hostname: str | None = None) -> str:
    """The per-host queue a worker on ``hostname`` also consumes."""
    return f"{DEFAULT_QUEUE}.host.{hostname or this_host()}"


def host_of(queue: str) -> str:
    """The host name in a per-host queue's name (the queue itself if it is not one)."""
    return queue.split(".host.", 1)[1] if ".host." in queue else queue


def queue_for(kind: str, sandbox_state: Mapping[str, Any] | None) -> str:
    """The queue for a run of ``kind`` on a session whose sandbox is ``sandbox_state``.

    A start restores from a snapshot: from a shared store (S3) any host may do it, so it
    goes to the default queue; a snapshot in a host's own store (``file``) can only be
    restored there, so the resting state names that host (``snapshotQueue``)."""
    if not sandbox_state:
        return DEFAULT_QUEUE
    if kind in _SANDBOX_BOUND and sandbox_state.get("queue"):
        return str(sandbox_state["queue"])
    if kind == "start" and sandbox_state.get("snapshotQueue"):
        return str(sandbox_state["snapshotQueue"])
    return DEFAULT_QUEUE
