"""S3 snapshot store: the same ``tar`` + zstd archives, in S3-compatible object storage.

``LIFECYCLE_SNAPSHOT_STORE=s3://bucket/prefix``. Every worker host reads the same
bucket, so the store is ``shared``: a session hibernated on one host can resume on any.

**Saving** streams the archive of :class:`~worker.providers.snapshot_archive.ArchiveWriter`
(links stored as links, FIFOs and devices left out) straight into a multipart upload:
the compressed stream is read from a pipe in parts of ``part_size`` bytes and each part
is uploaded as soon as it is full (a few parts in flight at most), so no whole copy is
ever kept on disk or in memory. A SHA-256 and the size are computed on the way and
recorded beside the object in ``<object>.sha256`` (a multipart upload's metadata is set
before its content is known, and not every S3-compatible service has object tags). On
any failure the multipart upload is aborted. The object key is
``<prefix>/<key>.tar.zst`` and the key holds the run id, so a retried save writes the
same object again: one snapshot per run, whatever the retries.

**Restoring** is one download, streamed through
:func:`worker.providers.snapshot_extract.restore`: SHA-256 and size computed as the
bytes arrive (by the thread that feeds the ``zstd`` binary) → zstd → tar, every member
checked as it arrives and written into a staging directory beside the target. The ``.sha256`` record is fetched at the same time
as the object (one round trip before the first byte) and an object whose length differs
from the record is refused before its first byte is read. Only when the stream has
ended, its SHA-256 and size match the record and every member passed are the links made
and the staging directory renamed into place: a truncated, damaged or replaced object
(even in its last bytes) or a hostile member (even after many good ones) fails the
restore with a clear error and the target is left untouched, the staging directory
removed.

Credentials, region and endpoint come from boto3's standard chain (``AWS_*`` variables,
profiles, instance roles); ``LIFECYCLE_S3_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL``)
points at MinIO or another S3-compatible service. boto3 runs in the worker process:
tar and zstd get the allow-listed environment, never the credentials.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NoReturn
from urllib.parse import urlsplit

from worker.providers import snapshot_extract
from worker.providers.base import (
    PermanentProviderError,
    ProviderError,
    SnapshotInfo,
    TransientProviderError,
)
from worker.providers.file_snapshots import SUFFIX, key_segments
from worker.providers.snapshot_archive import ArchiveWriter, show

__all__ = ["DEFAULT_PART_SIZE", "MIN_PART_SIZE", "S3SnapshotStore", "parse_s3_url"]

MIB = 1 << 20
#: S3 refuses parts under 5 MiB (except the last).
MIN_PART_SIZE = 5 * MIB
DEFAULT_PART_SIZE = 8 * MIB
#: Parts uploaded at once while the next one is read: memory is (this + 1) parts.
DEFAULT_IN_FLIGHT = 2
CHECKSUM_SUFFIX = ".sha256"
#: Multipart uploads of a key older than this were left by a killed worker: aborted.
STALE_UPLOAD = timedelta(hours=6)
_READ_CHUNK = MIB

# S3 error codes retrying cannot fix (the rest, 5xx and throttling, may pass).
_PERMANENT_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "InvalidBucketName",
        "NoSuchBucket",
        "SignatureDoesNotMatch",
        "InvalidRequest",
        "InvalidArgument",
        "EntityTooLarge",
        "EntityTooSmall",
        "AuthorizationHeaderMalformed",
        "InvalidPart",
        "InvalidPartOrder",
        "NoSuchUpload",
        "KMS.DisabledException",
    }
)


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` as (bucket, prefix without slashes at either end)."""
    parts = urlsplit(url) if isinstance(url, str) else None
    if parts is None or parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(f"not an s3://bucket/prefix URL: {show(str(url))!r}")
    prefix = parts.path.strip("/")
    if prefix:
        try:
            key_segments(prefix)  # the same safe segments as snapshot keys
        except PermanentProviderError:
            raise ValueError(f"not a safe prefix in {show(url)!r}: {prefix!r}") from None
    return parts.netloc, prefix


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return 0


