"""What each run kind does with the providers, once its claim is committed.

Called by :class:`~worker.services.lifecycle.LifecycleService` between the claim and
the record, with no transaction open; each method returns the session columns the
record will write.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from worker.config import Settings
from worker.domain.lifecycle import (
    LifecycleState,
    sandbox_name,
    session_timeouts,
    snapshot_key,
)
from worker.logging import get_logger
from worker.providers.base import PermanentProviderError
from worker.providers.registry import Providers
from worker.routing import host_of

if TYPE_CHECKING:
    from worker.services.lifecycle import RunView, SessionView

log = get_logger(__name__)
ACTIVE = LifecycleState.ACTIVE.value


class SandboxWork:
    """The provider side of runs: provision, start, diff, capture."""

    def __init__(self, settings: Settings, providers: Providers, queue: str) -> None:
        self.settings = settings
        self.providers = providers
        self.queue = queue

    def provision(self, s: SessionView) -> dict[str, Any]:
        if not (s.repo_owner and s.repo_name and s.branch):
            raise PermanentProviderError("the session has no workspace repo or branch recorded")
        host = self.providers.repo_host
        repo = host.ensure_repo(s.repo_owner, s.repo_name)
        branch = host.ensure_branch(repo, s.branch)
        # Worth a line of its own when something was created (the run's outcome line
        # follows anyway); a re-provision of existing ones only at debug level.
        (log.info if repo.created or branch.created else log.debug)(
            "lifecycle.provisioned",
            repo_created=repo.created,
            branch_created=branch.created,
            branch_sha=branch.sha,
        )
        return {
            "clone_url": repo.clone_url,
            "provisioned_at": datetime.now(UTC),
            "is_new_branch": True,
            "lifecycle_state": LifecycleState.PROVISIONING.value,
        }

    def start(self, s: SessionView) -> dict[str, Any]:
        name = sandbox_name(s.id)
        sandbox = self.providers.sandbox
        if s.snapshot_url:
            info = sandbox.start_from_snapshot(name, self.providers.snapshots, s.snapshot_url)
        else:
            if not (s.clone_url and s.branch):
                raise PermanentProviderError("the session has no clone URL or branch recorded")
            url, env = self.providers.repo_host.clone_source(s.clone_url)
            info = sandbox.start_from_clone(
                name, url, s.branch, env, base_branch=self.settings.default_branch
            )
        now = datetime.now(UTC)
        idle, lifetime = session_timeouts(
            self.settings, s.idle_timeout_seconds, s.max_lifetime_seconds
        )
        expires = now + timedelta(seconds=lifetime)
        state: dict[str, Any] = {
            "type": sandbox.kind,
            "sandboxName": name,
            "expiresAt": expires.isoformat(),
            "startedAt": info.started_at.isoformat(),
            "queue": self.queue,
            # The host that holds the sandbox now (after a restore from a shared store,
            # not necessarily the one that took the snapshot).
            "host": host_of(self.queue),
        }
        state.update(sandbox.state(name))
        return {
            "lifecycle_state": ACTIVE,
            "sandbox_state": state,
            "last_activity_at": now,
            "hibernate_after": now + timedelta(seconds=idle),
            "sandbox_expires_at": expires,
        }

    def resting_state(self, s: SessionView) -> dict[str, Any]:
        """What ``sandboxState`` keeps while no sandbox runs: only what resuming needs —
        and, when snapshots stay on this host's own disk, which host can restore them."""
        state: dict[str, Any] = {
            "type": self.providers.sandbox.kind,
            "sandboxName": sandbox_name(s.id),
        }
        if not getattr(self.providers.snapshots, "shared", False):
            state["snapshotQueue"] = self.queue
        return state

    def require_sandbox(self, s: SessionView) -> str:
        name = sandbox_name(s.id)
        if not self.providers.sandbox.exists(name):
            raise PermanentProviderError(
                "the sandbox is not on this worker's host (it was lost or runs elsewhere); "
                "the last snapshot is kept, start the session again to restore it"
            )
        return name

    def diff(self, s: SessionView) -> dict[str, Any]:
        name = self.require_sandbox(s)
        diff = self.providers.diff(
            self.providers.sandbox.workdir(name), self.settings.default_branch
        )
        summary = diff["summary"]
        return {
            "cached_diff": diff,
            "cached_diff_updated_at": datetime.now(UTC),
            "lines_added": int(summary["totalAdditions"]),
            "lines_removed": int(summary["totalDeletions"]),
        }

    def capture(self, s: SessionView, run: RunView, *, with_diff: bool) -> dict[str, Any]:
        name = self.require_sandbox(s)
        changes = self.diff(s) if with_diff else {}
        # Keyed by run: a re-run of the same run overwrites the same file (one snapshot).
        info = self.providers.snapshots.save(
            snapshot_key(s.id, run.id), self.providers.sandbox.workdir(name)
        )
        changes.update(
            snapshot_url=info.url,
            snapshot_created_at=info.created_at,
            snapshot_size_bytes=info.size_bytes,
        )
        return changes
