"""Restoring a snapshot archive safely: never trusting it, never writing through a link.

Shared by every snapshot store: a store hands over the compressed stream once, and
:func:`restore` does the rest in a single pass (download or file → zstd → streaming
tar; with the ``zstd`` binary, a thread feeds it the stream while this one reads its
output), into a fresh **staging directory** beside the target (same filesystem), checking
each member as it arrives, against every member before it. The archive is refused
unless every member:

* has a non-empty relative name without ``..`` components (``.`` only as a directory:
  the sandbox directory itself);
* is a directory, regular file, symbolic link or hard link (no devices, no FIFOs, no
  sparse files);
* does not pass through a symbolic link of the archive (``a -> /etc`` then
  ``a/passwd``), nor through a non-directory member; a hard link to a symbolic link
  counts as a symbolic link;
* appears once (directories may repeat);
* if a symbolic link: has a non-empty target. The target may be anything (absolute,
  ``..``, dangling): the link is restored as a link and never followed;
* if a hard link: points, by a relative path that passes through no symbolic link, at
  an earlier file, hard link or symbolic link member of the archive.

The tar stream is read by :mod:`worker.providers.tar_stream` (GNU and POSIX formats,
long names, pax headers; a header with a bad checksum or of a kind it does not know ends
the stream as corrupt). Members that pass are written at once, in their order, in the
thread that reads them (a writing thread of its own, there while ``tarfile`` parsed,
only fought it for the GIL once parsing became cheap): directories component by
component (an existing non-directory on the way is refused, never followed), regular
files with ``O_EXCL | O_NOFOLLOW``, hard links to files. Symbolic links (and hard links to them)
are only recorded. The zstd frames must be complete with valid checksums and nothing
but tar padding may follow the end of the archive; otherwise the archive is reported
corrupt. Once the stream has ended and the store's own check passed (the S3 store's
SHA-256 and size), the symbolic links are made, then directory permissions and times,
through ``O_NOFOLLOW`` descriptors. Since no symbolic link exists until everything else
is written, and no member passes through one, extraction never writes through a link.
Permissions are restored without setuid/setgid/sticky bits and ownership is never
changed.

Only then is the staging directory renamed onto the target (which must be missing or
an empty directory: the rename creates it, or replaces the empty directory
atomically). On any failure (a refused member, however late in the archive; a
truncated or damaged stream, even in its last bytes; a full disk) the staging
directory is removed and the target is left exactly as it was found: nothing is
extracted.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import zstandard

from worker.providers.base import PermanentProviderError
from worker.providers.git import subprocess_env
from worker.providers.snapshot_archive import (
    COPY_CHUNK,
    fine_switching,
    os_error,
    show,
    widen_pipe,
)
from worker.providers.tar_stream import Member, TarFormatError, TarStream

__all__ = ["Entry", "Readable", "check_target", "restore"]


class Readable(Protocol):
    """What the passes read an archive from: a file, or a store's download stream."""

    def read(self, size: int = -1, /) -> bytes: ...


# Compressed bytes fed to the decompressor per call. zstd can expand input ~32768x
# (runs of one byte), so this bounds the memory a hostile archive can make us use.
_DECOMPRESS_INPUT_CHUNK = 2048


# The zstd binary's decoding memory, as the library's default: windows up to 128 MiB.
_ZSTD_MEMORY = "--memory=128MB"
_ZSTD_NOISE = re.compile(r"^(zstd:\s*)?/\*stdin\*\\?\s*:\s*")


_CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# A file's data is written in pieces of at most this many bytes.
_WRITE_PIECE = 256 * 1024


class _CorruptArchive(Exception):
    """The archive cannot be decoded (raised inside the reader, reported as permanent)."""


class _UnsafeOnDisk(Exception):
    """Extraction met a non-directory where it needs a directory (never followed)."""


@dataclass(slots=True)
class Entry:
    """One validated archive member."""

    raw_name: str
    name: str  # normalized, relative to the target; "" is the target itself
    kind: str  # dir | file | symlink | hardlink (to a file) | symhardlink (to a symlink)
    link: str  # symlink target (verbatim) or hard-link source (normalized name)
    mode: int
    mtime: float

    @property
    def is_link(self) -> bool:
        """Made after every file and directory: a symbolic link or a hard link to one."""
        return self.kind in ("symlink", "symhardlink")


