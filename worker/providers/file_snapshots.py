"""File snapshot store: ``tar`` + zstd archives under a directory, ``file://`` URLs.

Saving streams ``tar -C <dir> -cf - .`` through the ``zstd`` binary when it is on PATH
(multi-threaded, checksummed) or through the ``zstandard`` library otherwise, into a
temporary file that is fsynced and atomically renamed to ``<root>/<key>.tar.zst``.

**Links are never followed.** The sandbox directory itself must not be a symbolic link
(refused, not followed); ``tar`` runs without ``-h``/``--dereference`` and
``--hard-dereference``, so symbolic links are stored as links whatever they point at
(a virtualenv's ``bin/python -> /usr/bin/python3``) and nothing outside the tree is
read. FIFOs and device files are left out of the archive (a restore refuses them; a
sandbox's sockets are skipped by tar): they are dropped from tar's output stream as it
is compressed, so one created while the snapshot runs is dropped too.

Restoring never trusts the archive. A first pass decompresses and reads every member
header *before anything is written*, and refuses the archive unless every member:

* has a non-empty relative name without ``..`` components (``.`` only as a directory:
  the sandbox directory itself);
* is a directory, regular file, symbolic link or hard link (no devices, no FIFOs);
* does not pass through a symbolic link of the archive (``a -> /etc`` then
  ``a/passwd``), nor through a non-directory member; a hard link to a symbolic link
  counts as a symbolic link;
* appears once (directories may repeat);
* if a symbolic link: has a non-empty target. The target may be anything (absolute,
  ``..``, dangling): the link is restored as a link and never followed;
* if a hard link: points, by a relative path that passes through no symbolic link, at
  an earlier file, hard link or symbolic link member of the archive.

The zstd frames must be complete with valid checksums and nothing but tar padding may
follow the end of the archive; otherwise the archive is reported corrupt. A second pass
then extracts into the (empty or new) target directory: directories component by
component (an existing non-directory on the way is refused, never followed), regular
files with ``O_EXCL | O_NOFOLLOW``, hard links to files; then, after every regular file
and directory, the symbolic links (and hard links to them); directory permissions and
times last, through ``O_NOFOLLOW`` descriptors. Since no symbolic link exists until
everything else is written, and no member passes through one, extraction never writes
through a link. Permissions are restored without setuid/setgid/sticky bits and
ownership is never changed. On any failure the target directory is left as it was found.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO
from urllib.parse import unquote, urlsplit

import zstandard

from worker.providers.base import (
    PermanentProviderError,
    ProviderError,
    SnapshotInfo,
    TransientProviderError,
)
from worker.providers.git import subprocess_env

__all__ = ["FileSnapshotStore"]

SUFFIX = ".tar.zst"
STALE_TEMP_SECONDS = 6 * 3600.0

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_KEY_SEGMENTS = 8
_COPY_CHUNK = 1 << 20
# Compressed bytes fed to the decompressor per call. zstd can expand input ~32768x
# (runs of one byte), so this bounds the memory a hostile archive can make us use.
_DECOMPRESS_INPUT_CHUNK = 2048
_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)
# Tar types a restore refuses, left out when saving: character/block devices, FIFOs.
_SPECIAL_TYPES = (tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
# Headers that describe the member after them (GNU long name/link, pax extended).
_PREFIX_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE)
# Types whose size field is not followed by data (as tarfile and GNU tar read them).
_NO_DATA_TYPES = (
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)
_MAX_HELD_PREFIX = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# GNU tar exits 1 when a file changed while it was read (a live sandbox); the archive is
# still complete and valid.
_TAR_BENIGN_WARNINGS = ("file changed as we read it", "file removed before we read it")


class _CorruptArchive(Exception):
    """The archive cannot be decoded (raised inside the reader, reported as permanent)."""


class _UnsafeOnDisk(Exception):
    """Extraction met a non-directory where it needs a directory (never followed)."""


@dataclass(frozen=True)
class _Entry:
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


def _show(value: str, limit: int = 200) -> str:
    """A member name safe to put in a message (printable, bounded)."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in value)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _widen_pipe(pipe: IO[bytes]) -> None:
    """Give a pipe 1 MiB of buffer (Linux; 64 KiB by default), so that the Python pump
    between tar and zstd moves big chunks and neither side waits on it. Best effort."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), set_size, _COPY_CHUNK)


def _tail(data: bytes, lines: int = 3) -> str:
    text = data.decode("utf-8", "replace").strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:] if line.strip())[:500]


class _ZstdReader:
    """Decompress a zstd file as a stream, refusing truncated or damaged frames.

    ``zstandard``'s ``stream_reader`` silently stops at a truncated frame, so frames are
    decoded with ``decompressobj`` (which reports ``eof`` only for a complete frame and
    verifies the content checksum). Also records where the last non-zero byte of the
    decompressed stream ends, to check that only padding follows the tar end marker.
    """

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._dctx = zstandard.ZstdDecompressor()
        self._dobj: Any = self._dctx.decompressobj()
        self._in_frame = False
        self._frames = 0
        self._buf = bytearray()
        self._eof = False
        self._pos = 0
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
        self._pos += len(out)
        return out

    def write(self, _data: bytes, /) -> int:
        raise OSError(errno.EBADF, "snapshot reader is read-only")

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, /) -> int:
        if pos != self._pos:
            raise OSError(errno.ESPIPE, "snapshot reader cannot seek")
        return pos

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


def _normalize(name: str) -> list[str] | None:
    """Path components of a member name, or None if it is absolute or has ``..``."""
    if name.startswith("/"):
        return None
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return None
    return parts


def _octal_field(field: bytes) -> int:
    """A numeric tar header field: octal text, or GNU base-256 (high bit set)."""
    if field and field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip(b" ")
    return int(text or b"0", 8)


def _header_ok(block: bytes) -> bool:
    """Whether a 512-byte block is a tar header with a valid checksum."""
    try:
        stored = _octal_field(block[148:156])
    except ValueError:
        return False
    unsigned = sum(block[:148]) + 8 * 0x20 + sum(block[156:])
    return stored == unsigned


class _DropSpecialMembers:
    """Filter a tar stream: FIFO and device members (and the long-name or pax headers
    that describe them) are dropped, everything else passes through byte for byte.

    Fed the stream in chunks of any size; a chunk with nothing to drop comes back as it
    is (no copy). Whatever it cannot parse (a bad checksum, an oversized extension
    header) is passed through unchanged from there on, so the filter never corrupts an
    archive; a restore then judges it as usual.
    """

    def __init__(self) -> None:
        self._header = bytearray()  # a header split between chunks
        self._held = bytearray()  # extension headers (and data) waiting for their member
        self._copy = 0  # bytes of member data to pass on (into _held while holding)
        self._holding = False
        self._skip = 0  # bytes of data of a dropped member
        self._sparse_ext = False  # GNU sparse extension blocks follow
        self._sparse_data = 0
        self._through = False  # end of archive reached, or gave up parsing
        self.dropped = 0

    def feed(self, data: bytes) -> bytes:  # noqa: C901 -- one state machine over tar headers
        if self._through and not self._header:
            return data
        view = memoryview(data)
        size = len(data)
        pieces: list[bytes | memoryview] = []
        pos = run = 0  # data[run:pos] passes through as it is

        def cut(at: int) -> None:
            if at > run:
                pieces.append(view[run:at])

        while pos < size and not self._through:
            if self._copy and not self._holding:
                n = min(self._copy, size - pos)
                self._copy -= n
                pos += n
                continue
            if self._copy or self._skip:  # held data, or a dropped member's data
                cut(pos)
                n = min(self._copy or self._skip, size - pos)
                if self._copy:
                    self._held += view[pos : pos + n]
                    self._copy -= n
                else:
                    self._skip -= n
                pos = run = pos + n
                if len(self._held) > _MAX_HELD_PREFIX:
                    pieces.append(bytes(self._held))
                    self._held.clear()
                    self._holding, self._through = False, True
                continue
            if not self._header and size - pos >= _TAR_BLOCK:  # a whole header here
                action = self._classify(data[pos : pos + _TAR_BLOCK])
                if action == "pass" and not self._held:
                    pos += _TAR_BLOCK
                    continue
                cut(pos)
                if action == "pass":
                    pieces.append(bytes(self._held))
                    self._held.clear()
                    run = pos
                elif action == "hold":
                    self._held += view[pos : pos + _TAR_BLOCK]
                    run = pos + _TAR_BLOCK
                else:  # drop
                    run = pos + _TAR_BLOCK
                pos += _TAR_BLOCK
                continue
            # A header split between chunks: collect it, then place it like above.
            cut(pos)
            n = min(_TAR_BLOCK - len(self._header), size - pos)
            self._header += view[pos : pos + n]
            pos = run = pos + n
            if len(self._header) == _TAR_BLOCK:
                block = bytes(self._header)
                self._header.clear()
                action = self._classify(block)
                if action == "pass":
                    pieces += (bytes(self._held), block)
                    self._held.clear()
                elif action == "hold":
                    self._held += block
        if not pieces and run == 0:
            return data
        cut(size)
        return b"".join(pieces)

    def finish(self) -> bytes:
        """Anything held back at the end of the stream (only for a truncated stream)."""
        rest = bytes(self._held + self._header)
        self._held.clear()
        self._header.clear()
        return rest

    def _classify(self, block: bytes) -> str:
        """What to do with a header block: ``pass`` it on (after what is held),
        ``hold`` it until its member is known, or ``drop`` it; sets what follows."""
        if self._sparse_ext:  # GNU sparse map continuation: isextended at byte 504
            if not block[504]:
                self._sparse_ext = False
                self._copy = self._sparse_data
            return "pass"
        if block == _ZERO_BLOCK or not _header_ok(block):
            self._through = True  # the end marker (only padding follows), or junk
            self._holding = False
            return "pass"
        kind = block[156:157]
        try:
            size = _octal_field(block[124:136])
        except ValueError:
            size = -1
        if size < 0:
            self._through, self._holding = True, False
            return "pass"
        data = 0 if kind in _NO_DATA_TYPES else -(-size // _TAR_BLOCK) * _TAR_BLOCK
        if kind in _PREFIX_TYPES:
            self._copy, self._holding = data, True
            return "hold"
        self._holding = False
        if kind in _SPECIAL_TYPES:
            self._held.clear()
            self._skip = data
            self.dropped += 1
            return "drop"
        if kind == tarfile.GNUTYPE_SPARSE and block[482]:
            self._sparse_ext, self._sparse_data = True, data
        else:
            self._copy = data
        return "pass"


class FileSnapshotStore:
    """:class:`~worker.providers.base.SnapshotStore` over ``.tar.zst`` files on disk."""

    kind = "file"
    shared = False  # files on this host's disk

    def __init__(
        self,
        root: Path,
        level: int = 3,
        *,
        use_zstd_binary: bool | None = None,
        use_tar_binary: bool | None = None,
    ) -> None:
        if not 1 <= level <= 22:
            raise ValueError("zstd level must be between 1 and 22")
        self._root = Path(root).expanduser().resolve()
        self._level = level
        zstd_bin = shutil.which("zstd")
        tar_bin = shutil.which("tar")
        self._zstd_bin = zstd_bin if use_zstd_binary in (None, True) else None
        self._tar_bin = tar_bin if use_tar_binary in (None, True) else None
        if use_zstd_binary and zstd_bin is None:
            raise ValueError("use_zstd_binary=True but no 'zstd' on PATH")
        if use_tar_binary and tar_bin is None:
            raise ValueError("use_tar_binary=True but no 'tar' on PATH")

    @property
    def root(self) -> Path:
        return self._root

    # -- naming ----------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """Where snapshot ``key`` is stored. Keys are ``/``-separated safe segments."""
        segments = key.split("/") if isinstance(key, str) else []
        if (
            not segments
            or len(segments) > _MAX_KEY_SEGMENTS
            or not all(_KEY_SEGMENT.fullmatch(seg) and ".." not in seg for seg in segments)
        ):
            raise PermanentProviderError(
                f"invalid snapshot key {_show(str(key))!r}: use '/'-separated segments of "
                "letters, digits, '.', '_' or '-'"
            )
        return self._root.joinpath(*segments[:-1], segments[-1] + SUFFIX)

    def url_for(self, key: str) -> str:
        return self.path_for(key).as_uri()

    def key_for(self, url: str) -> str:
        """The key of a ``file://`` URL of this store (refuses anything else)."""
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme != "file" or parts.netloc not in ("", "localhost"):
            raise PermanentProviderError("snapshot URL is not a file:// URL of this store")
        path = Path(os.path.normpath(unquote(parts.path)))
        if not path.is_relative_to(self._root) or not path.name.endswith(SUFFIX):
            raise PermanentProviderError("snapshot URL is not a file:// URL of this store")
        rel = path.relative_to(self._root).as_posix()
        key = rel[: -len(SUFFIX)]
        if self.path_for(key) != path:
            raise PermanentProviderError("snapshot URL is not a file:// URL of this store")
        return key

    # -- SnapshotStore -------------------------------------------------------------

    def save(self, key: str, source_dir: Path) -> SnapshotInfo:
        final = self.path_for(key)
        source = Path(source_dir)
        try:
            source_mode = source.lstat().st_mode
        except FileNotFoundError:
            source_mode = 0
        except OSError as exc:
            raise self._os_error(f"cannot snapshot {key}", exc) from exc
        if stat.S_ISLNK(source_mode):
            raise PermanentProviderError(
                f"cannot snapshot {key}: the source directory is a symbolic link, "
                "which the worker does not follow"
            )
        if not stat.S_ISDIR(source_mode):
            raise PermanentProviderError(f"cannot snapshot {key}: source directory is missing")
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps(final)
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
            )
        except OSError as exc:
            raise self._os_error(f"cannot write snapshot {key}", exc) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                self._write_archive(key, source, out)
                out.flush()
                os.fsync(out.fileno())
                size = os.fstat(out.fileno()).st_size
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise self._os_error(f"cannot write snapshot {key}", exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return SnapshotInfo(url=final.as_uri(), size_bytes=size, created_at=datetime.now(UTC))

    def restore(self, url: str, target_dir: Path) -> None:
        key = self.key_for(url)
        path = self.path_for(key)
        target = Path(target_dir)
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            raise PermanentProviderError(
                f"cannot restore snapshot {key}: target is not a directory"
            )
        if target.is_dir() and any(target.iterdir()):
            raise PermanentProviderError(
                f"cannot restore snapshot {key}: target directory is not empty"
            )
        try:
            fh = open(path, "rb")  # noqa: SIM115 -- closed below, used by both passes
        except FileNotFoundError:
            raise PermanentProviderError(f"snapshot {key} not found") from None
        except OSError as exc:
            raise PermanentProviderError(f"snapshot {key} cannot be read: {exc.strerror}") from None
        with fh:
            plan = self._scan(key, fh)
            created = not target.exists()
            mode = None if created else stat.S_IMODE(target.stat().st_mode)
            try:
                target.mkdir(parents=True, exist_ok=True)
                fh.seek(0)
                self._extract(key, fh, plan, target)
            except BaseException:
                self._undo(target, mode)
                raise

    def delete(self, url: str) -> None:
        path = self.path_for(self.key_for(url))
        path.unlink(missing_ok=True)

    def count(self) -> int:
        if not self._root.is_dir():
            return 0
        return sum(
            1
            for path in self._root.rglob("*" + SUFFIX)
            if path.is_file()
            and not any(part.startswith(".") for part in path.relative_to(self._root).parts)
        )

    # -- save internals ------------------------------------------------------------

    def _write_archive(self, key: str, source: Path, out: IO[bytes]) -> None:
        if self._tar_bin is None:
            self._write_with_tarfile(source, out)
            return
        # No -h/--dereference, no --hard-dereference: links are stored as links.
        tar_cmd = [self._tar_bin, "-C", str(source), "--numeric-owner", "-cf", "-", "."]
        env = subprocess_env()
        with tempfile.TemporaryFile() as tar_err, tempfile.TemporaryFile() as zstd_err:
            tar = subprocess.Popen(tar_cmd, stdout=subprocess.PIPE, stderr=tar_err, env=env)
            assert tar.stdout is not None
            _widen_pipe(tar.stdout)
            zstd_rc = 0
            try:
                if self._zstd_bin is not None:
                    zstd_cmd = [self._zstd_bin, "-q", f"-{self._level}", "-T0", "-c"]
                    if self._level > 19:
                        zstd_cmd.insert(1, "--ultra")
                    zstd = subprocess.Popen(
                        zstd_cmd, stdin=subprocess.PIPE, stdout=out, stderr=zstd_err, env=env
                    )
                    assert zstd.stdin is not None
                    _widen_pipe(zstd.stdin)
                    try:
                        self._pump(tar.stdout, zstd.stdin)
                    except BrokenPipeError:
                        pass  # zstd stopped early: its exit status says why
                    finally:
                        with contextlib.suppress(BrokenPipeError):
                            zstd.stdin.close()
                        zstd_rc = zstd.wait()
                else:
                    cctx = zstandard.ZstdCompressor(
                        level=self._level, threads=-1, write_checksum=True
                    )
                    with cctx.stream_writer(out, closefd=False) as writer:
                        self._pump(tar.stdout, writer)
            finally:
                tar.stdout.close()
                tar_rc = tar.wait()
            tar_err.seek(0)
            tar_msg = tar_err.read()
            zstd_err.seek(0)
            zstd_msg = zstd_err.read()
        if zstd_rc != 0:
            detail = _tail(zstd_msg) or f"exit status {zstd_rc}"
            if "no space left" in detail.lower():
                raise TransientProviderError(f"cannot write snapshot {key}: {detail}")
            raise PermanentProviderError(f"cannot write snapshot {key}: zstd failed: {detail}")
        benign = tar_rc == 1 and any(
            w in tar_msg.decode("utf-8", "replace") for w in _TAR_BENIGN_WARNINGS
        )
        if tar_rc != 0 and not benign:
            detail = _tail(tar_msg) or f"exit status {tar_rc}"
            raise PermanentProviderError(f"cannot write snapshot {key}: tar failed: {detail}")

    @staticmethod
    def _pump(tar_out: IO[bytes], sink: IO[bytes]) -> None:
        """Copy tar's output to the compressor without FIFOs and devices."""
        drop = _DropSpecialMembers()
        fd = tar_out.fileno()
        while chunk := os.read(fd, _COPY_CHUNK):  # what is there: keeps the pipeline moving
            sink.write(drop.feed(chunk))
        if rest := drop.finish():
            sink.write(rest)

    def _write_with_tarfile(self, source: Path, out: IO[bytes]) -> None:
        """Fallback when there is no ``tar`` binary: Python's tarfile, same layout
        (``add`` reads links with ``lstat``: stored as links, never followed)."""

        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            return None if info.type in _SPECIAL_TYPES else info

        cctx = zstandard.ZstdCompressor(level=self._level, threads=-1, write_checksum=True)
        with (
            cctx.stream_writer(out, closefd=False) as writer,
            tarfile.open(fileobj=writer, mode="w|", format=tarfile.GNU_FORMAT) as tf,
        ):
            tf.add(str(source), arcname=".", recursive=True, filter=keep)

    @staticmethod
    def _remove_stale_temps(final: Path) -> None:
        """Temporary files of ``final`` left by a process killed long ago."""
        now = time.time()
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_TEMP_SECONDS:
                    stale.unlink()

    # -- restore internals ---------------------------------------------------------

    def _scan(self, key: str, fh: BinaryIO) -> list[_Entry]:
        """Validation pass: read every header, refuse anything unsafe, write nothing."""
        reader = _ZstdReader(fh)
        entries: list[_Entry] = []
        kinds: dict[str, str] = {}
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for member in tf:
                    entries.append(self._check_member(key, member, kinds))
                end = tf.offset
            reader.drain()
        except _CorruptArchive as exc:
            raise PermanentProviderError(f"snapshot {key} is corrupt: {exc}") from None
        except (tarfile.TarError, EOFError, OSError, ValueError, zstandard.ZstdError) as exc:
            raise PermanentProviderError(f"snapshot {key} is corrupt: {exc}") from None
        if reader.last_nonzero_end > end:
            raise PermanentProviderError(
                f"snapshot {key} is corrupt: unreadable data after member {len(entries)}"
            )
        if not entries:
            raise PermanentProviderError(f"snapshot {key} is corrupt: it holds no files")
        return entries

    @staticmethod
    def _check_member(  # noqa: C901 -- the docstring's rules, one branch each, in order
        key: str, member: tarfile.TarInfo, kinds: dict[str, str]
    ) -> _Entry:
        """One member against the rules in the module docstring. ``kinds`` maps every
        path the earlier members made (``dir`` also for implied parents) to its kind,
        ``symlink`` for symbolic links and hard links to them: the archive's links."""
        raw = member.name

        def refuse(reason: str) -> PermanentProviderError:
            return PermanentProviderError(f"snapshot {key} refused: member '{_show(raw)}' {reason}")

        def through_link(parts: list[str]) -> str | None:
            """The first proper prefix of ``parts`` that is a link of the archive."""
            for depth in range(1, len(parts)):
                prefix = "/".join(parts[:depth])
                if kinds.get(prefix) == "symlink":
                    return prefix
            return None

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
                raise refuse(f"is a hard link to '{_show(member.linkname)}', outside the sandbox")
            link = "/".join(source)
            via = through_link(source)
            if via is not None:
                raise refuse(
                    f"is a hard link to '{_show(member.linkname)}', through the symbolic "
                    f"link '{_show(via)}'"
                )
            target_kind = kinds.get(link)
            if target_kind not in ("file", "symlink"):
                raise refuse(
                    f"is a hard link to '{_show(member.linkname)}', which is not an earlier "
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
        for depth in range(1, len(parts)):
            prefix = "/".join(parts[:depth])
            seen = kinds.get(prefix)
            if seen == "symlink":
                raise refuse(
                    f"would be written through the symbolic link '{_show(prefix)}', "
                    "possibly outside the sandbox"
                )
            if seen is None:
                kinds[prefix] = "dir"
            elif seen != "dir":
                raise refuse(f"is below '{_show(prefix)}', which is not a directory")
        seen = kinds.get(name)
        if seen is not None and not (seen == "dir" and kind == "dir"):
            if seen == "dir" and kind in ("symlink", "symhardlink"):
                raise refuse(
                    "is a link, but earlier members are below it (they would be written through it)"
                )
            raise refuse("appears more than once in the snapshot")
        kinds[name] = {"hardlink": "file", "symhardlink": "symlink"}.get(kind, kind)
        return _Entry(
            raw_name=raw,
            name=name,
            kind=kind,
            link=link,
            mode=member.mode & 0o777,
            mtime=float(member.mtime),
        )

    def _extract(  # noqa: C901 -- one branch per member type the scan accepted
        self, key: str, fh: BinaryIO, plan: list[_Entry], target: Path
    ) -> None:
        """Extraction pass over the members the scan accepted, in the same order; the
        links after everything else, directory permissions and times last."""
        root = str(target)
        dirs: list[tuple[str, _Entry]] = []
        made: set[str] = {root}  # directories known to exist (saves a mkdir per file)
        index = 0
        try:
            with tarfile.open(fileobj=_ZstdReader(fh), mode="r|") as tf:
                for member in tf:
                    if index >= len(plan) or member.name != plan[index].raw_name:
                        raise _CorruptArchive("it changed while being restored")
                    entry = plan[index]
                    index += 1
                    if entry.is_link:
                        continue
                    self._restore_member(key, entry, root, made, dirs, tf, member)
        except _CorruptArchive as exc:
            raise PermanentProviderError(f"snapshot {key} is corrupt: {exc}") from None
        except (tarfile.TarError, EOFError, zstandard.ZstdError) as exc:
            raise PermanentProviderError(f"snapshot {key} is corrupt: {exc}") from None
        except OSError as exc:
            raise self._os_error(f"cannot restore snapshot {key}", exc) from None
        if index != len(plan):
            raise PermanentProviderError(
                f"snapshot {key} is corrupt: it changed while being restored"
            )

        # Every regular file and directory exists: now the links, symbolic ones first
        # (a hard link to a symbolic link needs it). Nothing is written after them but
        # directory modes and times, through descriptors that refuse a link.
        for entry in plan:
            if entry.kind == "symlink":
                self._restore_member(key, entry, root, made, dirs)
        for entry in plan:
            if entry.kind == "symhardlink":
                self._restore_member(key, entry, root, made, dirs)

        # Directory permissions and times last, deepest first, so that read-only
        # directories did not block their own contents.
        def depth(item: tuple[str, _Entry]) -> int:
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
                raise self._os_error(f"cannot restore snapshot {key}", exc) from None

    def _restore_member(
        self,
        key: str,
        entry: _Entry,
        root: str,
        made: set[str],
        dirs: list[tuple[str, _Entry]],
        tf: tarfile.TarFile | None = None,
        member: tarfile.TarInfo | None = None,
    ) -> None:
        """:meth:`_extract_one` with its failures as provider errors naming the member."""
        try:
            self._extract_one(tf, member, entry, root, dirs, made)
        except _UnsafeOnDisk as exc:
            raise PermanentProviderError(
                f"snapshot {key} refused: member '{_show(entry.raw_name)}' {exc}"
            ) from None
        except OSError as exc:
            raise self._os_error(
                f"cannot restore snapshot {key}: member '{_show(entry.raw_name)}'", exc
            ) from None

    @staticmethod
    def _make_dirs(root: str, rel: str, made: set[str]) -> str:
        """``root/rel`` as a directory, made one component at a time. Anything on the way
        that exists and is not a directory (a link above all) is refused, never followed.
        ``made`` remembers the directories known to exist."""
        path = os.path.join(root, rel) if rel else root
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
                    shown = _show(os.path.relpath(current, root))
                    raise _UnsafeOnDisk(
                        f"would be written through '{shown}', which is not a directory"
                    ) from None
            made.add(current)
        return path

    def _extract_one(
        self,
        tf: tarfile.TarFile | None,
        member: tarfile.TarInfo | None,
        entry: _Entry,
        root: str,
        dirs: list[tuple[str, _Entry]],
        made: set[str],
    ) -> None:
        # The scan guarantees nothing replaces a directory once made, so a directory in
        # ``made`` stays one: skip the (slow on some filesystems) mkdir of every parent.
        if entry.kind == "dir":
            dirs.append((self._make_dirs(root, entry.name, made), entry))
            return
        parent, _, base = entry.name.rpartition("/")
        path = os.path.join(self._make_dirs(root, parent, made), base)
        if entry.kind == "file":
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(path, flags, 0o600)
            with os.fdopen(fd, "wb", buffering=0) as out:
                data = tf.extractfile(member) if tf is not None and member is not None else None
                if data is not None:
                    shutil.copyfileobj(data, out, _COPY_CHUNK)
                os.fchmod(fd, entry.mode)
                os.utime(fd, (entry.mtime, entry.mtime))
        elif entry.kind == "symlink":
            os.symlink(entry.link, path)  # never follows: the link itself is created
            os.utime(path, (entry.mtime, entry.mtime), follow_symlinks=False)
        else:  # hardlink, symhardlink: link the member itself, not what it points at
            os.link(os.path.join(root, entry.link), path, follow_symlinks=False)

    @staticmethod
    def _undo(target: Path, mode: int | None) -> None:
        """Put ``target`` back as it was before a failed restore: missing (``mode`` is
        None) or empty with permissions ``mode``."""
        if not target.exists():
            return
        with contextlib.suppress(OSError):
            os.chmod(target, 0o700)
        for dirpath, dirnames, _files in os.walk(target):
            for dirname in dirnames:
                with contextlib.suppress(OSError):
                    child = os.path.join(dirpath, dirname)
                    if not os.path.islink(child):
                        os.chmod(child, 0o700)
        if mode is None:
            shutil.rmtree(target, ignore_errors=True)
            return
        for entry in target.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(target, mode)

    @staticmethod
    def _os_error(what: str, exc: OSError) -> ProviderError:
        reason = exc.strerror or str(exc)
        if exc.errno in _NO_SPACE:
            return TransientProviderError(f"{what}: {reason}")
        return PermanentProviderError(f"{what}: {reason}")
