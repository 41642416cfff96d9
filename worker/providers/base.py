"""Provider interfaces.

Every external system sits behind one of these Protocols. Implementations translate
their SDK's failures into exactly two kinds of error:

* :class:`TransientProviderError` -- worth retrying (timeouts, 5xx, rate limits);
  ``retry_after`` (seconds) says the earliest sensible retry when the remote told us.
* :class:`PermanentProviderError` -- retrying cannot help (bad credentials, no access,
  a corrupt or unsafe snapshot); the run fails at once with this message.

Messages must be safe to show to a person and to store in ``lifecycleError``: they never
contain tokens, keys or URL passwords.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Callable

    from worker.providers.bwrap import CommandLimits, CommandResult, CommandSpec


class ProviderError(Exception):
    """Base class of provider failures."""


class TransientProviderError(ProviderError):
    """A failure that may go away by itself; the run retries with backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentProviderError(ProviderError):
    """A failure retrying cannot fix; the run fails with this message."""


@dataclass(frozen=True)
class RepoInfo:
    """A workspace repository as the repo host knows it."""

    owner: str
    name: str
    clone_url: str  # safe to store and show: never carries credentials
    default_branch: str
    created: bool  # True only for the call that actually created it


@dataclass(frozen=True)
class BranchInfo:
    """A session branch on the repo host."""

    name: str
    sha: str
    created: bool  # True only for the call that actually created it


@runtime_checkable
class RepoHost(Protocol):
    """Where workspace repositories live (bare repos locally, GitHub in production)."""

    kind: str

    def clone_url(self, owner: str, name: str) -> str:
        """The URL the repo will be cloned from, without credentials (pure, no I/O)."""
        ...

    def ensure_repo(self, owner: str, name: str) -> RepoInfo:
        """Return the repo, creating it (private, with an initial commit on the default
        branch) when missing. Safe against concurrent creators: exactly one repo results."""
        ...

    def ensure_branch(self, repo: RepoInfo, branch: str) -> BranchInfo:
        """Return ``branch``, cutting it from the default branch head when missing.
        Concurrent creators both succeed; exactly one branch results."""
        ...

    def clone_source(self, repo_clone_url: str) -> tuple[str, dict[str, str]]:
        """URL and extra environment for ``git clone`` of this host's repo. Credentials,
        if any, travel in the environment only, never in the URL written to ``.git``."""
        ...


@dataclass(frozen=True)
class SandboxInfo:
    """A running sandbox."""

    name: str
    workdir: Path | None  # local provider only
    started_at: datetime
    reused: bool  # True when an existing live sandbox was found and kept


@runtime_checkable
class SandboxProvider(Protocol):
    """Where a session's working tree lives while an agent works in it."""

    kind: str

    def start_from_clone(
        self,
        name: str,
        clone_url: str,
        branch: str,
        env: dict[str, str] | None = None,
        *,
        base_branch: str = "main",
    ) -> SandboxInfo:
        """Start sandbox ``name`` as a fresh checkout of ``branch``, fetching only that
        branch and ``base_branch`` (what the diff is taken against). Idempotent: when the
        sandbox already exists and is complete it is reused, untouched."""
        ...

    def start_from_snapshot(
        self, name: str, store: SnapshotStore, snapshot_url: str
    ) -> SandboxInfo:
        """Start sandbox ``name`` by restoring ``snapshot_url``. Idempotent like above."""
        ...

    def exists(self, name: str) -> bool:
        """Whether a complete sandbox ``name`` is present."""
        ...

    def workdir(self, name: str) -> Path:
        """The directory holding the sandbox's working tree (local provider)."""
        ...

    def stop(self, name: str) -> None:
        """Stop and remove the sandbox. Idempotent: stopping a missing sandbox is fine."""
        ...

    def state(self, name: str) -> dict[str, Any]:
        """Provider-specific fields to publish in ``sandboxState`` (e.g. ``workdir``)."""
        ...

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
        """Run ``spec`` confined in sandbox ``name`` and wait for its end or a limit.
        Providers that cannot confine commands raise :class:`PermanentProviderError`
        saying what to install."""
        ...

    def stop_processes(self, name: str) -> int:
        """End every process of sandbox ``name``; how many command groups were ended."""
        ...


@dataclass(frozen=True)
class SnapshotInfo:
    """A stored snapshot."""

    url: str
    size_bytes: int
    created_at: datetime


@runtime_checkable
class SnapshotStore(Protocol):
    """Where snapshots of sandbox working trees are kept."""

    kind: str
    #: Whether every worker host reads the same store (S3): then any host may restore.
    shared: bool

    def save(self, key: str, source_dir: Path) -> SnapshotInfo:
        """Archive ``source_dir`` whole (``.git``, uncommitted and untracked files) under
        ``key``. Idempotent per key: saving the same key twice leaves one snapshot."""
        ...

    def restore(self, url: str, target_dir: Path) -> None:
        """Extract snapshot ``url`` into the empty or missing ``target_dir``. Raises
        :class:`PermanentProviderError` for a missing or corrupt archive and for any member
        that would land outside ``target_dir`` (absolute path, ``..``, outside link);
        nothing is written outside ``target_dir``."""
        ...

    def delete(self, url: str) -> None:
        """Delete snapshot ``url``. Idempotent."""
        ...

    def count(self) -> int:
        """How many snapshots the store holds (for tests and operators)."""
        ...
