"""A real S3 API on loopback for the tests: moto in server mode, in its own process.

boto3 talks to it over HTTP exactly as it talks to AWS or MinIO (signing, multipart,
ETags, error codes); nothing is patched in-process. ``s3_server`` (one per test run) also
puts dummy credentials and a region in the environment, so the worker processes the
end-to-end tests spawn reach it the same way, and no real credential chain is consulted
(the instance metadata lookup is switched off).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "lifecycle-test",
    "AWS_SECRET_ACCESS_KEY": "lifecycle-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@dataclass
class MotoS3:
    endpoint_url: str
    process: subprocess.Popen[bytes]
    _client: Any = None

    def client(self) -> Any:
        """One client for the run, made as the store makes its own (loading botocore's
        model takes a while; clients are thread-safe)."""
        if self._client is None:
            from worker.providers.s3_snapshots import S3SnapshotStore

            self._client = S3SnapshotStore.make_client(self.endpoint_url)
        return self._client

    def new_bucket(self) -> str:
        name = f"lifecycle-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_moto(log: Path) -> MotoS3:
    """``python -m moto.server`` on a free loopback port, once it accepts connections."""
    port = _free_port()
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    for _ in range(600):  # a bound on a broken start, not a timing assertion
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}; see {log}")
        if _answers(port):
            return MotoS3(f"http://127.0.0.1:{port}", proc)
        time.sleep(0.1)
    stop_moto(proc)
    raise RuntimeError(f"moto server did not answer on port {port}; see {log}")


def stop_moto(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoS3]:
    previous = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = start_moto(tmp_path_factory.mktemp("moto") / "moto.log")
    try:
        yield server
    finally:
        stop_moto(server.process)
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_server: MotoS3) -> str:
    """A new, empty bucket on the test S3 server."""
    return s3_server.new_bucket()
