"""The ``bwrap`` sandbox provider: the local provider's trees, with confined commands.

The working trees are laid out exactly as :class:`LocalSandboxProvider` lays them out
(clone or restore into a temporary directory, rename into place); what this provider
adds is that commands run in them under bubblewrap (:mod:`worker.providers.bwrap`), and
that all of a sandbox's processes end before it is snapshotted for good or removed.

When the worker runs as root each sandbox gets a host uid (and gid) of its own, from
``uid_base`` up, claimed in a registry **shared by the whole machine**
(``uid_registry``, default ``/var/lib/lifecycle/sandbox-uids``: one file per uid naming
the sandboxes root and the sandbox, claimed under a lock), and recorded in
``<root>/.meta/<name>.uid``; its tree is owned by that uid. One registry per machine, not
per data directory: two worker hosts (or a test run and ``lifecycle up``) on one machine
must never hand the same uid to two sandboxes, or one's ``kill(-1)`` would end the
other's processes. A claim whose sandbox record is gone is stale and taken over. Then the
process limit counts that sandbox's processes only, ``kill(-1)`` as that uid ends all of
them, and no sandbox can touch another's files even if one were somehow in view. The uid
is released when the sandbox stops. Without root, commands run as the worker's user in a
user namespace of their own (see the runtime's notes on the process limit).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from worker.providers.base import PermanentProviderError, SandboxInfo
from worker.providers.bwrap import (
    BwrapRuntime,
    CommandLimits,
    CommandResult,
    CommandSpec,
    SandboxUser,
)
from worker.providers.local_sandbox import LocalSandboxProvider
from worker.providers.safe_tree import chown_tree

__all__ = ["BwrapSandboxProvider"]

#: Where sandbox uids are claimed, for every worker and data directory of the machine.
DEFAULT_UID_REGISTRY = Path("/var/lib/lifecycle/sandbox-uids")
_RUNS_DIR = ".run"


class BwrapSandboxProvider(LocalSandboxProvider):
    """:class:`~worker.providers.base.SandboxProvider` whose commands run confined."""

    kind = "bwrap"

    def __init__(
        self,
        root: Path,
        *,
        limits: CommandLimits | None = None,
        network: bool = False,
        uid_base: int = 2_000_000,
        uid_count: int = 1_000_000,
        own_uids: bool | None = None,
        uid_registry: Path | None = None,
        bwrap: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(root, **kwargs)
        self.limits = limits or CommandLimits()
        self.runtime = BwrapRuntime(self.root / _RUNS_DIR, bwrap=bwrap, network=network)
        self._uid_base = uid_base
        self._uid_count = uid_count
        self._own_uids = os.geteuid() == 0 if own_uids is None else own_uids
        self._uid_registry = uid_registry or DEFAULT_UID_REGISTRY
        self._reachable = False

    # ----------------------------------------------------------------- commands
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
        """Run ``spec`` confined in sandbox ``name`` and wait for its end or a limit."""
        workdir = self.workdir(name)
        if not self.exists(name):
            raise PermanentProviderError(f"sandbox {name} is not on this host")
        user = self.user_for(name)
        if user is not None:
            self._ensure_reachable(workdir)
        return self.runtime.run(
            name,
            workdir,
            spec,
            limits or self.limits,
            user=user,
            network=network,
            on_output=on_output,
            should_stop=should_stop,
        )

    def stop_processes(self, name: str) -> int:
        """End every process of sandbox ``name`` (before a final snapshot or removal)."""
        return self.runtime.kill_all(name, self._recorded_user(name))

    def stop(self, name: str) -> None:
        self.stop_processes(name)
        super().stop(name)
        self._release_user(name)

    def state(self, name: str) -> dict[str, Any]:
        return {**super().state(name), "confined": True}

    def _ensure_reachable(self, workdir: Path) -> None:
        """``bwrap`` runs as the sandbox's uid and resolves the tree's path itself, so
        every directory above the tree must be searchable by others (``o+x``; listing is
        not needed). The sandboxes directory is made so; anything above is named."""
        if self._reachable:
            return
        for parent in workdir.parents:
            mode = os.stat(parent).st_mode
            if mode & stat.S_IXOTH:
                continue
            if parent == self.root:
                os.chmod(parent, stat.S_IMODE(mode) | stat.S_IXOTH)
                continue
            raise PermanentProviderError(
                f"sandbox uids cannot reach {workdir.parent}: run `chmod o+x {parent}` "
                "(search only) or choose a data directory under a searchable path"
            )
        self._reachable = True

    # ----------------------------------------------------------------- identity
    def user_for(self, name: str) -> SandboxUser | None:
        """The host identity sandbox ``name`` runs as (allocated on first use, its tree
        handed to it); ``None`` when the worker is not root."""
        if not self._own_uids:
            return None
        user = self._recorded_user(name) or self._allocate_user(name)
        workdir = self.workdir(name)
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(workdir)
            if (st.st_uid, st.st_gid) != (user.uid, user.gid):
                chown_tree(workdir, user.uid, user.gid)
        return user

    def _commit(self, name: str, tmp: Path) -> SandboxInfo:
        # Hand the finished tree to the sandbox's uid before it appears.
        if self._own_uids:
            user = self._recorded_user(name) or self._allocate_user(name)
            chown_tree(tmp, user.uid, user.gid)
        return super()._commit(name, tmp)

    def _uid_record(self, name: str) -> Path:
        return self.root / ".meta" / f"{name}.uid"

    def _recorded_user(self, name: str) -> SandboxUser | None:
        try:
            uid = int(self._uid_record(name).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        return SandboxUser(uid, uid)

    def _owner(self, name: str) -> str:
        """What a registry entry holds: this provider's root and the sandbox's name."""
        return f"{self.root}\n{name}"

    @contextlib.contextmanager
    def _registry(self) -> Iterator[Path]:
        """The machine's uid registry, locked against every other claimant."""
        folder = self._uid_registry
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield folder
        finally:
            os.close(fd)  # releases the lock

    @staticmethod
    def _stale(entry: str, uid: int) -> bool:
        """An entry whose sandbox no longer records that uid (stopped without releasing,
        or its data directory deleted) holds nothing."""
        root, _, name = entry.partition("\n")
        try:
            recorded = (Path(root) / ".meta" / f"{name}.uid").read_text(encoding="ascii")
        except OSError:
            return True
        return recorded.strip() != str(uid)

    def _allocate_user(self, name: str) -> SandboxUser:
        """Claim the first free uid from a start derived from the name, in the machine's
        registry under its lock (the same sandbox probing again finds its own claim)."""
        owner = self._owner(name)
        start = zlib.crc32(name.encode()) % self._uid_count
        with self._registry() as folder:
            for step in range(self._uid_count):
                uid = self._uid_base + (start + step) % self._uid_count
                path = folder / str(uid)
                try:
                    entry: str | None = path.read_text(encoding="utf-8")
                except FileNotFoundError:
                    entry = None
                if entry is not None and entry != owner and not self._stale(entry, uid):
                    continue
                if entry != owner:
                    tmp = folder / f".{uid}.{os.getpid()}.tmp"
                    tmp.write_text(owner, encoding="utf-8")
                    os.replace(tmp, path)
                break
            else:
                raise PermanentProviderError("no free sandbox uid left on this host")
            record = self._uid_record(name)
            record.parent.mkdir(parents=True, exist_ok=True)
            tmp = record.with_name(f".{name}.uid.{os.getpid()}.tmp")
            tmp.write_text(str(uid), encoding="ascii")
            os.replace(tmp, record)
        return SandboxUser(uid, uid)

    def _release_user(self, name: str) -> None:
        user = self._recorded_user(name)
        self._uid_record(name).unlink(missing_ok=True)
        if user is None:
            return
        with self._registry() as folder, contextlib.suppress(OSError):
            path = folder / str(user.uid)
            if path.read_text(encoding="utf-8") == self._owner(name):
                path.unlink()
