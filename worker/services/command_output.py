"""A command's output as it arrives: recorded by the worker, read back as a stream.

The worker appends what the runtime reads (``on_output``) to ``command_output``, a row
per piece, in the order it was read, up to the output limit per stream (what the
command's row keeps at the end, too). Each piece has a ``position``: the byte offset of
its first byte in the command's *output log*, both streams one after the other in
recorded order. A reader resumes from any offset (the SSE ``Last-Event-ID``) and gets
exactly the bytes after it, none twice and none lost.

Pieces are written at most every ``FLUSH_SECONDS`` or ``FLUSH_BYTES`` (and whenever the
runtime polls, about twice a second, so quiet output still arrives), and once more
before the command's end is recorded: a reader that sees the command finished has seen
every piece. A piece never ends inside a UTF-8 character (an incomplete one waits for
the rest, except at the limit and at the end), so each piece decodes on its own.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import anyio.to_thread
from sqlalchemy import insert, text
from sqlalchemy.orm import Session, sessionmaker

from worker.db.engine import get_sessionmaker
from worker.db.models import CommandOutputRecord, CommandRecord
from worker.logging import get_logger

log = get_logger(__name__)

FLUSH_SECONDS = 0.1
FLUSH_BYTES = 64 * 1024
STREAMS = ("stdout", "stderr")


def _complete_utf8(data: bytes) -> int:
    """How many leading bytes of ``data`` end on a character boundary (an incomplete
    multi-byte sequence at the end is left out; invalid bytes are not held back)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:  # a continuation byte: look further back
            continue
        return len(data) - back if _sequence_length(byte) > back else len(data)
    return len(data)


def _sequence_length(lead: int) -> int:
    if 0xF0 <= lead <= 0xF7:
        return 4
    if lead >= 0xE0:
        return 3 if lead < 0xF0 else 1
    if lead >= 0xC0:
        return 2
    return 1


class OutputLog:
    """Collects one command's output and appends it to ``command_output``."""

    def __init__(
        self, factory: sessionmaker[Session], command_id: uuid.UUID, limit_per_stream: int
    ) -> None:
        self.factory = factory
        self.command_id = command_id
        self.limit = limit_per_stream
        self.position = 0  # the output log's length so far (pieces made)
        self.kept = dict.fromkeys(STREAMS, 0)
        self.held = dict.fromkeys(STREAMS, b"")  # an incomplete character, per stream
        self.pending: list[dict[str, Any]] = []
        self.pending_bytes = 0
        self.last_flush = time.monotonic()

    def feed(self, stream: str, chunk: bytes) -> None:
        """The runtime's ``on_output``: keep what fits under the limit."""
        room = self.limit - self.kept.get(stream, self.limit)
        if room <= 0 or not chunk:
            return
        chunk = chunk[:room]
        self.kept[stream] += len(chunk)
        data = self.held[stream] + chunk
        cut = len(data) if self.kept[stream] >= self.limit else _complete_utf8(data)
        self.held[stream] = data[cut:]
        self._add(stream, data[:cut])
        if self.pending_bytes >= FLUSH_BYTES or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def tick(self) -> None:
        """Called while the command runs: quiet output is written within a poll."""
        if self.pending and time.monotonic() - self.last_flush >= FLUSH_SECONDS:
            self.flush()

    def close(self) -> None:
        """Everything, incomplete characters included: before the end is recorded."""
        for stream in STREAMS:
            held, self.held[stream] = self.held[stream], b""
            self._add(stream, held)
        self.flush()

    def _add(self, stream: str, data: bytes) -> None:
        if not data:
            return
        last = self.pending[-1] if self.pending else None
        if last is not None and last["stream"] == stream:
            last["data"] += data  # one piece for a run of the same stream
        else:
            self.pending.append(
                {
                    "command_id": self.command_id,
                    "position": self.position,
                    "stream": stream,
                    "data": data,
                }
            )
        self.position += len(data)
        self.pending_bytes += len(data)

    def flush(self) -> None:
        self.last_flush = time.monotonic()
        if not self.pending:
            return
        try:
            with self.factory.begin() as db:
                db.execute(insert(CommandOutputRecord), self.pending)
        except Exception as exc:  # kept for the next flush; the end is recorded anyway
            log.warning("sandbox.command_output_not_recorded", error=type(exc).__name__)
            return
        self.pending = []
        self.pending_bytes = 0


