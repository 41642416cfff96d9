"""Request heads are bounded (issue 11): a head over ``api_max_header_bytes`` (64 KiB) or
with more than ``api_max_header_lines`` (100) header lines is answered 431 without the
server holding it in memory. Against the real server as the product starts it
(``lifecycle api``), over raw sockets."""

from __future__ import annotations

import contextlib
import json
import socket
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.support.factories import Caller, make_caller
from tests.support.stack import Stack

MIB = 1024 * 1024
LIMIT = 64 * 1024  # the default api_max_header_bytes
LINES = 100  # the default api_max_header_lines


class RawConnection:
    """A client that writes exactly the bytes it is given and reads responses back."""

    def __init__(self, stack: Stack) -> None:
        self.sock = socket.create_connection(("127.0.0.1", stack.port), timeout=60)
        self.buffer = b""

    def send(self, data: bytes) -> bool:
        """Send ``data``; False when the server has stopped reading (closed)."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _fill(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        self.buffer += chunk
        return bool(chunk)

    def response(self) -> tuple[int, dict[str, str], Any]:
        """The next response: status, headers (lower-case names) and JSON body."""
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a response; got {self.buffer[:200]!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines)}
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                break
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return int(status_line.split()[1]), headers, json.loads(body) if body else None

    def closed_by_server(self) -> bool:
        return not self.buffer and not self._fill()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


@pytest.fixture
def conn(api_server: Stack) -> Any:
    c = RawConnection(api_server)
    yield c
    c.close()


@pytest.fixture
def caller(db_clean: dict[str, str]) -> Caller:
    return make_caller("Ada")


def _get(path: str, caller: Caller, *extra: bytes) -> bytes:
    return b"".join(
        [
            f"GET {path} HTTP/1.1\r\nHost: api\r\nx-api-key: {caller.key}\r\n".encode(),
            *extra,
            b"\r\n",
        ]
    )


def _peak_rss(pid: int) -> int:
    """The process's peak resident set (VmHWM) since the last reset."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _reset_peak_rss(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def test_a_64_mib_header_is_431_and_never_buffered(
    api_server: Stack, conn: RawConnection, caller: Caller
) -> None:
    pid = api_server.procs["api"].pid
    server = psutil.Process(pid)
    rss_before = server.memory_info().rss
    _reset_peak_rss(pid)
    start = f"GET /api/sessions HTTP/1.1\r\nHost: api\r\nx-api-key: {caller.key}\r\n"
    assert conn.send(start.encode() + b'If-None-Match: "')
    chunk = b"a" * MIB
    sent = 0
    for _ in range(64):
        if not conn.send(chunk):
            break  # the server may stop reading once it has answered
        sent += len(chunk)
    conn.send(b'"\r\n\r\n')
    status, headers, body = conn.response()
    assert status == 431, (status, body)
    assert body["status"] == "error" and "65536 bytes" in body["error"], body
    assert headers["connection"] == "close"
    assert conn.closed_by_server()
    grown, peak = server.memory_info().rss - rss_before, _peak_rss(pid) - rss_before
    # Holding the header at all would cost 64 MiB (httptools copies it as it grows).
    assert peak < 16 * MIB, f"peak resident set grew by {peak / MIB:.1f} MiB (sent {sent})"
    assert grown < 8 * MIB, f"resident set grew by {grown / MIB:.1f} MiB"


def test_a_huge_request_line_is_431(conn: RawConnection, caller: Caller) -> None:
    conn.send(b"GET /api/sessions?x=" + b"a" * (2 * MIB) + b" HTTP/1.1\r\nHost: api\r\n\r\n")
    assert conn.response()[0] == 431


def test_too_many_header_lines_is_431(conn: RawConnection, caller: Caller) -> None:
    many = b"".join(b"x-n%d: 1\r\n" % i for i in range(100_000))
    assert len(many) > LIMIT  # over both limits: the first one met answers
    conn.send(_get("/api/sessions", caller, many))
    status, _, body = conn.response()
    assert status == 431, body


def test_too_many_short_header_lines_under_the_byte_limit_is_431(
    conn: RawConnection, caller: Caller
) -> None:
    many = b"".join(b"x-n%d: 1\r\n" % i for i in range(LINES))
    assert len(many) < LIMIT
    conn.send(_get("/api/sessions", caller, many))
    status, _, body = conn.response()
    assert status == 431, body
    assert "header lines" in body["error"]


def test_heads_within_the_limits_are_served_one_after_another(
    conn: RawConnection, caller: Caller
) -> None:
    """The limits are per request: on one keep-alive connection, many heads of nearly
    the limit each, and nearly the most header lines, are all served."""
    big = b'If-None-Match: "' + b"a" * (LIMIT - 1024) + b'"\r\n'
    lines = b"".join(b"x-n%d: 1\r\n" % i for i in range(LINES - 3))  # + Host, key, INM
    for extra in (big, lines, big, lines, big):
        assert conn.send(_get("/api/sessions", caller, extra))
        status, _, body = conn.response()
        assert status == 200, body
    # ... and the next one over the limit on the same connection is refused.
    assert conn.send(_get("/api/sessions", caller, big, big))
    assert conn.response()[0] == 431


def test_a_post_body_is_not_counted_as_head(conn: RawConnection, caller: Caller) -> None:
    """Head and body arriving in one read: only the head counts (the body has its own
    limit, 413)."""
    body = json.dumps({"title": "x" * (40 * 1024)}).encode()
    request = (
        f"POST /api/sessions HTTP/1.1\r\nHost: api\r\nx-api-key: {caller.key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body
    conn.send(request + request)  # twice, pipelined, in one write
    assert conn.response()[0] == 400  # the title is over its limit, the head is fine
    assert conn.response()[0] == 400