class _ZstdReader:
    """Decompress a zstd file as a stream, refusing truncated or damaged frames.

    ``zstandard``'s ``stream_reader`` silently stops at a truncated frame, so frames are
    decoded with ``decompressobj`` (which reports ``eof`` only for a complete frame and
    verifies the content checksum). Also records where the last non-zero byte of the
    decompressed stream ends, to check that only padding follows the tar end marker.
    """

    def __init__(self, raw: Readable) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj: Any = self._dctx.decompressobj()
        self._in_frame = False
        self._frames = 0
        self._buf = bytearray()
        self._eof = False
        self._produced = 0
        self.last_nonzero_end = 0

    def read(self, size: int = -1, /) -> bytes:
        while (size < 0 or len(self._buf) < size) and not self._eof:
            self._fill()
        if size < 0 or size >= len(self._buf):
            out = bytes(self._buf)
            self._buf.clear()
        else:
            out = bytes(self._buf[:size])
            del self._buf[:size]
        return out

    def close(self) -> None:
        self._buf.clear()

    def drain(self) -> None:
        """Read (and check) the rest of the stream."""
        while not self._eof:
            self._fill()
            self._buf.clear()

    def _fill(self) -> None:
        chunk = self._raw.read(_DECOMPRESS_INPUT_CHUNK)
        if not chunk:
            if self._in_frame:
                raise _CorruptArchive("it is truncated (incomplete zstd frame)")
            if self._frames == 0:
                raise _CorruptArchive("it is empty")
            self._eof = True
            return
        while chunk:
            self._in_frame = True
            try:
                data = self._dobj.decompress(chunk)
            except zstandard.ZstdError as exc:
                raise _CorruptArchive(f"it is not valid zstd data ({exc})") from exc
            if data:
                stripped = len(data.rstrip(b"\0"))
                if stripped:
                    self.last_nonzero_end = self._produced + stripped
                self._produced += len(data)
                self._buf += data
            if self._dobj.eof:
                self._frames += 1
                self._in_frame = False
                chunk = self._dobj.unused_data
                self._dobj = self._dctx.decompressobj()
            else:
                chunk = b""