def _provider_error(what: str, exc: BaseException) -> ProviderError:
    """A boto3/botocore failure as a provider error (messages carry no credentials:
    botocore never puts them in one)."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | NoRegionError):
        return PermanentProviderError(f"{what}: S3 is not configured: {exc}")
    if isinstance(exc, ClientError):
        code, status = _error_code(exc), _status(exc)
        if code in _PERMANENT_CODES or status in (400, 401, 403, 404, 405, 411, 413):
            return PermanentProviderError(f"{what}: S3 said {code or status}: {exc}")
        return TransientProviderError(f"{what}: S3 said {code or status}: {exc}")
    if isinstance(exc, BotoCoreError | OSError):
        return TransientProviderError(f"{what}: {exc}")
    return PermanentProviderError(f"{what}: {type(exc).__name__}: {exc}")


class _VerifiedBody:
    """A download stream that hashes what it hands out and reads the service's response
    in big chunks (the archive reader asks for small ones)."""

    def __init__(self, body: Any, key: str, expected_sha: str, expected_size: int) -> None:
        self._body = body
        self._key = key
        self._expected_sha = expected_sha
        self._expected_size = expected_size
        self._sha = hashlib.sha256()
        self._buf = b""
        self._pos = 0
        self._size = 0
        self._eof = False

    def read(self, size: int = -1, /) -> bytes:
        if self._pos >= len(self._buf) and not self._eof:
            self._buf = self._body.read(max(size, _READ_CHUNK))
            self._pos = 0
            if not self._buf:
                self._eof = True
            self._sha.update(self._buf)
            self._size += len(self._buf)
        end = len(self._buf) if size < 0 else min(len(self._buf), self._pos + size)
        out = self._buf[self._pos : end]
        self._pos = end
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()

    def mismatch(self) -> str | None:
        """Read what is left, then say how the stream differs from the record, if it does."""
        while not self._eof:
            self._pos = len(self._buf)
            self.read(_READ_CHUNK)
        if self._size != self._expected_size:
            return _size_problem(self._size, self._expected_size)
        if not hmac.compare_digest(self._sha.hexdigest(), self._expected_sha):
            return (
                "its SHA-256 does not match the one recorded when it was saved "
                "(the stored object is damaged or was replaced)"
            )
        return None

    def damage(self) -> str | None:
        """:meth:`mismatch` after a failed restore: None also when the rest of the
        stream cannot be read (the failure that stopped the restore is the news)."""
        try:
            return self.mismatch()
        except Exception:
            return None

    def verify(self) -> None:
        problem = self.mismatch()
        if problem is not None:
            raise PermanentProviderError(
                f"snapshot {self._key} is corrupt: {problem}; nothing was restored"
            )


class S3SnapshotStore:
    """:class:`~worker.providers.base.SnapshotStore` over objects in an S3 bucket."""

    kind = "s3"
    shared = True  # every worker host reads the same bucket

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        endpoint_url: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        in_flight: int = DEFAULT_IN_FLIGHT,
        level: int = 3,
        use_zstd_binary: bool | None = None,
        use_tar_binary: bool | None = None,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        if in_flight < 1:
            raise ValueError("in_flight must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self._in_flight = in_flight
        self._writer = ArchiveWriter(
            level, use_zstd_binary=use_zstd_binary, use_tar_binary=use_tar_binary
        )
        self._client = client if client is not None else self.make_client(endpoint_url)

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> S3SnapshotStore:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, **kwargs)

    @staticmethod
    def make_client(endpoint_url: str | None = None) -> Any:
        """An S3 client from boto3's standard chain; ``endpoint_url`` (else
        ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, read by botocore itself) for an
        S3-compatible service, addressed path-style (what MinIO and most others need)."""
        import boto3
        from botocore.config import Config

        session = boto3.session.Session()
        custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3")
        custom = custom or os.environ.get("AWS_ENDPOINT_URL")
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            s3={"addressing_style": "path" if custom else "auto"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=DEFAULT_IN_FLIGHT * 4 + 4,
        )
        return session.client(
            "s3",
            endpoint_url=endpoint_url or None,
            region_name=session.region_name or "us-east-1",
            config=config,
        )

    @property
    def client(self) -> Any:
        return self._client

    # -- naming ----------------------------------------------------------------------

    def object_key(self, key: str) -> str:
        """The object holding snapshot ``key``."""
        name = "/".join(key_segments(key)) + SUFFIX
        return f"{self.prefix}/{name}" if self.prefix else name

    def url_for(self, key: str) -> str:
        return f"s3://{self.bucket}/{self.object_key(key)}"

    def key_for(self, url: str) -> str:
        """The key of an ``s3://`` URL of this store (refuses anything else)."""
        parts = urlsplit(url) if isinstance(url, str) else None
        refused = PermanentProviderError("snapshot URL is not an s3:// URL of this store")
        if parts is None or parts.scheme != "s3" or parts.netloc != self.bucket:
            raise refused
        path = parts.path.lstrip("/")
        lead = f"{self.prefix}/" if self.prefix else ""
        if not path.startswith(lead) or not path.endswith(SUFFIX) or parts.query:
            raise refused
        key = path[len(lead) : -len(SUFFIX)]
        try:
            if self.object_key(key) != path:
                raise refused
        except PermanentProviderError:
            raise refused from None
        return key

    # -- SnapshotStore -------------------------------------------------------------

    def save(self, key: str, source_dir: Path) -> SnapshotInfo:
        obj = self.object_key(key)
        source = Path(source_dir)
        self._writer.check_source(key, source)
        what = f"cannot write snapshot {key}"
        upload: dict[str, Any] = {}  # the multipart upload, once one is started
        try:
            digest, size, parts = self._writer.stream(
                key, source, lambda pipe: self._upload(obj, pipe, upload)
            )
            # Only now is the stream known to be whole (tar and zstd succeeded).
            if "id" in upload:
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=obj,
                    UploadId=upload["id"],
                    MultipartUpload={"Parts": parts},
                )
            else:  # smaller than one part: one request
                self._client.put_object(Body=upload["data"], **self._object_args(obj))
        except BaseException as exc:
            if "id" in upload:
                with contextlib.suppress(Exception):
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=obj, UploadId=upload["id"]
                    )
            if isinstance(exc, Exception):
                raise _provider_error(what, exc) from None
            raise
        record = {"sha256": digest, "size": size, "format": "tar+zstd", "parts": max(len(parts), 1)}
        try:
            self._client.put_object(
                Bucket=self.bucket,
                Key=obj + CHECKSUM_SUFFIX,
                Body=json.dumps(record).encode(),
                ContentType="application/json",
            )
        except Exception as exc:
            raise _provider_error(what, exc) from None
        return SnapshotInfo(url=self.url_for(key), size_bytes=size, created_at=datetime.now(UTC))

    def restore(self, url: str, target_dir: Path) -> None:
        key = self.key_for(url)
        obj = self.object_key(key)
        target = Path(target_dir)
        snapshot_extract.check_target(key, target)
        body = self._open(key, obj)
        try:
            snapshot_extract.restore(
                key, body, target, verify=body.verify, zstd_binary=self._writer.zstd_binary
            )
        except PermanentProviderError:
            problem = body.damage()  # a damaged object: say that, not what it broke
            if problem is not None:
                raise PermanentProviderError(
                    f"snapshot {key} is corrupt: {problem}; nothing was restored"
                ) from None
            raise
        except ProviderError:
            raise
        except Exception as exc:  # the download failed half-way
            raise _provider_error(f"cannot restore snapshot {key}", exc) from None
        finally:
            body.close()

    def delete(self, url: str) -> None:
        obj = self.object_key(self.key_for(url))
        try:
            self._client.delete_objects(
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": obj}, {"Key": obj + CHECKSUM_SUFFIX}], "Quiet": True},
            )
        except Exception as exc:
            raise _provider_error(f"cannot delete snapshot {url}", exc) from None

    def count(self) -> int:
        lead = f"{self.prefix}/" if self.prefix else ""
        total = 0
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=lead
            )
            for page in pages:
                total += sum(1 for o in page.get("Contents", []) if o["Key"].endswith(SUFFIX))
        except Exception as exc:
            raise _provider_error("cannot list snapshots", exc) from None
        return total

    # -- internals -----------------------------------------------------------------

    def _object_args(self, obj: str) -> dict[str, Any]:
        return {
            "Bucket": self.bucket,
            "Key": obj,
            "ContentType": "application/zstd",
            "Metadata": {"format": "tar+zstd"},
        }

    def _upload(
        self, obj: str, pipe: IO[bytes], upload: dict[str, Any]
    ) -> tuple[str, int, list[dict[str, Any]]]:
        """Consume the stream: a stream shorter than one part is kept (``upload["data"]``,
        sent with one PUT once the stream is known whole); a longer one goes up as a
        multipart upload (``upload["id"]``), part by part. Returns the SHA-256, the size
        and the parts."""
        first = _read_full(pipe, self.part_size)
        if len(first) < self.part_size:
            upload["data"] = first
            return hashlib.sha256(first).hexdigest(), len(first), []
        self._abort_stale_uploads(obj)
        upload["id"] = self._client.create_multipart_upload(**self._object_args(obj))["UploadId"]
        return self._upload_parts(obj, upload["id"], pipe, first)

    def _upload_parts(
        self, obj: str, upload_id: str, pipe: IO[bytes], first: bytes
    ) -> tuple[str, int, list[dict[str, Any]]]:
        """Upload ``first`` and the rest of the stream in parts as each fills,
        ``in_flight`` at most at once."""
        sha = hashlib.sha256()
        size = 0
        number = 0
        pending: deque[tuple[int, Future[Any]]] = deque()
        done: list[dict[str, Any]] = []
        stop = threading.Event()

        def upload(n: int, data: bytes) -> Any:
            if stop.is_set():
                raise TransientProviderError("upload stopped")
            return self._client.upload_part(
                Bucket=self.bucket, Key=obj, UploadId=upload_id, PartNumber=n, Body=data
            )

        def collect(entry: tuple[int, Future[Any]]) -> None:
            n, future = entry
            done.append({"PartNumber": n, "ETag": future.result()["ETag"]})

        with ThreadPoolExecutor(self._in_flight, thread_name_prefix="s3-part") as pool:
            try:
                data = first
                while True:
                    if number:
                        data = _read_full(pipe, self.part_size)
                    if not data:
                        break
                    sha.update(data)
                    size += len(data)
                    number += 1
                    while len(pending) >= self._in_flight:
                        collect(pending.popleft())
                    pending.append((number, pool.submit(upload, number, data)))
                    if len(data) < self.part_size:
                        break
                while pending:
                    collect(pending.popleft())
            except BaseException:
                stop.set()
                raise
        return sha.hexdigest(), size, done

    def _recorded(self, key: str, obj: str) -> tuple[str, int]:
        """The SHA-256 and size recorded when the snapshot was saved."""
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=obj + CHECKSUM_SUFFIX)
            record = json.loads(response["Body"].read(64 * 1024))
            sha, size = str(record["sha256"]), int(record["size"])
        except (ValueError, KeyError, TypeError):
            raise PermanentProviderError(
                f"snapshot {key} is corrupt: its recorded SHA-256 is unreadable; "
                "nothing was restored"
            ) from None
        except Exception as exc:
            if _error_code(exc) in ("NoSuchKey", "404") or _status(exc) == 404:
                self._missing(key, obj)
            raise _provider_error(f"cannot read snapshot {key}", exc) from None
        if len(sha) != 64 or size < 0:
            raise PermanentProviderError(
                f"snapshot {key} is corrupt: its recorded SHA-256 is unreadable; "
                "nothing was restored"
            )
        return sha, size

    def _missing(self, key: str, obj: str) -> NoReturn:
        """No checksum record: say whether the snapshot itself is there."""
        try:
            self._client.head_object(Bucket=self.bucket, Key=obj)
        except Exception as exc:
            if _status(exc) == 404 or _error_code(exc) in ("NoSuchKey", "404"):
                raise PermanentProviderError(f"snapshot {key} not found") from None
            raise _provider_error(f"cannot read snapshot {key}", exc) from None
        raise PermanentProviderError(
            f"snapshot {key} is corrupt: no SHA-256 was recorded for it (an unfinished "
            "or foreign upload); nothing was restored"
        )

    def _open(self, key: str, obj: str) -> _VerifiedBody:
        """The object's download stream, checked against the record of its SHA-256 and
        size. Both are asked for at once (the record in a thread): one round trip
        before the first byte, not two. The record's failure is reported first (it
        tells a missing snapshot from one without a record); a size that differs from
        the record is refused before anything is downloaded."""
        with ThreadPoolExecutor(1, thread_name_prefix="s3-record") as pool:
            recorded = pool.submit(self._recorded, key, obj)
            response: Any = None
            failure: Exception | None = None
            try:
                response = self._client.get_object(Bucket=self.bucket, Key=obj)
            except Exception as exc:
                failure = exc
            try:
                sha, size = recorded.result()
            except BaseException:
                if response is not None:
                    with contextlib.suppress(Exception):
                        response["Body"].close()
                raise
        if failure is not None:
            if _error_code(failure) == "NoSuchKey" or _status(failure) == 404:
                raise PermanentProviderError(f"snapshot {key} not found") from None
            raise _provider_error(f"cannot read snapshot {key}", failure) from None
        body = _VerifiedBody(response["Body"], key, sha, size)
        length = response.get("ContentLength")
        if isinstance(length, int) and length != size:
            body.close()
            raise PermanentProviderError(
                f"snapshot {key} is corrupt: {_size_problem(length, size)}; nothing was restored"
            )
        return body

    def _abort_stale_uploads(self, obj: str) -> None:
        """Multipart uploads of this object left by a worker killed long ago (a bucket
        lifecycle rule does the same for the whole bucket). Best effort."""
        with contextlib.suppress(Exception):
            listing = self._client.list_multipart_uploads(Bucket=self.bucket, Prefix=obj)
            now = datetime.now(UTC)
            for up in listing.get("Uploads", []):
                started = up.get("Initiated")
                if up.get("Key") == obj and started is not None and now - started > STALE_UPLOAD:
                    self._client.abort_multipart_upload(
                        Bucket=self.bucket, Key=obj, UploadId=up["UploadId"]
                    )


def _size_problem(size: int, expected: int) -> str:
    return f"it is {size} bytes where {expected} were saved (truncated or replaced)"


def _read_full(pipe: IO[bytes], size: int) -> bytes:
    """Up to ``size`` bytes of the pipe: fewer only at its end."""
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = pipe.readinto(view[got:])  # type: ignore[attr-defined]
        if not n:
            break
        got += n
    view.release()
    if got < size:
        del buf[got:]
    return bytes(buf)
