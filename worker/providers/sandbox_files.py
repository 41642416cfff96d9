"""Files of a sandbox's working tree, read and written by the worker for the API.

The tree is hostile and changes underneath: any file may be a symbolic link (to
``/etc/shadow``, the data directory, another sandbox), and an agent can swap a directory
for a link between two calls or in the middle of one. So no path is ever resolved by the
kernel from the tree's root: each operation splits its path (:func:`split_path`: relative,
no ``..``, no NUL, bounded) and walks it one component at a time, each opened relative to
its parent's descriptor with ``O_NOFOLLOW`` (the :mod:`~worker.providers.safe_tree`
discipline). A component that is a link at the moment it is opened fails to open — the
operation stops with :class:`TreeError` (``kind="link"``), whatever the link points to.

* **list** reports each entry's own type (``file``, ``dir``, ``link``, ``other``), size,
  mode and mtime, and a link's target as text; nothing is followed.
* **read** opens the file itself with ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO cannot block
  the worker) and refuses anything but a regular file, and anything above the limit.
* **write** creates missing parent directories one by one (each re-opened with
  ``O_NOFOLLOW`` after ``mkdir``), writes a temporary file created exclusively in the
  target's own directory, and renames it over the target: the target's existing inode is
  never written (a hard link elsewhere keeps its content), and a target that is a link is
  refused (renaming would replace the link, never write through it).
* **delete** unlinks a file or a link itself, removes an empty directory, or with
  ``recursive`` a whole tree walked descriptor by descriptor, never descending through a
  link.

When the sandbox has a host uid of its own (the worker runs as root), what is created
is given to that uid. A directory descriptor, once open, stays on that directory even if
it is renamed; an agent cannot move it out of the tree (its sandbox sees nothing else).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from worker.providers.base import PermanentProviderError
from worker.providers.safe_tree import disk_usage, open_root

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "Owner",
    "TreeError",
    "delete",
    "list_dir",
    "read_file",
    "split_path",
    "write_file",
]

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
# Deeper trees are refused by a recursive delete (each level holds a descriptor).
MAX_DELETE_DEPTH = 256

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class TreeError(PermanentProviderError):
    """A file operation refused. ``kind``: ``invalid`` (the path), ``not_found``,
    ``link`` (a component is a symbolic link), ``not_dir``, ``is_dir``,
    ``not_regular``, ``not_empty``, ``too_large``, ``too_deep``."""

    def __init__(self, kind: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.kind = kind
        self.extra = extra


@dataclass(frozen=True)
class Owner:
    """The host uid/gid new files and directories are given (worker running as root)."""

    uid: int
    gid: int


def split_path(path: str | None) -> tuple[str, ...]:
    """The components of ``path``, relative to the tree's root (``""`` or ``"."``: the
    root itself). Refuses absolute paths, ``..``, NUL, invalid text and overlong paths or
    names (``TreeError`` ``invalid``). Empty and ``.`` components are dropped."""
    if path is None or path in ("", "."):
        return ()
    if "\x00" in path:
        raise TreeError("invalid", "path must not contain NUL")
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise TreeError("invalid", "path must be valid UTF-8 text") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise TreeError("invalid", f"path must be at most {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise TreeError("invalid", "path must be relative to the working tree (/workspace)")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise TreeError("invalid", "path must not contain '..'")
    for part in parts:
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise TreeError("invalid", f"each name in path must be at most {MAX_NAME_BYTES} bytes")
    return parts


def _text(name: str) -> str:
    """A name or link target as valid text (undecodable bytes become U+FFFD)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _shown(parts: tuple[str, ...], upto: int | None = None) -> str:
    return "/".join(parts[:upto]) or "."


def _lstat(name: str, dir_fd: int) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _link_error(parts: tuple[str, ...], upto: int, dir_fd: int) -> TreeError:
    target = None
    with contextlib.suppress(OSError):
        target = _text(os.readlink(parts[upto - 1], dir_fd=dir_fd))
    return TreeError(
        "link",
        f"{_shown(parts, upto)} is a symbolic link; links are not followed",
        path=_shown(parts, upto),
        target=target,
    )


