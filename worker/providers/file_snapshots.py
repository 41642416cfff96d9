"""File snapshot store: ``tar`` + zstd archives under a directory, ``file://`` URLs.

Saving writes the archive stream of :class:`~worker.providers.snapshot_archive.ArchiveWriter`
(``tar | zstd``, links stored as links and never followed, FIFOs and devices left out)
into a temporary file that is fsynced and atomically renamed to ``<root>/<key>.tar.zst``.
Restoring is :func:`worker.providers.snapshot_extract.restore`: one pass over the file
into a staging directory beside the target, every member checked as it arrives, links
made last and never written through, the staging directory renamed into place only
once the whole archive passed (on any failure it is removed: the target is left as it
was found).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit

from worker.providers import snapshot_extract
from worker.providers.base import PermanentProviderError, SnapshotInfo
from worker.providers.snapshot_archive import ArchiveWriter, os_error, show

__all__ = ["SUFFIX", "FileSnapshotStore", "key_segments"]

SUFFIX = ".tar.zst"
STALE_TEMP_SECONDS = 6 * 3600.0

_KEY_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_MAX_KEY_SEGMENTS = 8


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def key_segments(key: str) -> list[str]:
    """The segments of a snapshot key (any store): ``/``-separated, each of letters,
    digits, ``.``, ``_`` or ``-``, not starting with a dot, no ``..``."""
    segments = key.split("/") if isinstance(key, str) else []
    if (
        not segments
        or len(segments) > _MAX_KEY_SEGMENTS
        or not all(_KEY_SEGMENT.fullmatch(seg) and ".." not in seg for seg in segments)
    ):
        raise PermanentProviderError(
            f"invalid snapshot key {show(str(key))!r}: use '/'-separated segments of "
            "letters, digits, '.', '_' or '-'"
        )
    return segments


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
        self._writer = ArchiveWriter(
            level, use_zstd_binary=use_zstd_binary, use_tar_binary=use_tar_binary
        )
        self._root = Path(root).expanduser().resolve()

    @property
    def root(self) -> Path:
        return self._root

    # -- naming ----------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """Where snapshot ``key`` is stored. Keys are ``/``-separated safe segments."""
        segments = key_segments(key)
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
        self._writer.check_source(key, source)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._remove_stale_temps(final)
            fd, tmp_name = tempfile.mkstemp(
                prefix=f".{final.name}.", suffix=".tmp", dir=final.parent
            )
        except OSError as exc:
            raise os_error(f"cannot write snapshot {key}", exc) from exc
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                self._writer.write(key, source, out)
                out.flush()
                os.fsync(out.fileno())
                size = os.fstat(out.fileno()).st_size
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise os_error(f"cannot write snapshot {key}", exc) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)
        return SnapshotInfo(url=final.as_uri(), size_bytes=size, created_at=datetime.now(UTC))

    def restore(self, url: str, target_dir: Path) -> None:
        key = self.key_for(url)
        path = self.path_for(key)
        target = Path(target_dir)
        snapshot_extract.check_target(key, target)
        try:
            fh = open(path, "rb")  # noqa: SIM115 -- closed below
        except FileNotFoundError:
            raise PermanentProviderError(f"snapshot {key} not found") from None
        except OSError as exc:
            raise PermanentProviderError(f"snapshot {key} cannot be read: {exc.strerror}") from None
        with fh:
            snapshot_extract.restore(key, fh, target, zstd_binary=self._writer.zstd_binary)

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

    # -- internals -----------------------------------------------------------------

    @staticmethod
    def _remove_stale_temps(final: Path) -> None:
        """Temporary files of ``final`` left by a process killed long ago."""
        now = time.time()
        for stale in final.parent.glob(f".{final.name}.*.tmp"):
            with contextlib.suppress(OSError):
                if now - stale.stat().st_mtime > STALE_TEMP_SECONDS:
                    stale.unlink()
