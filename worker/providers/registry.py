"""The composition root for providers: which implementation each interface gets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

from worker.config import Settings
from worker.providers.base import RepoHost, SandboxProvider, SnapshotStore


@dataclass(frozen=True)
class Providers:
    repo_host: RepoHost
    sandbox: SandboxProvider
    snapshots: SnapshotStore


def build_repo_host(settings: Settings) -> RepoHost:
    if settings.repo_host == "github":
        from worker.providers.github import GitHubRepoHost

        return GitHubRepoHost.from_settings(settings)
    from worker.providers.local_git import LocalGitRepoHost

    return LocalGitRepoHost(settings.repos_dir.resolve())


def build_providers(settings: Settings) -> Providers:
    from worker.providers.file_snapshots import FileSnapshotStore
    from worker.providers.local_sandbox import LocalSandboxProvider

    providers = Providers(
        repo_host=build_repo_host(settings),
        sandbox=LocalSandboxProvider(settings.sandboxes_dir.resolve()),
        snapshots=FileSnapshotStore(settings.snapshots_dir.resolve()),
    )
    if settings.fault_plan is None:
        return providers
    from worker.providers.faults import FaultInjecting, FaultPlan

    plan = FaultPlan(settings.fault_plan)
    return Providers(
        repo_host=cast(RepoHost, FaultInjecting(providers.repo_host, "repo_host", plan)),
        sandbox=cast(SandboxProvider, FaultInjecting(providers.sandbox, "sandbox", plan)),
        snapshots=cast(SnapshotStore, FaultInjecting(providers.snapshots, "snapshots", plan)),
    )
