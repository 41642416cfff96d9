"""What the bubblewrap tests share: making pytest's private temporary directories passable
for sandbox uids, and listing the live processes of a sandbox uid."""

from __future__ import annotations

from pathlib import Path


def searchable(path: Path) -> None:
    """pytest's temporary directories are 0700; sandbox uids must be able to pass them
    (as they must pass every directory above a real data directory)."""
    for parent in (path, *path.parents):
        parent.chmod(parent.stat().st_mode | 0o001)


def uid_processes(uid: int) -> list[int]:
    """Live processes of host uid ``uid`` (zombies are dead already: they wait for the
    host's init to reap them, holding nothing)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            owner = entry.stat().st_uid
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if owner == uid and state not in ("Z", "X"):
            pids.append(int(entry.name))
    return pids