def _open_dir(
    parent: int, parts: tuple[str, ...], upto: int, *, create: Owner | bool = False
) -> int:
    """Open directory ``parts[upto - 1]`` relative to ``parent``, never through a link;
    with ``create``, make it first when missing (given to the ``Owner``, if one)."""
    name = parts[upto - 1]
    for attempt in range(2):
        try:
            return os.open(name, _DIR, dir_fd=parent)
        except FileNotFoundError:
            if create is False or attempt:
                raise TreeError(
                    "not_found", f"{_shown(parts, upto)} does not exist", path=_shown(parts, upto)
                ) from None
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o755, dir_fd=parent)
                if isinstance(create, Owner):
                    os.chown(name, create.uid, create.gid, dir_fd=parent, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = _lstat(name, parent)
            if st is not None and stat.S_ISLNK(st.st_mode):
                raise _link_error(parts, upto, parent) from None
            raise TreeError(
                "not_dir", f"{_shown(parts, upto)} is not a directory", path=_shown(parts, upto)
            ) from None
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _walk(root: Path, parts: tuple[str, ...], *, create: Owner | bool = False) -> Iterator[int]:
    """A descriptor of the directory ``parts`` names below ``root`` (every component
    opened relative to the previous one, ``O_NOFOLLOW``)."""
    try:
        fd = open_root(root)
    except OSError as exc:
        raise TreeError("not_found", f"the working tree is not there: {exc.strerror}") from None
    try:
        for upto in range(1, len(parts) + 1):
            child = _open_dir(fd, parts, upto, create=create)
            os.close(fd)
            fd = child
        yield fd
    finally:
        os.close(fd)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "link"
    return "other"


def _mtime(st: os.stat_result) -> str:
    return datetime.fromtimestamp(st.st_mtime, UTC).isoformat()


def list_dir(root: Path, parts: tuple[str, ...], *, max_entries: int) -> dict[str, Any]:
    """The entries of directory ``parts`` (sorted by name, at most ``max_entries``)."""
    entries: list[dict[str, Any]] = []
    total = 0
    with _walk(root, parts) as fd, os.scandir(fd) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile
            total += 1
            item: dict[str, Any] = {
                "name": _text(entry.name),
                "type": _kind(st.st_mode),
                "size": st.st_size,
                "mode": f"{stat.S_IMODE(st.st_mode):04o}",
                "mtime": _mtime(st),
            }
            if stat.S_ISLNK(st.st_mode):
                try:
                    item["target"] = _text(os.readlink(entry.name, dir_fd=fd))
                except OSError:
                    item["target"] = None
            entries.append(item)
    entries.sort(key=lambda e: e["name"])
    return {
        "path": _shown(parts),
        "entries": entries[:max_entries],
        "truncated": total > max_entries,
    }


def read_file(root: Path, parts: tuple[str, ...], *, max_bytes: int) -> bytes:
    """The content of regular file ``parts`` (``too_large`` above ``max_bytes``)."""
    if not parts:
        raise TreeError("is_dir", ". is a directory: list it instead", path=".")
    with _walk(root, parts[:-1]) as parent:
        try:
            fd = os.open(parts[-1], _READ, dir_fd=parent)
        except FileNotFoundError:
            raise TreeError(
                "not_found", f"{_shown(parts)} does not exist", path=_shown(parts)
            ) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_error(parts, len(parts), parent) from None
            raise
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise TreeError("is_dir", f"{_shown(parts)} is a directory", path=_shown(parts))
        if not stat.S_ISREG(st.st_mode):
            raise TreeError(
                "not_regular", f"{_shown(parts)} is not a regular file", path=_shown(parts)
            )
        if st.st_size > max_bytes:
            raise _too_large(parts, st.st_size, max_bytes)
        os.set_blocking(fd, True)
        chunks: list[bytes] = []
        size = 0
        while size <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > max_bytes:  # it grew while being read
            raise _too_large(parts, size, max_bytes)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _too_large(parts: tuple[str, ...], size: int, limit: int) -> TreeError:
    return TreeError(
        "too_large",
        f"{_shown(parts)} is {size} bytes, over the limit of {limit}",
        path=_shown(parts),
        size=size,
        limit=limit,
    )


def write_file(
    root: Path,
    parts: tuple[str, ...],
    data: bytes,
    *,
    owner: Owner | None = None,
    disk_limit: int | None = None,
) -> dict[str, Any]:
    """Replace (or create) regular file ``parts`` with ``data`` atomically, making
    missing parent directories. Keeps an existing file's permission bits."""
    if not parts:
        raise TreeError("is_dir", ". is the working tree itself, not a file", path=".")
    name = parts[-1]
    with _walk(root, parts[:-1], create=owner or True) as parent:
        st = _lstat(name, parent)
        if st is not None:
            if stat.S_ISLNK(st.st_mode):
                raise _link_error(parts, len(parts), parent)
            if stat.S_ISDIR(st.st_mode):
                raise TreeError("is_dir", f"{_shown(parts)} is a directory", path=_shown(parts))
            if not stat.S_ISREG(st.st_mode):
                raise TreeError(
                    "not_regular", f"{_shown(parts)} is not a regular file", path=_shown(parts)
                )
        if disk_limit is not None:
            used = disk_usage(root, stop_above=disk_limit)
            if used + len(data) > disk_limit:
                raise TreeError(
                    "too_large",
                    f"the working tree would exceed its disk limit of {disk_limit} bytes",
                    path=_shown(parts),
                    size=len(data),
                    limit=disk_limit,
                )
        mode = stat.S_IMODE(st.st_mode) if st is not None else 0o644
        tmp = f".lifecycle-put-{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, _CREATE, 0o600, dir_fd=parent)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fchmod(fd, mode)
                if owner is not None:
                    os.fchown(fd, owner.uid, owner.gid)
                os.fsync(fd)
            finally:
                os.close(fd)
            # Replaces the entry (a file, or a link swapped in meanwhile: never followed).
            os.rename(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=parent)
            if isinstance(exc, IsADirectoryError):
                raise TreeError(
                    "is_dir", f"{_shown(parts)} is a directory", path=_shown(parts)
                ) from None
            raise
    return {"path": _shown(parts), "size": len(data), "created": st is None}


def delete(root: Path, parts: tuple[str, ...], *, recursive: bool = False) -> dict[str, Any]:
    """Remove file or link ``parts`` (a link itself, never its target), an empty
    directory, or with ``recursive`` a directory and everything below it."""
    if not parts:
        raise TreeError("invalid", "the working tree itself cannot be deleted", path=".")
    name = parts[-1]
    with _walk(root, parts[:-1]) as parent:
        st = _lstat(name, parent)
        if st is None:
            raise TreeError("not_found", f"{_shown(parts)} does not exist", path=_shown(parts))
        kind = _kind(st.st_mode)
        if kind != "dir":
            _unlink(name, parent)
        elif recursive:
            _remove_tree(parent, name, parts)
        else:
            try:
                os.rmdir(name, dir_fd=parent)
            except OSError as exc:
                if exc.errno == errno.ENOTEMPTY:
                    raise TreeError(
                        "not_empty",
                        f"{_shown(parts)} is not empty: delete it with recursive=true",
                        path=_shown(parts),
                    ) from None
                if exc.errno == errno.ENOTDIR:  # swapped for a link or a file meanwhile
                    _unlink(name, parent)
                else:
                    raise
    return {"path": _shown(parts), "type": kind}


def _unlink(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def _remove_tree(parent: int, name: str, parts: tuple[str, ...]) -> None:
    """Remove directory ``name`` below ``parent`` and its contents, depth first, one
    descriptor per level, never descending through a link (a directory swapped for one
    is unlinked as the link it has become)."""
    top = _open_subdir(name, parent)
    if top is None:
        return
    # Each frame: the directory's descriptor, its name in its parent, the parent's
    # descriptor, and the names of its subdirectories still to remove.
    stack: list[tuple[int, str, int, list[str]]] = [(top, name, parent, _clear_files(top))]
    try:
        while stack:
            fd, own_name, parent_fd, pending = stack[-1]
            if pending:
                sub = pending.pop()
                child = _open_subdir(sub, fd)
                if child is None:
                    continue
                if len(stack) >= MAX_DELETE_DEPTH:
                    os.close(child)
                    raise TreeError(
                        "too_deep",
                        f"{_shown(parts)} is more than {MAX_DELETE_DEPTH} directories deep: "
                        "remove it with a command (rm -rf)",
                        path=_shown(parts),
                    )
                stack.append((child, sub, fd, _clear_files(child)))
                continue
            stack.pop()
            os.close(fd)
            try:
                os.rmdir(own_name, dir_fd=parent_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY:
                    raise
                raise TreeError(
                    "not_empty",
                    f"{_shown(parts)} changed while it was being deleted; try again",
                    path=_shown(parts),
                ) from None
    finally:
        for frame in stack:
            os.close(frame[0])


def _open_subdir(name: str, parent: int) -> int | None:
    """A descriptor of real directory ``name`` in ``parent``; a link (or a file) found
    there instead is unlinked and ``None`` returned, as for a name already gone."""
    try:
        return os.open(name, _DIR, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _unlink(name, parent)
            return None
        if exc.errno == errno.ENOENT:
            return None
        raise


def _clear_files(fd: int) -> list[str]:
    """Unlink everything in directory ``fd`` but its subdirectories; their names."""
    subdirs: list[str] = []
    with os.scandir(fd) as it:
        for entry in it:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(entry.name)
            else:
                _unlink(entry.name, fd)
    return subdirs
