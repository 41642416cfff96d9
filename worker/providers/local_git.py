"""Local repo host: bare git repositories under a directory, served by ``file://`` URLs.

Layout: ``<root>/<owner>/<name>.git``. A repository is built in a temporary directory
beside its final place and renamed into place, so a crash never leaves a half-made
repository at the final path and concurrent creators (threads or processes) end with
exactly one repository: the first rename wins, every other creator finds the winner's
repository and reuses it.

This module also holds the small ``git`` runner shared by the local providers.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from worker.providers.base import (
    BranchInfo,
    PermanentProviderError,
    ProviderError,
    RepoInfo,
    TransientProviderError,
)

__all__ = [
    "GitResult",
    "LocalGitRepoHost",
    "git_env",
    "redact",
    "run_git",
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

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

# Inherited variables that would point git at another repository or inject config.
_SCRUBBED_ENV = {
    "GIT_DIR",
    "GIT_WORK_TREE",
    "GIT_INDEX_FILE",
    "GIT_OBJECT_DIRECTORY",
    "GIT_ALTERNATE_OBJECT_DIRECTORIES",
    "GIT_COMMON_DIR",
    "GIT_NAMESPACE",
    "GIT_PREFIX",
    "GIT_CONFIG_PARAMETERS",
    "GIT_CONFIG_COUNT",
}
_SCRUBBED_ENV_PREFIXES = ("GIT_CONFIG_KEY_", "GIT_CONFIG_VALUE_")

# stderr fragments meaning "try again later" (lock contention, network trouble).
_TRANSIENT_MARKERS = (
    ".lock': file exists",
    "another git process seems to be running",
    "could not resolve host",
    "connection timed out",
    "operation timed out",
    "connection reset",
    "connection refused",
    "early eof",
    "rpc failed",
    "remote end hung up unexpectedly",
    "the requested url returned error: 5",
    "the requested url returned error: 429",
    "temporary failure",
    "resource temporarily unavailable",
    "gnutls_handshake",
    "ssl_read",
)

_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_AUTH_HEADER = re.compile(r"(?i)(authorization:)[^\r\n]*")


# --------------------------------------------------------------------------- helpers


def validate_safe_name(value: str, what: str) -> str:
    """A repo owner or name: one path segment of letters, digits, ``.``, ``_``, ``-``."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise PermanentProviderError(
            f"invalid {what} {value!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return value


def validate_branch_name(branch: str) -> str:
    """A branch name acceptable to ``git check-ref-format`` (and not an option)."""
    if (
        not isinstance(branch, str)
        or not branch
        or len(branch) > 200
        or branch.startswith("-")
        or branch == "HEAD"
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in branch)
    ):
        raise PermanentProviderError(f"invalid branch name {branch!r}")
    result = run_git(
        ["check-ref-format", f"refs/heads/{branch}"], action="check-ref-format", check=False
    )
    if result.returncode != 0:
        raise PermanentProviderError(f"invalid branch name {branch!r}")
    return branch


def strip_url_credentials(url: str) -> str:
    """``url`` without any ``user:password@`` part (safe to store and show)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove URL passwords, authorization headers and the given secret values."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _AUTH_HEADER.sub(r"\1 ***", text)


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a git subprocess: inherited, scrubbed, non-interactive."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in _SCRUBBED_ENV and not key.startswith(_SCRUBBED_ENV_PREFIXES)
    }
    env["GIT_TERMINAL_PROMPT"] = "0"
    env["GCM_INTERACTIVE"] = "never"
    env["LC_ALL"] = "C"
    if extra:
        env.update(extra)
    return env


@dataclass(frozen=True)
class GitResult:
    """What a git command printed and returned."""

    returncode: int
    stdout: str
    stderr: str


def classify_git_failure(action: str, stderr: str, secrets: Iterable[str] = ()) -> ProviderError:
    """Turn a failed git command into a transient or permanent provider error."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    detail = redact(" / ".join(lines[-3:]), secrets)[:500] or "no error output"
    message = f"git {action} failed: {detail}"
    lowered = stderr.lower()
    if any(marker in lowered for marker in _TRANSIENT_MARKERS):
        return TransientProviderError(message)
    return PermanentProviderError(message)


def run_git(
    args: Sequence[str],
    *,
    action: str,
    cwd: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 600.0,
    check: bool = True,
    secrets: Iterable[str] = (),
) -> GitResult:
    """Run ``git <args>``; with ``check`` a failure raises a provider error.

    ``secrets`` (and every value in ``extra_env``) are redacted from error messages.
    """
    hidden = [*secrets, *(extra_env or {}).values()]
    try:
        proc = subprocess.run(
            ["git", *args],
            cwd=cwd,
            env=git_env(extra_env),
            input=stdin,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        raise PermanentProviderError("git is not installed (no 'git' on PATH)") from exc
    except subprocess.TimeoutExpired as exc:
        raise TransientProviderError(f"git {action} timed out after {timeout:g}s") from exc
    result = GitResult(proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise classify_git_failure(action, proc.stderr, hidden)
    return result


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
