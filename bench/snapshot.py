"""snapshot: saving and restoring a sandbox working tree against raw ``tar`` + ``zstd``.

Fixture: a working directory of ``snapshot_mb`` MB (the issue: 500 MB) of mixed files:
~35% source-like text in ~10 kB files (25 per directory), ~5% tiny files (1-2 kB, 20 per
directory: the node_modules shape),
~35% large compressible logs/CSV, ~25% incompressible binaries (random bytes), plus a
few symbolic links and empty directories, in nested directories.

System: :class:`worker.providers.file_snapshots.FileSnapshotStore` (level 3) ``save``
then ``restore`` into an empty directory (the worker's code: ``tar | zstd -T0`` into a
temporary file that is fsynced and renamed; restore checks every member as it
extracts it with ``O_EXCL | O_NOFOLLOW`` into a staging directory, renamed into place
once the whole archive passed).
Baseline: ``tar -C dir -cf - . | zstd -3 -T0 -c > file`` and
``zstd -d -c file | tar -C target -xf -``.

Every timed step starts after ``sync``, so dirty pages left by the step before (a
restore, the cleanup of one) are not charged to it. The system's save includes its own
``fsync`` of the archive (the store's durability); the raw pipeline has none.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import Context, Result, compare

LEVEL = 3

_WORDS = [
    "def",
    "return",
    "self",
    "value",
    "import",
    "from",
    "class",
    "for",
    "while",
    "if",
    "else",
    "elif",
    "try",
    "except",
    "with",
    "yield",
    "async",
    "await",
    "lambda",
    "none",
    "true",
    "false",
    "data",
    "result",
    "items",
    "config",
    "session",
    "sandbox",
    "snapshot",
    "restore",
    "worker",
    "request",
    "response",
    "client",
    "server",
    "index",
    "cache",
    "buffer",
    "stream",
]


def _corpus(rng: random.Random, size: int) -> bytes:
    """Source-like text: indented lines of identifiers (compresses ~4-5x with zstd -3)."""
    lines = []
    total = 0
    while total < size:
        indent = "    " * rng.randrange(0, 4)
        words = " ".join(
            rng.choice(_WORDS) + str(rng.randrange(100)) for _ in range(rng.randrange(3, 12))
        )
        line = f"{indent}{words}\n"
        lines.append(line)
        total += len(line)
    return "".join(lines).encode()


def build_tree(root: Path, total_mb: int) -> tuple[int, int]:
    """Create the fixture under ``root``; return (bytes, files)."""
    rng = random.Random(11)
    target = total_mb * 2**20
    corpus = _corpus(rng, 4 * 2**20)
    written = files = 0

    def write(path: Path, data: bytes) -> None:
        nonlocal written, files
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written += len(data)
        files += 1

    def text(size: int) -> bytes:
        start = rng.randrange(0, len(corpus) - size)
        return corpus[start : start + size]

    budget_src = target * 35 // 100
    i = 0
    while written < budget_src:
        size = rng.randrange(2_000, 18_000)
        write(
            root / "src" / f"pkg{i // 200:03d}" / f"sub{i // 25 % 8}" / f"module_{i:06d}.py",
            text(size),
        )
        i += 1
    budget_tiny = written + target * 5 // 100
    while written < budget_tiny:
        write(
            root / "node_modules" / f"dep{i // 20:04d}" / "lib" / f"f{i:06d}.js",
            text(rng.randrange(1_000, 2_000)),
        )
        i += 1
    budget_logs = written + target * 35 // 100
    n = 0
    while written < budget_logs:
        size = min(32 * 2**20, budget_logs - written)
        rows = []
        length = 0
        k = 0
        while length < size:
            row = f"2026-11-28T12:{k // 60 % 60:02d}:{k % 60:02d}Z,session-{rng.randrange(1000)},event={rng.choice(_WORDS)},value={rng.random():.6f}\n"
            rows.append(row)
            length += len(row)
            k += 1
        write(root / "data" / f"events_{n:02d}.csv", "".join(rows).encode()[:size])
        n += 1
    n = 0
    while written < target:
        size = min(8 * 2**20, target - written)
        write(root / "assets" / f"blob_{n:03d}.bin", rng.randbytes(size))
        n += 1
    for k in range(20):
        link = root / "links" / f"link_{k}"
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(f"../src/pkg{k:02d}", link)
        (root / "empty" / f"dir_{k}").mkdir(parents=True, exist_ok=True)
    return written, files


def _tar_zstd(source: Path, archive: Path) -> None:
    with archive.open("wb") as out:
        tar = subprocess.Popen(["tar", "-C", str(source), "-cf", "-", "."], stdout=subprocess.PIPE)
        assert tar.stdout is not None
        zstd = subprocess.Popen(
            ["zstd", "-q", f"-{LEVEL}", "-T0", "-c"], stdin=tar.stdout, stdout=out
        )
        tar.stdout.close()
        if zstd.wait() != 0 or tar.wait() != 0:
            raise RuntimeError("tar | zstd failed")


def _unzstd_tar(archive: Path, target: Path) -> None:
    target.mkdir(parents=True)
    zstd = subprocess.Popen(["zstd", "-d", "-q", "-c", str(archive)], stdout=subprocess.PIPE)
    assert zstd.stdout is not None
    tar = subprocess.Popen(["tar", "-C", str(target), "-xf", "-"], stdin=zstd.stdout)
    zstd.stdout.close()
    if tar.wait() != 0 or zstd.wait() != 0:
        raise RuntimeError("zstd -d | tar -x failed")


def run(ctx: Context) -> list[Result]:
    from worker.providers.file_snapshots import FileSnapshotStore

    sizes = ctx.sizes
    base = ctx.work / "snapshot"
    source = base / "sandbox"
    started = time.monotonic()
    nbytes, nfiles = build_tree(source, sizes.snapshot_mb)
    ctx.log(
        f"snapshot: fixture {nbytes / 2**20:.0f} MB in {nfiles:,} files built in {time.monotonic() - started:.1f}s"
    )
    store = FileSnapshotStore(base / "store", level=LEVEL)
    raw_archive = base / "raw.tar.zst"
    restored = base / "restored"

    def clean() -> None:
        shutil.rmtree(restored, ignore_errors=True)

    def settle() -> None:
        # Write back what the previous (untimed or other-side) step left dirty, so it is
        # not charged to the next timed step.
        os.sync()

    def sys_save(k: int) -> tuple[float, str]:
        settle()
        t = time.perf_counter()
        info = store.save(f"bench-{k}", source)
        return time.perf_counter() - t, info.url

    def sys_restore(url: str) -> float:
        clean()
        settle()
        t = time.perf_counter()
        store.restore(url, restored)
        return time.perf_counter() - t

    def raw_save() -> float:
        settle()
        t = time.perf_counter()
        _tar_zstd(source, raw_archive)
        return time.perf_counter() - t

    def raw_restore() -> float:
        clean()
        settle()
        t = time.perf_counter()
        _unzstd_tar(raw_archive, restored)
        return time.perf_counter() - t

    sys_save_t: list[float] = []
    raw_save_t: list[float] = []
    sys_rest_t: list[float] = []
    raw_rest_t: list[float] = []
    raw_save()  # warm-up: page cache, binaries
    for r in range(sizes.snapshot_rounds):
        if r % 2:
            raw_save_t.append(raw_save())
            elapsed, url = sys_save(r)
            sys_save_t.append(elapsed)
            raw_rest_t.append(raw_restore())
            sys_rest_t.append(sys_restore(url))
        else:
            elapsed, url = sys_save(r)
            sys_save_t.append(elapsed)
            raw_save_t.append(raw_save())
            sys_rest_t.append(sys_restore(url))
            raw_rest_t.append(raw_restore())
        store.delete(url)
        clean()
    archive_mb = raw_archive.stat().st_size / 2**20
    shutil.rmtree(base, ignore_errors=True)
    size = f"{nbytes / 2**20:,.0f} MB, {nfiles:,} files (→ {archive_mb:,.0f} MB)"
    return [
        compare("snapshot", "save time", "s", sys_save_t, raw_save_t, "<= 1.3", size),
        compare("snapshot", "restore time", "s", sys_rest_t, raw_rest_t, "<= 1.3", size),
    ]
