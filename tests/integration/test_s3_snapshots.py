"""S3SnapshotStore against a real S3 API on loopback (moto in server mode, over HTTP),
real tar and real zstd: round trips, multipart, the recorded SHA-256, hostile archives,
idempotent retries, deletion."""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import MotoS3
from tests.support.snapshots import (
    LATE_HOSTILE,
    MALICIOUS,
    StagingSpy,
    assert_nothing_written,
    corruptions,
    git,
    make_workdir,
    make_writable,
    manifest,
    many_good_members,
    zstd_bytes,
)
from worker.config import Settings
from worker.providers.base import (
    PermanentProviderError,
    ProviderError,
    SnapshotStore,
    TransientProviderError,
)
from worker.providers.git import subprocess_env
from worker.providers.registry import build_snapshot_store
from worker.providers.s3_snapshots import MIN_PART_SIZE, S3SnapshotStore


@pytest.fixture
def store(s3_server: MotoS3, s3_bucket: str) -> S3SnapshotStore:
    return S3SnapshotStore(s3_bucket, "snaps", client=s3_server.client())


def _objects(store: S3SnapshotStore) -> list[str]:
    listing = store.client.list_objects_v2(Bucket=store.bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _uploads(store: S3SnapshotStore) -> list[Any]:
    return list(store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []))


