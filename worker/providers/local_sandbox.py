"""Local sandbox provider: one working directory per sandbox, holding a git checkout.

Layout under ``root``::

    <name>/                   a complete sandbox (only ever appears by an atomic rename)
    .tmp+<name>+XXXX/         a sandbox being built (clone or snapshot restore)
    .trash+<name>+XXXX/       a sandbox being removed
    .meta/<name>.json         when the sandbox was started

A sandbox is built in a temporary directory beside its final place and renamed in, so a
crash never leaves a half sandbox that counts as complete, and of two concurrent starters
exactly one wins; the other reuses the winner's sandbox. Sandbox names never contain
``+``, so the temporary names of one sandbox never match another's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from worker.domain.names import SANDBOX_NAME_MAX_LENGTH, require_path_segment
from worker.providers.base import (
    PermanentProviderError,
    SandboxInfo,
    SnapshotStore,
)
from worker.providers.git import (
    git_config_text,
    run_git,
    strip_url_credentials,
    subprocess_env,
    validate_branch_name,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from worker.providers.bwrap import CommandLimits, CommandResult, CommandSpec

__all__ = ["LocalSandboxProvider", "validate_sandbox_name"]

DEFAULT_GIT_USER_NAME = "Sandbox Agent"
DEFAULT_GIT_USER_EMAIL = "agent@sandbox.local"

_TMP_PREFIX = ".tmp+"
_TRASH_PREFIX = ".trash+"
_META_DIR = ".meta"


def validate_sandbox_name(name: str) -> str:
    """A sandbox name: one safe path segment (:mod:`worker.domain.names`)."""
    return require_path_segment(
        name, "sandbox name", SANDBOX_NAME_MAX_LENGTH, PermanentProviderError
    )


def _make_user_writable(path: Path) -> None:
    """Give the owner rwx on every directory below ``path`` (agents may chmod them)."""
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
    for dirpath, dirnames, _files in os.walk(path):
        for dirname in dirnames:
            child = os.path.join(dirpath, dirname)
            with contextlib.suppress(OSError):
                st = os.lstat(child)
                if stat.S_ISDIR(st.st_mode):
                    os.chmod(child, stat.S_IMODE(st.st_mode) | stat.S_IRWXU)


def _rmtree(path: Path) -> None:
    """Remove ``path`` (file, link or tree), even with read-only directories inside, or
    nested deeper than Python's recursion limit (an agent's ``mkdir -p a/a/a/…``: then
    ``rm -rf``, the system's, which walks any depth by descriptors)."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        return
    except (OSError, RecursionError):
        with contextlib.suppress(RecursionError):
            _make_user_writable(path)
        with contextlib.suppress(RecursionError):
            shutil.rmtree(path, ignore_errors=True)
        if os.path.lexists(path):
            subprocess.run(
                ["rm", "-rf", "--one-file-system", "--", str(path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=subprocess_env(),
                check=False,
            )


class LocalSandboxProvider:
    """:class:`~worker.providers.base.SandboxProvider` over local directories."""

    kind = "local"

    def __init__(
        self,
        root: Path,
        *,
        git_user_name: str = DEFAULT_GIT_USER_NAME,
        git_user_email: str = DEFAULT_GIT_USER_EMAIL,
        clone_timeout: float = 1800.0,
    ) -> None:
        self._root = Path(root).expanduser().resolve()
        self._git_user_name = git_user_name
        self._git_user_email = git_user_email
        self._clone_timeout = clone_timeout

    @property
    def root(self) -> Path:
        return self._root

    # -- SandboxProvider -----------------------------------------------------------

    def start_from_clone(
        self,
        name: str,
        clone_url: str,
        branch: str,
        env: dict[str, str] | None = None,
        *,
        base_branch: str = "main",
    ) -> SandboxInfo:
        target = self.workdir(name)
        validate_branch_name(branch)
        validate_branch_name(base_branch)
        if target.is_dir():
            return self._reused(name)
        plain_url = strip_url_credentials(clone_url)
        secrets = [clone_url] if plain_url != clone_url else []
        tmp = self._make_tmp(name)
        try:
            # Only the session's own branch and the base it is diffed against: no other
            # session's branch, no tags. Credentials travel only in the environment
            # (``env``); the identity goes into the new repository's own config so agents
            # can commit.
            refspecs = [f"+refs/heads/{branch}:refs/remotes/origin/{branch}"]
            if base_branch != branch:
                refspecs.append(f"+refs/heads/{base_branch}:refs/remotes/origin/{base_branch}")
            # What `git init --template= --initial-branch=<branch>` makes, and the
            # settings, written here instead of by a process each (`git init` alone was
            # an eighth of a small workspace's start, eight `git config` a third).
            dot_git = tmp / ".git"
            for sub in ("objects/info", "objects/pack", "refs/heads", "refs/tags"):
                (dot_git / sub).mkdir(parents=True)
            (dot_git / "HEAD").write_text(f"ref: refs/heads/{branch}\n", encoding="utf-8")
            with open(dot_git / "config", "x", encoding="utf-8") as config:
                config.write(
                    git_config_text(
                        {
                            ("core", None): [
                                ("repositoryformatversion", "0"),
                                ("filemode", "true"),
                                ("bare", "false"),
                                ("logallrefupdates", "true"),
                            ],
                            ("user", None): [
                                ("name", self._git_user_name),
                                ("email", self._git_user_email),
                            ],
                            ("remote", "origin"): [
                                ("url", plain_url),
                                ("tagOpt", "--no-tags"),
                                *(("fetch", spec) for spec in refspecs),
                            ],
                            ("branch", branch): [
                                ("remote", "origin"),
                                ("merge", f"refs/heads/{branch}"),
                            ],
                        }
                    )
                )
            run_git(
                [
                    "-C",
                    str(tmp),
                    # Keep the fetched pack as it came instead of exploding a small one
                    # into a loose object file each (what git does below 100 objects).
                    "-c",
                    "fetch.unpackLimit=1",
                    "fetch",
                    "--quiet",
                    "--no-tags",
                    "--",
                    clone_url,
                    *refspecs,
                ],
                action=f"clone of branch {branch!r}",
                extra_env=env,
                secrets=secrets,
                timeout=self._clone_timeout,
            )
            run_git(
                [
                    "-C",
                    str(tmp),
                    "checkout",
                    "--quiet",
                    "-B",
                    branch,
                    f"refs/remotes/origin/{branch}",
                ],
                action=f"checkout of branch {branch!r}",
            )
            return self._commit(name, tmp)
        finally:
            _rmtree(tmp)

    def start_from_snapshot(
        self, name: str, store: SnapshotStore, snapshot_url: str
    ) -> SandboxInfo:
        target = self.workdir(name)
        if target.is_dir():
            return self._reused(name)
        tmp = self._make_tmp(name)
        try:
            store.restore(snapshot_url, tmp)
            return self._commit(name, tmp)
        finally:
            _rmtree(tmp)

    def exists(self, name: str) -> bool:
        return self.workdir(name).is_dir()

    def workdir(self, name: str) -> Path:
        return self._root / validate_sandbox_name(name)

    def stop(self, name: str) -> None:
        target = self.workdir(name)
        if target.exists() or target.is_symlink():
            self._root.mkdir(parents=True, exist_ok=True)
            trash = Path(tempfile.mkdtemp(prefix=f"{_TRASH_PREFIX}{name}+", dir=self._root))
            # Rename first: the sandbox stops counting as present at once, even if the
            # removal below is interrupted. (Missing: a concurrent stop got there first.)
            with contextlib.suppress(FileNotFoundError):
                os.rename(target, trash / "sandbox")
        self._meta_path(name).unlink(missing_ok=True)
        if self._root.is_dir():
            for prefix in (_TMP_PREFIX, _TRASH_PREFIX):
                for leftover in self._root.glob(f"{prefix}{name}+*"):
                    _rmtree(leftover)

    def state(self, name: str) -> dict[str, Any]:
        return {"workdir": str(self.workdir(name))}

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
        """A plain directory confines nothing, so it runs nothing."""
        del spec, limits, network, on_output, should_stop
        raise PermanentProviderError(
            f"sandbox {name} uses the plain directory provider, which cannot confine "
            "commands; install bubblewrap on the worker host (apt-get install -y "
            "bubblewrap) and set LIFECYCLE_SANDBOX_PROVIDER=bwrap"
        )

    def stop_processes(self, name: str) -> int:
        """No command ever runs in a plain directory sandbox."""
        del name
        return 0

    # -- internals -----------------------------------------------------------------

    def _make_tmp(self, name: str) -> Path:
        self._root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}+", dir=self._root))

    def _commit(self, name: str, tmp: Path) -> SandboxInfo:
        """Rename the finished ``tmp`` into place; reuse the winner if we lost a race."""
        target = self._root / name
        started_at = datetime.now(UTC)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and target.is_dir():
                return self._reused(name)
            raise PermanentProviderError(f"cannot place sandbox {name}: {exc.strerror}") from exc
        self._write_meta(name, started_at)
        return SandboxInfo(name=name, workdir=target, started_at=started_at, reused=False)

    def _reused(self, name: str) -> SandboxInfo:
        target = self._root / name
        return SandboxInfo(
            name=name, workdir=target, started_at=self._started_at(name), reused=True
        )

    def _meta_path(self, name: str) -> Path:
        return self._root / _META_DIR / f"{name}.json"

    def _write_meta(self, name: str, started_at: datetime) -> None:
        meta = self._meta_path(name)
        meta.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=meta.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"started_at": started_at.isoformat()}, fh)
            os.replace(tmp, meta)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _started_at(self, name: str) -> datetime:
        try:
            data = json.loads(self._meta_path(name).read_text(encoding="utf-8"))
            value = datetime.fromisoformat(str(data["started_at"]))
            if value.tzinfo is not None:
                return value
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # No (readable) record, e.g. a crash between rename and record: the directory's
        # own time is the best estimate.
        try:
            return datetime.fromtimestamp((self._root / name).stat().st_mtime, UTC)
        except OSError:
            return datetime.now(UTC)