class _ZstdProcessReader:
    """Decompress with the ``zstd`` binary, in a process of its own, while a thread
    feeds it the compressed stream: reading (a download, with the store's hashing),
    decompressing and the extraction in this thread all run at once.

    The binary refuses what the library refuses (a truncated or damaged frame, a bad
    content checksum, data that is not a frame) by its exit status, read at the end of
    the stream; its memory is bounded the same way (``--memory``). It runs with the
    allow-listed environment and only ever sees the stream, on its standard input.
    Records, like :class:`_ZstdReader`, where the last non-zero byte of the
    decompressed stream ends. A failure to read the compressed stream is raised as
    itself, as :class:`_ZstdReader` would let it pass."""

    def __init__(self, raw: Readable, binary: str) -> None:
        self._raw = raw
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 -- closed in close()
        try:
            self._proc = subprocess.Popen(
                [binary, "-d", "-q", "-c", _ZSTD_MEMORY],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._err,
                env=subprocess_env(),
                bufsize=0,
            )
        except BaseException:
            self._err.close()
            raise
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin = self._proc.stdin
        self._stdout = self._proc.stdout
        widen_pipe(self._stdin)
        widen_pipe(self._stdout)
        self._fed = 0
        self._failure: list[BaseException] = []
        self._thread = threading.Thread(target=self._feed, name="snapshot-feed", daemon=True)
        self._thread.start()
        self._buf = b""
        self._off = 0
        self._produced = 0
        self._finished = False
        self.last_nonzero_end = 0

    def _feed(self) -> None:
        fd = self._stdin.fileno()
        try:
            while chunk := self._raw.read(COPY_CHUNK):
                self._fed += len(chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except BrokenPipeError:
            pass  # zstd stopped (its exit status says why) or the reader closed it
        except BaseException as exc:
            self._failure.append(exc)
        finally:
            with contextlib.suppress(OSError):
                self._stdin.close()

    def read(self, size: int = -1, /) -> bytes:
        if size < 0:
            parts = [self._buf[self._off :]]
            self._buf, self._off = b"", 0
            while self._fill():
                parts.append(self._buf)
                self._buf = b""
            out = b"".join(parts)
        else:
            if self._off >= len(self._buf) and not self._fill():
                return b""
            out = self._buf[self._off : self._off + size]
            self._off += len(out)
        return out

    def drain(self) -> None:
        """Read (and check) the rest of the stream."""
        self._buf, self._off = b"", 0
        while self._fill():
            pass

    def close(self) -> None:
        """Stop zstd and the feeding thread (at once if the stream was not read to its
        end: the extraction failed)."""
        if not self._finished:
            with contextlib.suppress(OSError):
                self._proc.kill()
        with contextlib.suppress(OSError):
            self._stdout.close()
        self._proc.wait()
        self._thread.join()
        self._err.close()

    def _fill(self) -> bool:
        """The next chunk of the decompressed stream into the buffer; False at its end
        (once zstd said the whole stream was good)."""
        if self._finished:
            return False
        chunk = os.read(self._stdout.fileno(), COPY_CHUNK)
        if not chunk:
            self._finish()
            return False
        stripped = len(chunk.rstrip(b"\0"))
        if stripped:
            self.last_nonzero_end = self._produced + stripped
        self._produced += len(chunk)
        self._buf, self._off = chunk, 0
        return True

    def _finish(self) -> None:
        status = self._proc.wait()
        self._thread.join()
        self._finished = True
        if self._failure:
            raise self._failure[0]
        if status != 0:
            self._err.seek(0)
            detail = self._err.read(4096).decode("utf-8", "replace")
            raise _CorruptArchive(_zstd_problem(detail, self._fed))


def _zstd_problem(stderr: str, fed: int) -> str:
    """What the zstd binary's complaint says about the stream, in the library's words."""
    if not fed:
        return "it is empty"
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    # "zstd: /*stdin*\: unsupported format", "/*stdin*\ : Decoding error (36) : ..."
    detail = _ZSTD_NOISE.sub("", lines[0]) if lines else ""
    if "unexpected end of file" in stderr or "premature end" in stderr:
        return "it is truncated (incomplete zstd frame)"
    return f"it is not valid zstd data ({show(detail, 120) or 'zstd failed'})"


def _normalize(name: str) -> list[str] | None:
    """Path components of a member name, or None if it is absolute or has ``..``."""
    if name.startswith("/"):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    return parts


def check_target(key: str, target: Path) -> None:
    """Refuse a target that is a link, not a directory, or a non-empty directory."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise PermanentProviderError(f"cannot restore snapshot {key}: target is not a directory")
    if target.is_dir() and any(target.iterdir()):
        raise PermanentProviderError(
            f"cannot restore snapshot {key}: target directory is not empty"
        )


def restore(
    key: str,
    fh: Readable,
    target: Path,
    *,
    verify: Callable[[], None] | None = None,
    zstd_binary: str | None = None,
) -> None:
    """Extract the archive ``fh`` into ``target`` (missing or an empty directory, see
    :func:`check_target`) in one pass, through a staging directory beside it.

    ``verify`` runs once the stream has ended, every member passed and every file and
    directory is written, before any link is made (a store's check of the whole
    stream, e.g. its SHA-256). Only then is the staging directory renamed onto
    ``target``; on any failure it is removed and ``target`` is left as it was found.

    With ``zstd_binary`` the stream is decompressed by that program while a thread
    reads ``fh`` (:class:`_ZstdProcessReader`; ``fh`` is read, and ``verify`` called,
    by one thread at a time); without, by the ``zstandard`` library in this thread."""
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        staging, fresh_mode = _make_staging(parent, target.name)
    except OSError as exc:
        raise os_error(f"cannot restore snapshot {key}", exc) from None
    try:
        with fine_switching():
            has_root = _extract(key, fh, staging, verify, zstd_binary)
        if not has_root:
            # No ``.`` member: the directory keeps the mode it has (an existing target)
            # or would have been made with (a missing one), as if extracted in place.
            try:
                found = os.lstat(target).st_mode
            except FileNotFoundError:
                found = fresh_mode
            os.chmod(staging, stat.S_IMODE(found if stat.S_ISDIR(found) else fresh_mode))
        _move_into_place(key, staging, target)
    except OSError as exc:
        _remove_tree(staging)
        raise os_error(f"cannot restore snapshot {key}", exc) from None
    except BaseException:
        _remove_tree(staging)
        raise


# What a member is recorded as in ``kinds``: a hard link as what it links to.
_RECORDED_AS = {"hardlink": "file", "symhardlink": "symlink"}

# The most bytes of paths one restore records (``_Kinds``): each new directory on a
# member's way is one path, so 4,096-byte names 2,048 levels deep cost megabytes each.
# A real tree's paths (each directory and file once) stay far below.
_MAX_RECORDED = 256 << 20


class _Kinds(dict[str, str]):
    """Every path the members made so far and its kind, and the bytes of those paths."""

    recorded = 0

    def record(self, path: str, kind: str) -> None:
        self[path] = kind
        self.recorded += len(path)


def _through_link(parts: list[str], kinds: dict[str, str]) -> str | None:
    """The first proper prefix of ``parts`` that is a link of the archive."""
    for depth in range(1, len(parts)):
        prefix = "/".join(parts[:depth])
        if kinds.get(prefix) == "symlink":
            return prefix
    return None


def _check_member(  # noqa: C901 -- the docstring's rules, one branch each, in order
    key: str, member: Member, kinds: _Kinds
) -> Entry:
    """One member against the rules in the module docstring. ``kinds`` maps every
    path the earlier members made (``dir`` also for implied parents) to its kind,
    ``symlink`` for symbolic links and hard links to them: the archive's links."""
    raw = member.name

    def refuse(reason: str) -> PermanentProviderError:
        return PermanentProviderError(f"snapshot {key} refused: member '{show(raw)}' {reason}")

    if not raw or "\x00" in raw:
        raise refuse("has an empty or invalid name")
    parts = _normalize(raw)
    if parts is None:
        raise refuse("would land outside the sandbox")
    name = "/".join(parts)

    link = ""
    if member.isdir():
        kind = "dir"
    elif member.isreg():
        kind = "file"
    elif member.issym():
        kind = "symlink"
        link = member.linkname
        if not link or "\x00" in link:
            raise refuse("is a symbolic link with an empty target")
    elif member.islnk():
        source = _normalize(member.linkname)
        if source is None or not source:
            raise refuse(f"is a hard link to '{show(member.linkname)}', outside the sandbox")
        link = "/".join(source)
        via = _through_link(source, kinds)
        if via is not None:
            raise refuse(
                f"is a hard link to '{show(member.linkname)}', through the symbolic "
                f"link '{show(via)}'"
            )
        target_kind = kinds.get(link)
        if target_kind not in ("file", "symlink"):
            raise refuse(
                f"is a hard link to '{show(member.linkname)}', which is not an earlier "
                "file or link of the snapshot"
            )
        # A hard link to a symbolic link is that link under another name.
        kind = "hardlink" if target_kind == "file" else "symhardlink"
    elif member.isfifo():
        raise refuse("is a FIFO (named pipe)")
    elif member.ischr() or member.isblk():
        raise refuse("is a device file")
    else:
        raise refuse("has an unsupported type")

    if not parts and kind != "dir":
        raise refuse("would replace the sandbox directory itself")
    # A parent already known as a directory had every one of its own parents checked
    # when it was recorded, and a directory's kind never changes: nothing to walk.
    parent = name.rpartition("/")[0]
    for depth in range(1, len(parts) if kinds.get(parent) != "dir" else 1):
        prefix = "/".join(parts[:depth])
        seen = kinds.get(prefix)
        if seen == "symlink":
            raise refuse(
                f"would be written through the symbolic link '{show(prefix)}', "
                "possibly outside the sandbox"
            )
        if seen is None:
            kinds.record(prefix, "dir")
        elif seen != "dir":
            raise refuse(f"is below '{show(prefix)}', which is not a directory")
    seen = kinds.get(name)
    if seen is not None and not (seen == "dir" and kind == "dir"):
        if seen == "dir" and kind in ("symlink", "symhardlink"):
            raise refuse(
                "is a link, but earlier members are below it (they would be written through it)"
            )
        raise refuse("appears more than once in the snapshot")
    kinds.record(name, _RECORDED_AS.get(kind, kind))
    if kinds.recorded > _MAX_RECORDED:
        raise refuse(
            f"takes the snapshot's paths past {_MAX_RECORDED >> 20} MiB (too many or too deep)"
        )
    return Entry(
        raw_name=raw,
        name=name,
        kind=kind,
        link=link,
        mode=member.mode & 0o777,
        mtime=float(member.mtime),
    )


def _extract(  # noqa: C901 -- one branch per way the stream can fail
    key: str,
    fh: Readable,
    staging: Path,
    verify: Callable[[], None] | None,
    zstd_binary: str | None,
) -> bool:
    """The single pass into ``staging``: each member checked as it arrives (by the
    rules of :func:`_check_member`, against every member before it), files and
    directories written at once, links kept for the end; then the end of the stream
    checked, ``verify``, the links, directory permissions and times last. Returns
    whether the archive had a member for the directory itself."""
    root = str(staging)
    reader: _ZstdReader | _ZstdProcessReader
    try:
        reader = _ZstdProcessReader(fh, zstd_binary) if zstd_binary else _ZstdReader(fh)
    except OSError as exc:
        raise os_error(f"cannot restore snapshot {key}: cannot start zstd", exc) from None
    kinds = _Kinds()
    links: list[Entry] = []
    dirs: list[tuple[str, Entry]] = []
    made: set[str] = {root}  # directories known to exist (saves a mkdir per file)
    count = 0
    try:
        tar = TarStream(reader)
        for member in tar.members():
            entry = _check_member(key, member, kinds)
            count += 1
            if entry.is_link:
                links.append(entry)  # made last: nothing is ever written through one
            elif entry.kind == "file":
                _restore_file(key, entry, tar.data(_WRITE_PIECE), root, made)
            else:
                _restore_member(key, entry, root, made, dirs)
        end = tar.end
        reader.drain()
    except (_CorruptArchive, TarFormatError) as exc:
        raise PermanentProviderError(f"snapshot {key} is corrupt: {exc}") from None
    except (EOFError, OSError, ValueError, zstandard.ZstdError) as exc:
        # Writes report their own failures (provider errors naming the member): these
        # come from reading.
        raise PermanentProviderError(f"snapshot {key} is corrupt: {exc}") from None
    finally:
        reader.close()
    if reader.last_nonzero_end > end:
        raise PermanentProviderError(
            f"snapshot {key} is corrupt: unreadable data after member {count}"
        )
    if not count:
        raise PermanentProviderError(f"snapshot {key} is corrupt: it holds no files")
    if verify is not None:
        verify()

    # Every regular file and directory exists: now the links, symbolic ones first
    # (a hard link to a symbolic link needs it). Nothing is written after them but
    # directory modes and times, through descriptors that refuse a link.
    for entry in links:
        if entry.kind == "symlink":
            _restore_member(key, entry, root, made, dirs)
    for entry in links:
        if entry.kind == "symhardlink":
            _restore_member(key, entry, root, made, dirs)

    # Directory permissions and times last, deepest first, so that read-only
    # directories did not block their own contents.
    def depth(item: tuple[str, Entry]) -> int:
        name = item[1].name
        return name.count("/") + 1 if name else 0

    for path, entry in sorted(dirs, key=depth, reverse=True):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, entry.mode)
                os.utime(fd, (entry.mtime, entry.mtime))
            finally:
                os.close(fd)
        except OSError as exc:
            raise os_error(f"cannot restore snapshot {key}", exc) from None
    return any(not entry.name for _, entry in dirs)


