"""Local repo host: bare git repositories under a directory, served by ``file://`` URLs.

Layout: ``<root>/<owner>/<name>.git``. A repository is built in a temporary directory
beside its final place and renamed into place, so a crash never leaves a half-made
repository at the final path and concurrent creators (threads or processes) end with
exactly one repository: the first rename wins, every other creator finds the winner's
repository and reuses it.

Git itself runs through :mod:`worker.providers.git` (the one runner).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

from worker.domain.names import REPO_NAME_MAX_LENGTH, require_path_segment
from worker.providers.base import (
    BranchInfo,
    PermanentProviderError,
    ProviderError,
    RepoInfo,
)
from worker.providers.git import (
    classify_git_failure,
    run_git,
    strip_url_credentials,
    validate_branch_name,
)

__all__ = [
    "LocalGitRepoHost",
    "strip_url_credentials",
    "validate_branch_name",
    "validate_safe_name",
]

DEFAULT_BRANCH = "main"
INITIAL_COMMIT_MESSAGE = "Initial commit"
STALE_BUILD_SECONDS = 3600.0

# Identity used for commits the host makes itself (the initial commit): fixed, so that
# nothing depends on a git identity being configured on the machine.
HOST_IDENTITY_ENV = {
    "GIT_AUTHOR_NAME": "Session Lifecycle Worker",
    "GIT_AUTHOR_EMAIL": "lifecycle@localhost",
    "GIT_COMMITTER_NAME": "Session Lifecycle Worker",
    "GIT_COMMITTER_EMAIL": "lifecycle@localhost",
}


# --------------------------------------------------------------------------- helpers


def validate_safe_name(value: str, what: str) -> str:
    """A repo owner or name: one safe path segment (:mod:`worker.domain.names`)."""
    return require_path_segment(value, what, REPO_NAME_MAX_LENGTH, PermanentProviderError)


# ------------------------------------------------------------------------- repo host


class LocalGitRepoHost:
    """:class:`~worker.providers.base.RepoHost` over bare repositories on local disk."""

    kind = "local"

    def __init__(
        self, root: Path, *, default_branch: str = DEFAULT_BRANCH, lock_retries: int = 10
    ) -> None:
        self._root = Path(root).expanduser().resolve()
        self._default_branch = validate_branch_name(default_branch)
        self._lock_retries = max(1, lock_retries)

    @property
    def root(self) -> Path:
        return self._root

    def repo_path(self, owner: str, name: str) -> Path:
        """Where the bare repository ``owner/name`` lives (pure)."""
        validate_safe_name(owner, "repository owner")
        validate_safe_name(name, "repository name")
        return self._root / owner / f"{name}.git"

    # -- RepoHost ------------------------------------------------------------------

    def clone_url(self, owner: str, name: str) -> str:
        return self.repo_path(owner, name).as_uri()

    def ensure_repo(self, owner: str, name: str) -> RepoInfo:
        path = self.repo_path(owner, name)
        created = False
        if not path.exists():
            created = self._create(path, name)
        elif not (path / "HEAD").is_file():
            raise PermanentProviderError(
                f"repository {owner}/{name} exists on disk but is not a git repository"
            )
        # Someone else made it (maybe by hand, empty): make sure the default branch
        # exists, as GitHub's auto_init guarantees. Create-only, so it is race-free.
        if not created and self._ref_sha(path, self._default_branch) is None:
            commit = self._initial_commit(path, name)
            self._create_ref(path, self._default_branch, commit)
        return RepoInfo(
            owner=owner,
            name=name,
            clone_url=self.clone_url(owner, name),
            default_branch=self._default_branch,
            created=created,
        )

    def ensure_branch(self, repo: RepoInfo, branch: str) -> BranchInfo:
        validate_branch_name(branch)
        path = self.repo_path(repo.owner, repo.name)
        if not (path / "HEAD").is_file():
            raise PermanentProviderError(f"repository {repo.owner}/{repo.name} does not exist")
        existing = self._ref_sha(path, branch)
        if existing is not None:
            return BranchInfo(name=branch, sha=existing, created=False)
        base = self._ref_sha(path, repo.default_branch)
        if base is None:
            raise PermanentProviderError(
                f"repository {repo.owner}/{repo.name} has no default branch "
                f"{repo.default_branch!r} to cut {branch!r} from"
            )
        sha, created = self._create_ref(path, branch, base)
        return BranchInfo(name=branch, sha=sha, created=created)

    def clone_source(self, repo_clone_url: str) -> tuple[str, dict[str, str]]:
        return repo_clone_url, {}

    # -- operator / test helpers ---------------------------------------------------

    def count_repos(self) -> int:
        """How many complete repositories the host holds (temporary builds excluded)."""
        if not self._root.is_dir():
            return 0
        return sum(
            1
            for path in self._root.glob("*/*.git")
            if not path.name.startswith(".")
            and not path.parent.name.startswith(".")
            and (path / "HEAD").is_file()
        )

    def list_branches(self, owner: str, name: str) -> list[str]:
        """Branch names of ``owner/name``, sorted."""
        path = self.repo_path(owner, name)
        if not (path / "HEAD").is_file():
            raise PermanentProviderError(f"repository {owner}/{name} does not exist")
        out = run_git(
            ["--git-dir", str(path), "for-each-ref", "--format=%(refname)", "refs/heads/"],
            action="for-each-ref",
        ).stdout
        prefix = "refs/heads/"
        return sorted(line[len(prefix) :] for line in out.splitlines() if line.startswith(prefix))

    # -- internals -----------------------------------------------------------------

    def _create(self, path: Path, name: str) -> bool:
        """Build the repository beside ``path`` and rename it in. True if we won."""
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f".{path.name}.tmp-"
        # Builds abandoned by a killed process long ago (a live build takes seconds).
        for stale in path.parent.glob(prefix + "*"):
            with contextlib.suppress(OSError):
                if time.time() - stale.stat().st_mtime > STALE_BUILD_SECONDS:
                    shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=path.parent))
        try:
            run_git(
                [
                    "init",
                    "--bare",
                    "--quiet",
                    "--template=",
                    f"--initial-branch={self._default_branch}",
                    str(tmp),
                ],
                action="init",
            )
            commit = self._initial_commit(tmp, name)
            self._create_ref(tmp, self._default_branch, commit)
            run_git(
                [
                    "--git-dir",
                    str(tmp),
                    "symbolic-ref",
                    "HEAD",
                    f"refs/heads/{self._default_branch}",
                ],
                action="symbolic-ref",
            )
            try:
                os.rename(tmp, path)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and (path / "HEAD").is_file():
                    return False  # another creator won the race: reuse theirs
                raise PermanentProviderError(
                    f"cannot create repository at {path.parent.name}/{path.name}: {exc.strerror}"
                ) from exc
            return True
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _initial_commit(self, git_dir: Path, name: str) -> str:
        """Write the README blob, its tree and the root commit; return the commit sha."""
        base = ["--git-dir", str(git_dir)]
        blob = run_git(
            [*base, "hash-object", "-w", "--stdin"], action="hash-object", stdin=f"# {name}\n"
        ).stdout.strip()
        tree = run_git(
            [*base, "mktree"], action="mktree", stdin=f"100644 blob {blob}\tREADME.md\n"
        ).stdout.strip()
        return run_git(
            [*base, "commit-tree", "--no-gpg-sign", "-m", INITIAL_COMMIT_MESSAGE, tree],
            action="commit-tree",
            extra_env=HOST_IDENTITY_ENV,
        ).stdout.strip()

    def _ref_sha(self, git_dir: Path, branch: str) -> str | None:
        result = run_git(
            [
                "--git-dir",
                str(git_dir),
                "rev-parse",
                "--verify",
                "--quiet",
                f"refs/heads/{branch}^{{commit}}",
            ],
            action="rev-parse",
            check=False,
        )
        if result.returncode == 0:
            return result.stdout.strip()
        if result.returncode == 1 and not result.stderr.strip():
            return None  # --quiet: missing ref, nothing printed
        raise classify_git_failure("rev-parse", result.stderr)

    def _create_ref(self, git_dir: Path, branch: str, sha: str) -> tuple[str, bool]:
        """Create ``refs/heads/<branch>`` at ``sha`` unless it exists (create-only).

        Returns the branch's sha and whether this call created it. Lock contention with a
        concurrent creator is retried briefly (git itself also waits up to 100 ms for a
        ref lock); then the winner's branch is reported, or a transient error if the lock
        is still held (e.g. left behind by a killed git process).
        """
        delay = 0.01
        last: ProviderError | None = None
        for _ in range(self._lock_retries):
            result = run_git(
                ["--git-dir", str(git_dir), "update-ref", f"refs/heads/{branch}", sha, ""],
                action="update-ref",
                check=False,
            )
            if result.returncode == 0:
                return sha, True
            existing = self._ref_sha(git_dir, branch)
            if existing is not None:
                return existing, False
            last = classify_git_failure("update-ref", result.stderr)
            if isinstance(last, PermanentProviderError):
                raise last
            time.sleep(delay)
            delay = min(delay * 2, 0.2)
        assert last is not None
        raise last