def _put(store: S3SnapshotStore, key: str, blob: bytes, *, record: bytes | None = None) -> str:
    """Store ``blob`` as snapshot ``key`` with a matching checksum record (or ``record``)."""
    obj = store.object_key(key)
    store.client.put_object(Bucket=store.bucket, Key=obj, Body=blob)
    if record is None:
        record = json.dumps(
            {"sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        ).encode()
    store.client.put_object(Bucket=store.bucket, Key=obj + ".sha256", Body=record)
    return store.url_for(key)


def _object_bytes(store: S3SnapshotStore, key: str) -> bytes:
    body = store.client.get_object(Bucket=store.bucket, Key=store.object_key(key))["Body"]
    data: bytes = body.read()
    return data


def test_implements_protocol_and_is_shared(store: S3SnapshotStore) -> None:
    assert isinstance(store, SnapshotStore)
    assert store.kind == "s3"
    assert store.shared is True


def test_round_trip_is_byte_for_byte(store: S3SnapshotStore, tmp_path: Path) -> None:
    work = make_workdir(tmp_path)  # git repo, links (absolute, dangling), hard link, FIFO
    status_before = git("status", "--porcelain", cwd=work)
    before = manifest(work)

    info = store.save("sess-1/snap-1", work)
    assert info.url == f"s3://{store.bucket}/snaps/sess-1/snap-1.tar.zst"
    head = store.client.head_object(Bucket=store.bucket, Key="snaps/sess-1/snap-1.tar.zst")
    assert info.size_bytes == head["ContentLength"] > 0
    record = json.loads(
        store.client.get_object(Bucket=store.bucket, Key="snaps/sess-1/snap-1.tar.zst.sha256")[
            "Body"
        ].read()
    )
    blob = _object_bytes(store, "sess-1/snap-1")
    assert record["sha256"] == hashlib.sha256(blob).hexdigest()
    assert record["size"] == len(blob)

    target = tmp_path / "restored"
    store.restore(info.url, target)
    after = manifest(target)
    assert before.pop("pipe")[0] == "fifo"
    assert after == before  # everything but the FIFO, which snapshots leave out
    assert (target / "src" / "app.py").stat().st_ino == (target / "hardlinked.py").stat().st_ino
    assert git("status", "--porcelain", cwd=target) == status_before
    make_writable(work)
    make_writable(target)


def test_a_big_file_goes_up_in_several_parts(
    s3_server: MotoS3, s3_bucket: str, tmp_path: Path
) -> None:
    store = S3SnapshotStore(s3_bucket, "", client=s3_server.client(), part_size=MIN_PART_SIZE)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    blob = os.urandom(2 * MIN_PART_SIZE + 123_457)  # incompressible: three parts
    (src / "sub" / "big.bin").write_bytes(blob)
    (src / "small.txt").write_text("small\n")
    os.symlink("sub/big.bin", src / "link")

    info = store.save("big", src)
    assert info.url == f"s3://{s3_bucket}/big.tar.zst"
    head = store.client.head_object(Bucket=s3_bucket, Key="big.tar.zst", PartNumber=1)
    assert head["PartsCount"] == 3
    assert info.size_bytes > len(blob)
    assert _uploads(store) == []

    target = tmp_path / "restored"
    store.restore(info.url, target)
    assert (target / "sub" / "big.bin").read_bytes() == blob
    assert os.readlink(target / "link") == "sub/big.bin"
    assert manifest(target) == manifest(src)


@pytest.mark.parametrize("case", ["flipped-byte", "half", "trailing-junk", "random", "empty"])
def test_a_damaged_object_is_refused_and_nothing_is_extracted(
    store: S3SnapshotStore, tmp_path: Path, case: str
) -> None:
    src = tmp_path / "good-src"
    src.mkdir()
    (src / "a.txt").write_bytes(os.urandom(20000))
    (src / "b.txt").write_text("b" * 5000)
    info = store.save("good", src)
    damaged = corruptions(_object_bytes(store, "good"))[case]
    # The object is overwritten behind the store's back; its checksum record stays.
    store.client.put_object(Bucket=store.bucket, Key=store.object_key("good"), Body=damaged)
    target = tmp_path / "target"
    with pytest.raises(PermanentProviderError) as err:
        store.restore(info.url, target)
    message = str(err.value)
    assert message.startswith("snapshot good is corrupt: "), message
    assert "nothing was restored" in message
    if case == "flipped-byte":
        assert "SHA-256 does not match the one recorded" in message
    else:
        assert "bytes where" in message and "were saved (truncated or replaced)" in message
    assert not target.exists()


def test_a_damaged_object_leaves_an_existing_empty_target_as_it_was(
    store: S3SnapshotStore, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a" * 100_000)
    info = store.save("k", src)
    blob = bytearray(_object_bytes(store, "k"))
    blob[-10] ^= 0x01
    store.client.put_object(Bucket=store.bucket, Key=store.object_key("k"), Body=bytes(blob))
    target = tmp_path / "target"
    target.mkdir(mode=0o750)
    with pytest.raises(PermanentProviderError, match="SHA-256 does not match"):
        store.restore(info.url, target)
    assert list(target.iterdir()) == []


def test_an_object_without_a_checksum_record_is_refused(
    store: S3SnapshotStore, tmp_path: Path
) -> None:
    url = _put(store, "bare", zstd_bytes(b"\0" * 1024))
    store.client.delete_object(Bucket=store.bucket, Key=store.object_key("bare") + ".sha256")
    with pytest.raises(PermanentProviderError, match="no SHA-256 was recorded"):
        store.restore(url, tmp_path / "t")
    bad = _put(store, "garbled", b"x", record=b"{not json")
    with pytest.raises(PermanentProviderError, match="recorded SHA-256 is unreadable"):
        store.restore(bad, tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_hostile_archive_is_refused(
    store: S3SnapshotStore, tmp_path: Path, outside: Path, case: str
) -> None:
    """The file store's hostile cases, as objects whose checksum matches: the archive
    itself is refused, by the same validation pass."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in MALICIOUS[case](str(outside)):
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    url = _put(store, "evil", zstd_bytes(buf.getvalue()))
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    before = manifest(tmp_path)
    with pytest.raises(PermanentProviderError, match="snapshot evil refused: member '"):
        store.restore(url, parent / "target")
    assert_nothing_written(tmp_path, parent, outside, before)


def _many_files(root: Path, count: int = 200) -> Path:
    for i in range(count):
        (root / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 5}" / f"f{i}.bin").write_bytes(os.urandom(600))  # incompressible
    os.symlink("d0/f0.bin", root / "link")
    return root


@pytest.mark.parametrize("existing", [False, True], ids=["missing-target", "empty-target"])
@pytest.mark.parametrize("case", ["last-bytes-flipped", "record-of-another-archive"])
def test_damage_found_only_at_the_end_of_the_stream_leaves_the_target_untouched(
    store: S3SnapshotStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    existing: bool,
) -> None:
    """The object has the recorded size, so the restore streams it: the damage shows
    only at the end (the zstd frame's checksum, or only the SHA-256 when the object is
    a whole valid archive other than the one recorded), after the files were written
    into the staging directory. It goes; the target stays as found; no link was made."""
    info = store.save("k", _many_files(tmp_path / "src"))
    obj = store.object_key("k")
    blob = _object_bytes(store, "k")
    if case == "last-bytes-flipped":
        damaged = bytearray(blob)
        damaged[-2] ^= 0x5A
        store.client.put_object(Bucket=store.bucket, Key=obj, Body=bytes(damaged))
    else:
        record = {"sha256": hashlib.sha256(b"another archive").hexdigest(), "size": len(blob)}
        store.client.put_object(Bucket=store.bucket, Key=obj + ".sha256", Body=json.dumps(record))
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    target = parent / "target"
    if existing:
        target.mkdir(mode=0o750)
    spy = StagingSpy(monkeypatch)
    with pytest.raises(PermanentProviderError) as err:
        store.restore(info.url, target)
    assert str(err.value) == (
        "snapshot k is corrupt: its SHA-256 does not match the one recorded when it was "
        "saved (the stored object is damaged or was replaced); nothing was restored"
    )
    [(staging, held)] = spy.removed
    assert staging.parent == parent and held >= 100
    if case == "record-of-another-archive":  # every file written, not one link made
        assert held == 200
    if existing:
        assert [p.name for p in parent.iterdir()] == ["target"]
        assert list(target.iterdir()) == []
        assert stat.S_IMODE(target.stat().st_mode) == 0o750
    else:
        assert list(parent.iterdir()) == []


def test_a_truncated_object_is_refused_before_it_is_read(
    store: S3SnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its length (the response's) differs from the record: refused at once."""
    info = store.save("k", _many_files(tmp_path / "src", 20))
    blob = _object_bytes(store, "k")
    store.client.put_object(Bucket=store.bucket, Key=store.object_key("k"), Body=blob[:-1])
    spy = StagingSpy(monkeypatch)
    with pytest.raises(PermanentProviderError, match="truncated or replaced"):
        store.restore(info.url, tmp_path / "t")
    assert spy.removed == [] and not (tmp_path / "t").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize("case", sorted(LATE_HOSTILE))
def test_a_hostile_member_late_in_the_archive_leaves_nothing_behind(
    store: S3SnapshotStore,
    tmp_path: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
) -> None:
    """An object with a matching SHA-256: hundreds of good files reach the staging
    directory before the hostile member does; all of it goes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for info, data in many_good_members() + LATE_HOSTILE[case](str(outside)):
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    url = _put(store, "evil", zstd_bytes(buf.getvalue()))
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    before = manifest(tmp_path)
    spy = StagingSpy(monkeypatch)
    with pytest.raises(PermanentProviderError, match="snapshot evil refused: member '"):
        store.restore(url, parent / "target")
    [(staging, held)] = spy.removed
    assert staging.parent == parent and held >= 300
    assert_nothing_written(tmp_path, parent, outside, before)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    out = tmp_path / "outside"
    out.mkdir()
    (out / "sentinel.txt").write_text("original\n")
    return out


def test_a_retried_save_writes_the_same_object(store: S3SnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first")
    first = store.save("session-run", src)
    (src / "a.txt").write_text("second, longer")
    second = store.save("session-run", src)  # the same run retried: the same key
    assert first.url == second.url
    assert store.count() == 1
    assert _objects(store) == ["snaps/session-run.tar.zst", "snaps/session-run.tar.zst.sha256"]
    assert _uploads(store) == []
    store.restore(second.url, tmp_path / "out")
    assert (tmp_path / "out" / "a.txt").read_text() == "second, longer"


class _FailingClient:
    """The real client, except that upload_part fails from part ``fail_at`` on."""

    def __init__(self, client: Any, fail_at: int) -> None:
        self._client = client
        self.fail_at = fail_at

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def upload_part(self, **kwargs: Any) -> Any:
        if kwargs["PartNumber"] >= self.fail_at:
            from botocore.exceptions import EndpointConnectionError

            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return self._client.upload_part(**kwargs)


def test_a_failed_upload_is_aborted(s3_server: MotoS3, s3_bucket: str, tmp_path: Path) -> None:
    real = s3_server.client()
    store = S3SnapshotStore(s3_bucket, "p", client=_FailingClient(real, 2), part_size=MIN_PART_SIZE)
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.bin").write_bytes(os.urandom(3 * MIN_PART_SIZE))
    with pytest.raises(TransientProviderError, match="cannot write snapshot k"):
        store.save("k", src)
    assert _uploads(store) == []  # aborted, no parts left behind
    assert _objects(store) == []
    assert store.count() == 0


def test_count_delete_and_missing(store: S3SnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    assert store.count() == 0
    one = store.save("s/1", src)
    store.save("s/2", src)
    assert store.count() == 2
    store.delete(one.url)
    store.delete(one.url)  # idempotent
    assert store.count() == 1
    assert _objects(store) == ["snaps/s/2.tar.zst", "snaps/s/2.tar.zst.sha256"]
    with pytest.raises(PermanentProviderError, match="snapshot s/1 not found"):
        store.restore(one.url, tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    "url",
    [
        "file:///tmp/x.tar.zst",
        "s3://other-bucket/snaps/k.tar.zst",
        "s3://{bucket}/elsewhere/k.tar.zst",
        "s3://{bucket}/snaps/k.tar",
        "s3://{bucket}/snaps/../k.tar.zst",
        "s3://{bucket}/snaps/k.tar.zst?versionId=1",
    ],
)
def test_foreign_urls_are_refused(store: S3SnapshotStore, tmp_path: Path, url: str) -> None:
    with pytest.raises(PermanentProviderError, match="not an s3:// URL of this store"):
        store.restore(url.format(bucket=store.bucket), tmp_path / "t")


def test_a_missing_bucket_is_a_permanent_error(s3_server: MotoS3, tmp_path: Path) -> None:
    store = S3SnapshotStore("no-such-bucket-here", client=s3_server.client())
    (tmp_path / "src").mkdir()
    with pytest.raises(PermanentProviderError, match="NoSuchBucket"):
        store.save("k", tmp_path / "src")


def test_settings_pick_the_store(s3_server: MotoS3, s3_bucket: str, tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        snapshot_store=f"s3://{s3_bucket}/a/b",
        s3_endpoint_url=s3_server.endpoint_url,
    )
    store = build_snapshot_store(settings)
    assert isinstance(store, S3SnapshotStore)
    assert (store.bucket, store.prefix, store.shared) == (s3_bucket, "a/b", True)
    assert build_snapshot_store(Settings(data_dir=tmp_path)).kind == "file"
    for bad in ("s3://", "s3:///x", "gs://b/p", "s3://b/../p", "files"):
        with pytest.raises(ValueError):
            Settings(snapshot_store=bad)


def test_aws_credentials_never_reach_tar_or_zstd(s3_server: MotoS3) -> None:
    assert os.environ["AWS_SECRET_ACCESS_KEY"]  # set by the s3_server fixture
    assert not [k for k in subprocess_env() if k.startswith("AWS_")]


def test_provider_errors_carry_no_secret(s3_server: MotoS3, s3_bucket: str, tmp_path: Path) -> None:
    store = S3SnapshotStore(s3_bucket, client=s3_server.client())
    with pytest.raises(ProviderError) as err:
        store.restore(store.url_for("nope"), tmp_path / "t")
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(err.value)