def _restore_member(
    key: str, entry: Entry, root: str, made: set[str], dirs: list[tuple[str, Entry]]
) -> None:
    """:func:`_extract_one` with its failures as provider errors naming the member."""
    try:
        _extract_one(entry, root, dirs, made)
    except (_UnsafeOnDisk, OSError) as exc:
        raise _member_failure(key, entry, exc) from None


def _member_failure(key: str, entry: Entry, exc: BaseException) -> BaseException:
    """A failure to write ``entry`` as a provider error naming the member."""
    if isinstance(exc, _UnsafeOnDisk):
        return PermanentProviderError(
            f"snapshot {key} refused: member '{show(entry.raw_name)}' {exc}"
        )
    if isinstance(exc, OSError):
        return os_error(f"cannot restore snapshot {key}: member '{show(entry.raw_name)}'", exc)
    return exc


def _make_dirs(root: str, rel: str, made: set[str]) -> str:
    """``root/rel`` as a directory, made one component at a time. Anything on the way
    that exists and is not a directory (a link above all) is refused, never followed.
    ``made`` remembers the directories known to exist."""
    # Plain concatenation: ``rel`` is a normalized member name (relative, no empty or
    # ``.``/``..`` components), so nothing os.path.join would do differently applies.
    path = f"{root}/{rel}" if rel else root
    if path in made:
        return path
    current = root
    for part in rel.split("/"):
        current = os.path.join(current, part)
        if current in made:
            continue
        try:
            os.mkdir(current, 0o700)
        except FileExistsError:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                shown = show(os.path.relpath(current, root))
                raise _UnsafeOnDisk(
                    f"would be written through '{shown}', which is not a directory"
                ) from None
        made.add(current)
    return path


