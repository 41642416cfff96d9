"""The no-op provider set (``LIFECYCLE_PROVIDER_SET=noop``): every provider call succeeds
at once and touches nothing, so a run costs only its orchestration (claim, record,
outbox, publish). Used by the benchmarks (``bench/``) and for load-testing a deployment's
database and broker; never for real sessions.

The implementations are stateless, so any worker process (or host) may serve any run:
a sandbox "exists" everywhere, a snapshot restores from anywhere, a diff is empty.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.providers.base import (
    BranchInfo,
    RepoInfo,
    SandboxInfo,
    SnapshotInfo,
    SnapshotStore,
)
from worker.providers.bwrap import CommandLimits, CommandResult, CommandSpec

__all__ = ["NoopRepoHost", "NoopSandboxProvider", "NoopSnapshotStore", "noop_diff"]

_ZERO_SHA = "0" * 40


class NoopRepoHost:
    """A repo host whose repos and branches always exist already."""

    kind = "noop"

    def __init__(self, default_branch: str = "main") -> None:
        self.default_branch = default_branch

    def clone_url(self, owner: str, name: str) -> str:
        return f"noop://{owner}/{name}.git"

    def ensure_repo(self, owner: str, name: str) -> RepoInfo:
        return RepoInfo(
            owner=owner,
            name=name,
            clone_url=self.clone_url(owner, name),
            default_branch=self.default_branch,
            created=False,
        )

    def ensure_branch(self, repo: RepoInfo, branch: str) -> BranchInfo:
        return BranchInfo(name=branch, sha=_ZERO_SHA, created=False)

    def clone_source(self, repo_clone_url: str) -> tuple[str, dict[str, str]]:
        return repo_clone_url, {}


class NoopSandboxProvider:
    """Sandboxes that start instantly, hold nothing and exist on every host."""

    kind = "noop"

    def start_from_clone(
        self,
        name: str,
        clone_url: str,
        branch: str,
        env: dict[str, str] | None = None,
        *,
        base_branch: str = "main",
    ) -> SandboxInfo:
        return SandboxInfo(name=name, workdir=None, started_at=datetime.now(UTC), reused=False)

    def start_from_snapshot(
        self, name: str, store: SnapshotStore, snapshot_url: str
    ) -> SandboxInfo:
        return SandboxInfo(name=name, workdir=None, started_at=datetime.now(UTC), reused=False)

    def exists(self, name: str) -> bool:
        return True

    def workdir(self, name: str) -> Path:
        return Path("/nonexistent/noop-sandbox") / name

    def stop(self, name: str) -> None:
        return None

    def state(self, name: str) -> dict[str, Any]:
        return {}

    def run_command(
        self,
        name: str,
        spec: CommandSpec,
        limits: CommandLimits | None = None,
        *,
        network: bool | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
    ) -> CommandResult:
        """Every command succeeds at once and prints nothing."""
        return CommandResult(
            exit_code=0,
            signal=None,
            duration=0.0,
            stdout=b"",
            stderr=b"",
            stdout_bytes=0,
            stderr_bytes=0,
            stdout_truncated=False,
            stderr_truncated=False,
        )

    def stop_processes(self, name: str) -> int:
        return 0


class NoopSnapshotStore:
    """A snapshot store that keeps nothing (every snapshot is empty)."""

    kind = "noop"
    shared = True

    def save(self, key: str, source_dir: Path) -> SnapshotInfo:
        return SnapshotInfo(
            url=f"noop://snapshots/{key}", size_bytes=0, created_at=datetime.now(UTC)
        )

    def restore(self, url: str, target_dir: Path) -> None:
        return None

    def delete(self, url: str) -> None:
        return None

    def count(self) -> int:
        return 0


def noop_diff(workdir: Path, base_branch: str = "main") -> dict[str, Any]:
    """The cached diff of a no-op sandbox: no changes."""
    return {
        "files": [],
        "summary": {"totalFiles": 0, "totalAdditions": 0, "totalDeletions": 0},
        "baseRef": _ZERO_SHA,
        "headSha": _ZERO_SHA,
    }
