"""Writing a snapshot archive: a sandbox directory as one ``tar`` + zstd stream.

Shared by every snapshot store (``file`` writes the stream into a temporary file,
``s3`` uploads it in multipart parts as it is produced). The stream is
``tar -C <dir> -cf - .`` piped through a filter (below) into the ``zstd`` binary when it
is on PATH (multi-threaded, checksummed) or the ``zstandard`` library otherwise; without
a ``tar`` binary Python's ``tarfile`` writes the same layout.

**Links are never followed.** The sandbox directory itself must not be a symbolic link
(refused, not followed); ``tar`` runs without ``-h``/``--dereference`` and
``--hard-dereference``, so symbolic links are stored as links whatever they point at
(a virtualenv's ``bin/python -> /usr/bin/python3``) and nothing outside the tree is
read. FIFOs and device files are left out of the archive (a restore refuses them; a
sandbox's sockets are skipped by tar): they are dropped from tar's output stream as it
is compressed, so one created while the snapshot runs is dropped too.

tar and zstd run with :func:`~worker.providers.git.subprocess_env` (an allow-list): no
store credentials ever reach them. Reading an archive back safely is
:mod:`worker.providers.snapshot_extract`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TypeVar

import zstandard

from worker.providers.base import PermanentProviderError, ProviderError, TransientProviderError
from worker.providers.git import subprocess_env

__all__ = ["ArchiveWriter", "DropSpecialMembers", "os_error", "show", "widen_pipe"]

T = TypeVar("T")

COPY_CHUNK = 1 << 20
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


def show(value: str, limit: int = 200) -> str:
    """A name safe to put in a message (printable, bounded)."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in value)
    return cleaned if len(cleaned) <= limit else cleaned[:limit] + "..."


def os_error(what: str, exc: OSError) -> ProviderError:
    """An OS failure as a provider error: a full disk may clear up, the rest will not."""
    reason = exc.strerror or str(exc)
    if exc.errno in _NO_SPACE:
        return TransientProviderError(f"{what}: {reason}")
    return PermanentProviderError(f"{what}: {reason}")


# While a snapshot streams, the GIL is asked for far more often than Python's default
# switch interval (5 ms) suits: a thread back from a pipe or socket (the feed of zstd,
# a download) waits that long behind a thread doing Python work (the tar reader, the
# writes), and the pipeline stalls. 0.5 ms: the S3 restore of 500 MB went from 1.67x
# to 1.38x the raw boto3 | zstd | tar pipeline, the save from 1.45x to 1.30x.
_STREAM_SWITCH_INTERVAL = 0.0005
_switching_lock = threading.Lock()
_switching_depth = 0
_switching_before = 0.0


@contextlib.contextmanager
def fine_switching() -> Iterator[None]:
    """Run the block with the process's GIL switch interval at most
    ``_STREAM_SWITCH_INTERVAL`` (restored once the last such block, in any thread,
    ends). Scheduling only: nothing else about the process changes."""
    global _switching_depth, _switching_before
    with _switching_lock:
        if _switching_depth == 0:
            _switching_before = sys.getswitchinterval()
            sys.setswitchinterval(min(_switching_before, _STREAM_SWITCH_INTERVAL))
        _switching_depth += 1
    try:
        yield
    finally:
        with _switching_lock:
            _switching_depth -= 1
            if _switching_depth == 0:
                sys.setswitchinterval(_switching_before)


