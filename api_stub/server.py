"""The HTTP/1.1 protocol the API is served with: uvicorn's httptools protocol with limits
on the request head, enforced as the bytes arrive.

uvicorn and httptools put no bound on a request's head: a header value is accumulated
in memory until its line ends, so a client sending a 64 MB ``If-None-Match`` had the
whole of it buffered (and copied over and over) before the application saw anything.
Nothing at the ASGI level can help: by the time a scope exists the head is in memory.
Here the bytes of the request line and headers are counted before they reach the
parser, and the header lines as the parser reports them; past either limit the client
is answered 431 and the rest of what it sends is read and dropped, never kept.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from worker.config import get_settings
from worker.logging import get_logger

log = get_logger(__name__)

# After a 431 the connection is kept this long to read and drop what the client is still
# sending (so it sees the answer rather than a reset), then closed.
LINGER_SECONDS = 5.0


class HeadLimitedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` with ``api_max_header_bytes`` (request line and headers
    together) and ``api_max_header_lines`` per request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings = get_settings()
        self.max_head_bytes = settings.api_max_header_bytes
        self.max_header_lines = settings.api_max_header_lines
        self._in_head = True  # the next bytes belong to a request line or headers
        self._head_bytes = 0
        self._header_lines = 0
        self._refused = False
        self._linger: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # answered 431: what the client still sends is dropped
        self._unset_keepalive_if_required()
        view = memoryview(data)
        while view and not self._refused and not self.transport.is_closing():
            if self._in_head:
                # Never more than one byte past the limit to the parser in one go.
                room = self.max_head_bytes - self._head_bytes + 1
                piece, view = view[:room], view[room:]
                self._head_bytes += len(piece)
            else:
                # A body. Should the next request begin inside this piece, its first
                # bytes go uncounted: the limit may be passed by at most one read.
                piece, view = view, view[len(view) :]
            if not self._feed(piece):
                return
            if self._in_head and self._head_bytes > self.max_head_bytes:
                self._refuse(f"the request line and headers exceed {self.max_head_bytes} bytes")

    def _feed(self, piece: memoryview) -> bool:
        """Parse ``piece`` as uvicorn's ``data_received`` does; False once the
        connection is answered and done."""
        try:
            self.parser.feed_data(piece)
        except httptools.HttpParserError:
            if self._refused:  # on_header refused the request: the parser was stopped
                return False
            msg = "Invalid HTTP request received."
            self.logger.warning(msg)
            self.send_400_response(msg)
            return False
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        return True

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_lines = 0

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_lines += 1
        if self._header_lines > self.max_header_lines:
            self._refuse(f"more than {self.max_header_lines} header lines")
            raise ValueError("too many header lines")  # stops the parser
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._in_head, self._head_bytes = True, 0

    def _refuse(self, why: str) -> None:
        """Answer 431 and stop reading requests from this connection."""
        self._refused = True
        log.info("api.request_head_refused", reason=why, client=self.client)
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined request before this one is still being answered: a 431 now
            # would interleave with its response. Close instead.
            self.transport.close()
            return
        body = json.dumps(
            {"status": "error", "error": f"Request header fields too large: {why}"}
        ).encode()
        head = [STATUS_LINE[431]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the answer is complete; keep reading to drop
        self._linger = self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._linger is not None:
            self._linger.cancel()
        super().connection_lost(exc)

    def eof_received(self) -> None:
        if self._refused:
            self.transport.close()
