"""snapshot_s3: the S3 snapshot store against raw boto3 over the same ``tar | zstd``.

Fixture: the ``snapshot`` benchmark's tree (``snapshot_mb`` MB of mixed files).
S3: moto in server mode on a loopback port (a real S3 API over HTTP, in its own
process); the same boto3 client settings on both sides.

System: :class:`worker.providers.s3_snapshots.S3SnapshotStore` (level 3, 8 MiB parts)
``save`` then ``restore`` into an empty directory: the stream uploaded part by part with
its SHA-256 recorded; the restore is one download (the ``.sha256`` record fetched
alongside), hashed by a thread as it feeds ``zstd -d``, every member checked as it is
read (``worker.providers.tar_stream``) and written into a staging directory, the SHA-256 checked at
the end of the stream, then links and the rename into place.
Baseline: ``tar -cf - . | zstd -3 -T0`` uploaded with boto3's ``upload_fileobj`` (8 MiB
parts), and ``get_object`` streamed into ``zstd -d | tar -xf -``.

Both sides restore into a directory on tmpfs (``/dev/shm``, when it has room): what is
compared is the store's pipeline against boto3's, and the disk's writeback of 35,000 new
files (which made the same round take 18 to 70 s on either side) is not part of either.
The ``snapshot`` benchmark restores onto the disk.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Context, Result, compare
from bench.snapshot import LEVEL, build_tree

PART = 8 * 2**20


def _start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    for _ in range(600):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, f"http://127.0.0.1:{port}"
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    raise RuntimeError(f"moto server did not start; see {log}")


def _raw_save(client: Any, bucket: str, source: Path, key: str) -> None:
    from boto3.s3.transfer import TransferConfig

    tar = subprocess.Popen(["tar", "-C", str(source), "-cf", "-", "."], stdout=subprocess.PIPE)
    assert tar.stdout is not None
    zstd = subprocess.Popen(
        ["zstd", "-q", f"-{LEVEL}", "-T0", "-c"], stdin=tar.stdout, stdout=subprocess.PIPE
    )
    assert zstd.stdout is not None
    tar.stdout.close()
    config = TransferConfig(multipart_threshold=PART, multipart_chunksize=PART)
    client.upload_fileobj(zstd.stdout, bucket, key, Config=config)
    if zstd.wait() != 0 or tar.wait() != 0:
        raise RuntimeError("tar | zstd failed")


def _raw_restore(client: Any, bucket: str, key: str, target: Path) -> None:
    target.mkdir(parents=True)
    zstd = subprocess.Popen(
        ["zstd", "-d", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert zstd.stdin is not None and zstd.stdout is not None
    tar = subprocess.Popen(["tar", "-C", str(target), "-xf", "-"], stdin=zstd.stdout)
    zstd.stdout.close()
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    while chunk := body.read(2**20):
        zstd.stdin.write(chunk)
    zstd.stdin.close()
    if tar.wait() != 0 or zstd.wait() != 0:
        raise RuntimeError("zstd -d | tar -x failed")


def _restore_scratch(base: Path, nbytes: int) -> Path:
    """A directory on tmpfs with room for two restored trees, else ``base`` (the disk)."""
    shm = Path("/dev/shm")
    try:
        if shutil.disk_usage(shm).free > 3 * nbytes:
            return Path(tempfile.mkdtemp(prefix="bench-snapshot-s3-", dir=shm))
    except OSError:
        pass
    return base


def run(ctx: Context) -> list[Result]:
    from worker.providers.s3_snapshots import S3SnapshotStore

    for var, value in {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ.setdefault(var, value)
    base = ctx.work / "snapshot_s3"
    source = base / "sandbox"
    nbytes, nfiles = build_tree(source, ctx.sizes.snapshot_mb)
    scratch = _restore_scratch(base, nbytes)
    proc, endpoint = _start_moto(base / "moto.log")
    try:
        client = S3SnapshotStore.make_client(endpoint)
        client.create_bucket(Bucket="bench")
        store = S3SnapshotStore("bench", "sys", client=client, part_size=PART, level=LEVEL)
        restored = scratch / "restored"
        times: dict[str, list[float]] = {k: [] for k in ("ss", "rs", "sr", "rr")}

        def timed(label: str, fn: Any, *args: Any) -> Any:
            shutil.rmtree(restored, ignore_errors=True)
            os.sync()
            t = time.perf_counter()
            out = fn(*args)
            times[label].append(time.perf_counter() - t)
            return out

        _raw_save(client, "bench", source, "warm.tar.zst")  # warm-up
        for r in range(ctx.sizes.snapshot_rounds):
            order = [("s", "r"), ("r", "s")][r % 2]
            url = ""
            for side in order:
                if side == "s":
                    url = timed("ss", store.save, f"bench-{r}", source).url
                else:
                    timed("rs", _raw_save, client, "bench", source, f"raw-{r}.tar.zst")
            for side in order:
                if side == "s":
                    timed("sr", store.restore, url, restored)
                else:
                    timed("rr", _raw_restore, client, "bench", f"raw-{r}.tar.zst", restored)
            store.delete(url)
        size_mb = client.head_object(Bucket="bench", Key="raw-0.tar.zst")["ContentLength"] / 2**20
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)
    into = "tmpfs" if scratch != base else "disk"
    size = f"{nbytes / 2**20:,.0f} MB, {nfiles:,} files (→ {size_mb:,.0f} MB), moto, into {into}"
    return [
        compare("snapshot_s3", "save time", "s", times["ss"], times["rs"], "<= 1.3", size),
        compare("snapshot_s3", "restore time", "s", times["sr"], times["rr"], "<= 1.3", size),
    ]