def _extract_one(entry: Entry, root: str, dirs: list[tuple[str, Entry]], made: set[str]) -> None:
    """Make a directory, an empty file (one with data: :func:`_restore_file`) or a link."""
    # The scan guarantees nothing replaces a directory once made, so a directory in
    # ``made`` stays one: skip the (slow on some filesystems) mkdir of every parent.
    if entry.kind == "dir":
        dirs.append((_make_dirs(root, entry.name, made), entry))
        return
    if entry.kind == "file":
        fd = _create_file(entry, root, made)
        try:
            os.fchmod(fd, entry.mode)
            os.utime(fd, (entry.mtime, entry.mtime))
        finally:
            os.close(fd)
        return
    parent, _, base = entry.name.rpartition("/")
    path = os.path.join(_make_dirs(root, parent, made), base)
    if entry.kind == "symlink":
        os.symlink(entry.link, path)  # never follows: the link itself is created
        os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)
    else:  # hardlink, symhardlink: link the member itself, not what it points at
        os.link(os.path.join(root, entry.link), path, follow_symlinks=False)


def _restore_file(
    key: str, entry: Entry, pieces: Iterable[memoryview], root: str, made: set[str]
) -> None:
    """Write a regular file member with its data, read from the archive as ``pieces``
    (a failure to read them is the archive's, raised as it is)."""
    try:
        fd = _create_file(entry, root, made)
    except (_UnsafeOnDisk, OSError) as exc:
        raise _member_failure(key, entry, exc) from None
    try:
        for piece in pieces:
            try:
                _write_all(fd, piece)
            except OSError as exc:
                raise _member_failure(key, entry, exc) from None
        try:
            os.fchmod(fd, entry.mode)
            os.utime(fd, (entry.mtime, entry.mtime))
        except OSError as exc:
            raise _member_failure(key, entry, exc) from None
    finally:
        os.close(fd)


