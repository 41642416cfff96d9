"""The composition root for providers: which implementation each interface gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from worker.config import Settings
from worker.providers.base import RepoHost, SandboxProvider, SnapshotStore
from worker.providers.git_diff import compute_diff

#: Computes the cached diff of a sandbox working tree against its base branch.
DiffFunction = Callable[[Path, str], dict[str, Any]]


@dataclass(frozen=True)
class Providers:
    repo_host: RepoHost
    sandbox: SandboxProvider
    snapshots: SnapshotStore
    # git over the sandbox's working tree; the no-op set swaps in an empty diff.
    diff: DiffFunction = field(default=compute_diff)


def build_repo_host(settings: Settings) -> RepoHost:
    if settings.provider_set == "noop":
        from worker.providers.noop import NoopRepoHost

        return NoopRepoHost(settings.default_branch)
    if settings.repo_host == "github":
        from worker.providers.github import GitHubRepoHost

        return GitHubRepoHost.from_settings(settings)
    from worker.providers.local_git import LocalGitRepoHost

    return LocalGitRepoHost(settings.repos_dir.resolve())


def build_snapshot_store(settings: Settings) -> SnapshotStore:
    """``file`` (this host's disk) or ``s3://bucket/prefix`` (shared by every host)."""
    if settings.snapshot_store.startswith("s3://"):
        from worker.providers.s3_snapshots import S3SnapshotStore

        return S3SnapshotStore.from_url(
            settings.snapshot_store,
            endpoint_url=settings.s3_endpoint_url,
            part_size=settings.s3_part_size_bytes,
        )
    from worker.providers.file_snapshots import FileSnapshotStore

    return FileSnapshotStore(settings.snapshots_dir.resolve())


def build_sandbox_provider(settings: Settings) -> SandboxProvider:
    """The plain directory provider, or the same trees with commands under bubblewrap."""
    root = settings.sandboxes_dir.resolve()
    if settings.sandbox_provider == "bwrap":
        from worker.providers.bwrap_sandbox import BwrapSandboxProvider

        return BwrapSandboxProvider(
            root,
            limits=settings.command_limits(),
            network=settings.sandbox_network,
            uid_base=settings.sandbox_uid_base,
            uid_count=settings.sandbox_uid_count,
            uid_registry=settings.sandbox_uid_registry,
        )
    from worker.providers.local_sandbox import LocalSandboxProvider

    return LocalSandboxProvider(root)


def build_providers(settings: Settings) -> Providers:
    if settings.provider_set == "noop":
        providers = _noop_providers(settings)
    else:
        providers = Providers(
            repo_host=build_repo_host(settings),
            sandbox=build_sandbox_provider(settings),
            snapshots=build_snapshot_store(settings),
        )
    if settings.fault_plan is None:
        return providers
    from worker.providers.faults import FaultInjecting, FaultPlan

    plan = FaultPlan(settings.fault_plan)
    return Providers(
        repo_host=cast(RepoHost, FaultInjecting(providers.repo_host, "repo_host", plan)),
        sandbox=cast(SandboxProvider, FaultInjecting(providers.sandbox, "sandbox", plan)),
        snapshots=cast(SnapshotStore, FaultInjecting(providers.snapshots, "snapshots", plan)),
        diff=providers.diff,
    )


def _noop_providers(settings: Settings) -> Providers:
    """Providers that do nothing: only the orchestration is left (benchmarks)."""
    from worker.providers.noop import NoopSandboxProvider, NoopSnapshotStore, noop_diff

    return Providers(
        repo_host=build_repo_host(settings),
        sandbox=NoopSandboxProvider(),
        snapshots=NoopSnapshotStore(),
        diff=noop_diff,
    )
