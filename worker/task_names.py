"""Task names and queues: what a publisher needs, importable without building the app."""

from __future__ import annotations

from worker.domain.lifecycle import RunKind

TASK_PROVISION = "lifecycle.provision"
TASK_START = "lifecycle.start"
TASK_HIBERNATE = "lifecycle.hibernate"
TASK_SNAPSHOT = "lifecycle.snapshot"
TASK_DIFF = "lifecycle.diff"
TASK_ARCHIVE = "lifecycle.archive"
# An agent's command in a live sandbox (routed like the runs bound to it).
TASK_COMMAND = "sandbox.command"
# A file operation on a live sandbox's tree (list, read, write, delete), for the API.
TASK_FILES = "sandbox.files"

SWEEP_HIBERNATE_IDLE = "sweeps.hibernate_idle"
SWEEP_RELAY_OUTBOX = "sweeps.relay_outbox"
SWEEP_REAP_RUNS = "sweeps.reap_runs"
SWEEP_EXPIRE_SNAPSHOTS = "sweeps.expire_snapshots"
SWEEP_LOST_HOSTS = "sweeps.lost_hosts"
SWEEP_CHECKPOINTS = "sweeps.checkpoints"
SWEEP_REAP_COMMANDS = "sweeps.reap_commands"
SWEEP_WEBHOOK_RETRIES = "sweeps.webhook_retries"
SWEEP_RETENTION = "sweeps.retention"

#: Delivers one webhook delivery (written with its outbox job by the trigger of
#: migration 0008, which names this task and the default queue).
TASK_WEBHOOK_DELIVER = "lifecycle.webhook_deliver"

DEFAULT_QUEUE = "lifecycle"

#: The task that runs each kind of lifecycle run.
TASK_FOR_KIND: dict[RunKind, str] = {
    RunKind.PROVISION: TASK_PROVISION,
    RunKind.START: TASK_START,
    RunKind.HIBERNATE: TASK_HIBERNATE,
    RunKind.SNAPSHOT: TASK_SNAPSHOT,
    RunKind.DIFF: TASK_DIFF,
    RunKind.ARCHIVE: TASK_ARCHIVE,
}