def _create_file(entry: Entry, root: str, made: set[str]) -> int:
    """A new regular file for ``entry``, open for writing: never an existing file, never
    through a link (``O_EXCL | O_NOFOLLOW``, parents made by :func:`_make_dirs`)."""
    parent, _, base = entry.name.rpartition("/")
    return os.open(f"{_make_dirs(root, parent, made)}/{base}", _CREATE_FILE, 0o600)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _make_staging(parent: Path, name: str) -> tuple[Path, int]:
    """A new, private directory in ``parent`` (so on the target's filesystem) named
    after the target: ``.<name>.restore+<random>`` (a target whose name starts with a
    dot keeps it, so the sweeps of its temporary names find a killed restore's
    leftovers too). Returns it with the mode a plain ``mkdir`` gave it (the umask's)."""
    stem = name if name.startswith(".") else f".{name}"
    for _ in range(100):
        path = parent / f"{stem[:200]}.restore+{secrets.token_hex(6)}"
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        try:
            mode = stat.S_IMODE(os.lstat(path).st_mode)
            os.chmod(path, 0o700)
        except BaseException:
            os.rmdir(path)
            raise
        return path, mode
    raise FileExistsError(errno.EEXIST, "no free staging directory name", str(parent))


def _move_into_place(key: str, staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` onto ``target``: it creates a missing target and
    atomically replaces an empty directory. Whatever appeared at the target since
    :func:`check_target` (a file, a link, a non-empty directory) makes it fail: the
    rename replaces no such thing and follows no link."""
    try:
        os.rename(staging, target)
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise PermanentProviderError(
                f"cannot restore snapshot {key}: target directory is not empty"
            ) from None
        if exc.errno in (errno.ENOTDIR, errno.EISDIR):
            raise PermanentProviderError(
                f"cannot restore snapshot {key}: target is not a directory"
            ) from None
        raise


def _remove_tree(path: Path) -> None:
    """Remove a staging directory, read-only directories (a restore sets their modes
    last) included, however deep (no recursion: a member may be 2,000 levels down).
    Nothing in it is followed: links are removed as links, and a directory is made
    writable through a descriptor that refuses a link. Best effort."""
    pending: list[tuple[str, bool]] = [(str(path), False)]
    while pending:
        current, emptied = pending.pop()
        with contextlib.suppress(OSError):
            if emptied:
                os.rmdir(current)
                continue
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                os.unlink(current)
                continue
            fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                os.fchmod(fd, 0o700)
            finally:
                os.close(fd)
            pending.append((current, True))
            with os.scandir(current) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        pending.append((entry.path, False))
                    else:
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