def widen_pipe(pipe: IO[bytes]) -> None:
    """Give a pipe 1 MiB of buffer (Linux; 64 KiB by default), so that the Python pump
    between tar and zstd moves big chunks and neither side waits on it. Best effort."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    if set_size is not None:
        with contextlib.suppress(OSError):
            fcntl.fcntl(pipe.fileno(), set_size, COPY_CHUNK)


def _tail(data: bytes, lines: int = 3) -> str:
    text = data.decode("utf-8", "replace").strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:] if line.strip())[:500]


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


class DropSpecialMembers:
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


class ArchiveWriter:
    """Writes a directory as a ``tar`` + zstd stream (module docstring)."""

    def __init__(
        self,
        level: int = 3,
        *,
        use_zstd_binary: bool | None = None,
        use_tar_binary: bool | None = None,
    ) -> None:
        if not 1 <= level <= 22:
            raise ValueError("zstd level must be between 1 and 22")
        self.level = level
        zstd_bin = shutil.which("zstd")
        tar_bin = shutil.which("tar")
        self._zstd_bin = zstd_bin if use_zstd_binary in (None, True) else None
        self._tar_bin = tar_bin if use_tar_binary in (None, True) else None
        if use_zstd_binary and zstd_bin is None:
            raise ValueError("use_zstd_binary=True but no 'zstd' on PATH")
        if use_tar_binary and tar_bin is None:
            raise ValueError("use_tar_binary=True but no 'tar' on PATH")

    @property
    def zstd_binary(self) -> str | None:
        """The ``zstd`` binary this writer compresses with (a restore decompresses with
        it too), or None for the ``zstandard`` library."""
        return self._zstd_bin

    @staticmethod
    def check_source(key: str, source: Path) -> None:
        """Refuse a missing source directory, or one that is a symbolic link."""
        try:
            source_mode = source.lstat().st_mode
        except FileNotFoundError:
            source_mode = 0
        except OSError as exc:
            raise os_error(f"cannot snapshot {key}", exc) from exc
        if stat.S_ISLNK(source_mode):
            raise PermanentProviderError(
                f"cannot snapshot {key}: the source directory is a symbolic link, "
                "which the worker does not follow"
            )
        if not stat.S_ISDIR(source_mode):
            raise PermanentProviderError(f"cannot snapshot {key}: source directory is missing")

    def stream(self, key: str, source: Path, consume: Callable[[IO[bytes]], T]) -> T:
        """Run ``consume`` on the compressed stream of ``source`` as it is produced (a
        pipe: nothing is kept whole on disk or in memory) and return what it returns.

        The archive is written by a thread into the pipe; if ``consume`` fails, the pipe is
        closed, which stops tar and zstd, and its error is raised. If writing fails,
        ``consume`` sees the stream end early and the writer's error is raised."""
        self.check_source(key, source)
        read_fd, write_fd = os.pipe()
        reader = os.fdopen(read_fd, "rb", buffering=0)
        writer = os.fdopen(write_fd, "wb", buffering=0)
        widen_pipe(writer)
        failure: list[BaseException] = []

        def produce() -> None:
            try:
                self.write(key, source, writer)
            except BaseException as exc:
                failure.append(exc)
            finally:
                with contextlib.suppress(OSError):
                    writer.close()

        thread = threading.Thread(target=produce, name=f"snapshot-{key}", daemon=True)
        with fine_switching():
            thread.start()
            try:
                result = consume(reader)
                # Whatever consume left unread: drained so that the writer finishes.
                while reader.read(COPY_CHUNK):
                    pass
            except BaseException:
                reader.close()  # tar and zstd stop on a broken pipe
                thread.join()
                raise
            reader.close()
            thread.join()
        if failure:
            raise failure[0]
        return result

    def write(self, key: str, source: Path, out: IO[bytes]) -> None:
        """Write the compressed stream of ``source`` to ``out`` (a real file or pipe)."""
        if self._tar_bin is None:
            self._write_with_tarfile(source, out)
            return
        # No -h/--dereference, no --hard-dereference: links are stored as links.
        tar_cmd = [self._tar_bin, "-C", str(source), "--numeric-owner", "-cf", "-", "."]
        env = subprocess_env()
        with tempfile.TemporaryFile() as tar_err, tempfile.TemporaryFile() as zstd_err:
            tar = subprocess.Popen(tar_cmd, stdout=subprocess.PIPE, stderr=tar_err, env=env)
            assert tar.stdout is not None
            widen_pipe(tar.stdout)
            zstd_rc = 0
            try:
                if self._zstd_bin is not None:
                    zstd_cmd = [self._zstd_bin, "-q", f"-{self.level}", "-T0", "-c"]
                    if self.level > 19:
                        zstd_cmd.insert(1, "--ultra")
                    zstd = subprocess.Popen(
                        zstd_cmd, stdin=subprocess.PIPE, stdout=out, stderr=zstd_err, env=env
                    )
                    assert zstd.stdin is not None
                    widen_pipe(zstd.stdin)
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
                        level=self.level, threads=-1, write_checksum=True
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
        drop = DropSpecialMembers()
        fd = tar_out.fileno()
        while chunk := os.read(fd, COPY_CHUNK):  # what is there: keeps the pipeline moving
            sink.write(drop.feed(chunk))
        if rest := drop.finish():
            sink.write(rest)

    def _write_with_tarfile(self, source: Path, out: IO[bytes]) -> None:
        """Fallback when there is no ``tar`` binary: Python's tarfile, same layout
        (``add`` reads links with ``lstat``: stored as links, never followed)."""

        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            return None if info.type in _SPECIAL_TYPES else info

        cctx = zstandard.ZstdCompressor(level=self.level, threads=-1, write_checksum=True)
        with (
            cctx.stream_writer(out, closefd=False) as writer,
            tarfile.open(fileobj=writer, mode="w|", format=tarfile.GNU_FORMAT) as tf,
        ):
            tf.add(str(source), arcname=".", recursive=True, filter=keep)