_READ = text(
    """
    SELECT position, stream, data FROM command_output
    WHERE command_id = :id AND position + length(data) > :after
    ORDER BY position
    LIMIT :limit
    """
)


def read_after(
    db: Session, command_id: uuid.UUID, after: int, limit: int = 256
) -> list[tuple[int, str, bytes]]:
    """Pieces holding bytes past offset ``after``, in order, each cut to start there:
    ``(position, stream, data)``."""
    out: list[tuple[int, str, bytes]] = []
    for position, stream, data in db.execute(
        _READ, {"id": command_id, "after": after, "limit": limit}
    ):
        raw = bytes(data)
        if position < after:
            raw, position = raw[after - position :], after
        out.append((int(position), str(stream), raw))
    return out


def so_far(db: Session, command_id: uuid.UUID) -> dict[str, str]:
    """A running command's ``stdout`` and ``stderr`` so far (what was recorded)."""
    parts: dict[str, list[bytes]] = {stream: [] for stream in STREAMS}
    after = 0
    while pieces := read_after(db, command_id, after):
        for position, stream, data in pieces:
            parts[stream].append(data)
            after = position + len(data)
    return {s: b"".join(parts[s]).decode("utf-8", errors="replace") for s in STREAMS}


# A stream with nothing to say sends a comment this often (proxies close idle streams).
KEEPALIVE_SECONDS = 15.0
_FINISHED = ("exited", "killed", "failed")


def _sse(event: str, data: dict[str, Any], event_id: int | None = None) -> str:
    head = "" if event_id is None else f"id: {event_id}\n"
    # JSON keeps CR and LF inside the one data line (SSE would split on them).
    return f"{head}event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


async def events(
    command_id: uuid.UUID, after: int, describe: Callable[[CommandRecord], dict[str, Any]]
) -> AsyncIterator[str]:
    """Server-Sent Events for a command's output after byte offset ``after``: each piece
    (``id`` the offset after it), then ``exit`` with ``describe(command)`` once the
    command has ended and every piece was sent. Polls the database (briefly in a
    thread), faster while output flows."""
    factory = get_sessionmaker()
    position = after
    pause = 0.02
    quiet_since = time.monotonic()

    def read() -> list[tuple[int, str, bytes]]:
        with factory() as db:
            return read_after(db, command_id, position)

    def ended() -> dict[str, Any] | None:
        with factory() as db:
            command = db.get(CommandRecord, command_id)
            if command is None or command.status in _FINISHED:
                return {} if command is None else describe(command)
            return None

    while True:
        pieces = await anyio.to_thread.run_sync(read)
        if not pieces:
            final = await anyio.to_thread.run_sync(ended)
            if final is not None:
                # Every piece was written before the end was: read what is left.
                while pieces := await anyio.to_thread.run_sync(read):
                    for piece_at, stream, data in pieces:
                        position = piece_at + len(data)
                        yield _piece(stream, data, position)
                yield _sse("exit", final)
                return
            if time.monotonic() - quiet_since >= KEEPALIVE_SECONDS:
                quiet_since = time.monotonic()
                yield ": keep-alive\n\n"
            await anyio.sleep(pause)
            pause = min(pause * 1.5, 0.5)
            continue
        for piece_at, stream, data in pieces:
            position = piece_at + len(data)
            yield _piece(stream, data, position)
        pause = 0.02
        quiet_since = time.monotonic()


def _piece(stream: str, data: bytes, end: int) -> str:
    return _sse(stream, {"text": data.decode("utf-8", errors="replace")}, end)
