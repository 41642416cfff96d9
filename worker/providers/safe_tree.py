"""Walks over a sandbox's working tree that never leave it.

The tree is hostile and may change while it is walked: an agent can swap a directory for
a symbolic link to ``/`` between the moment the worker lists its parent and the moment it
opens it. So every walk here goes from directory descriptor to directory descriptor
(``openat`` with ``O_NOFOLLOW | O_DIRECTORY``): a component that is a link at the moment
it is opened fails to open and is skipped, whatever it pointed to a moment before. Paths
are never re-resolved from the root.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["chown_tree", "disk_usage", "open_root", "walk_fds"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_root(root: Path) -> int:
    """A descriptor of the directory ``root`` itself; refuses a link (``OSError``)."""
    return os.open(root, _DIR_FLAGS)


def walk_fds(
    root_fd: int, visit: Callable[[int, os.DirEntry[str], os.stat_result], None]
) -> Iterator[None]:
    """Call ``visit(dir_fd, entry, lstat)`` for every entry below ``root_fd`` (depth
    first), descending only into real directories opened relative to their parent.

    A generator so a caller can stop between entries (yields once per directory);
    entries that vanish or change type underneath are skipped."""
    stack = [os.dup(root_fd)]
    try:
        while stack:
            fd = stack.pop()
            try:
                with os.scandir(fd) as entries:
                    for entry in entries:
                        try:
                            st = entry.stat(follow_symlinks=False)
                        except OSError:
                            continue
                        visit(fd, entry, st)
                        if stat.S_ISDIR(st.st_mode):
                            with contextlib.suppress(OSError):
                                stack.append(os.open(entry.name, _DIR_FLAGS, dir_fd=fd))
            except OSError:
                pass
            finally:
                os.close(fd)
            yield
    finally:
        for fd in stack:
            os.close(fd)


def disk_usage(root: Path, *, stop_above: int | None = None) -> int:
    """Bytes the tree under ``root`` takes on disk (allocated blocks, each hard-linked
    inode once, links counted as themselves and never followed). Stops counting once
    above ``stop_above``. A missing or linked ``root`` counts 0."""
    try:
        root_fd = open_root(root)
    except OSError:
        return 0
    seen: set[tuple[int, int]] = set()
    total = os.fstat(root_fd).st_blocks * 512

    def visit(_fd: int, _entry: os.DirEntry[str], st: os.stat_result) -> None:
        nonlocal total
        if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen:
                return
            seen.add(key)
        total += st.st_blocks * 512

    try:
        for _ in walk_fds(root_fd, visit):
            if stop_above is not None and total > stop_above:
                break
    finally:
        os.close(root_fd)
    return total


def chown_tree(root: Path, uid: int, gid: int) -> None:
    """Give ``root`` and everything below it (links themselves, never their targets) to
    ``uid``:``gid``."""
    root_fd = open_root(root)
    try:
        os.fchown(root_fd, uid, gid)

        def visit(fd: int, entry: os.DirEntry[str], st: os.stat_result) -> None:
            if st.st_uid != uid or st.st_gid != gid:
                with contextlib.suppress(OSError):
                    os.chown(entry.name, uid, gid, dir_fd=fd, follow_symlinks=False)

        for _ in walk_fds(root_fd, visit):
            pass
    finally:
        os.close(root_fd)
