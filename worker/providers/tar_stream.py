"""Reading a tar stream member by member, for the snapshot restore (``snapshot_extract``).

``tarfile`` in stream mode cost more per member than GNU tar's whole extraction (0.35 s
against 0.29 s for the 7,755 members of a 100 MB sandbox, data unread), so the restore
reads the stream itself: one 512-byte header at a time, its fields sliced out, the data
handed on in the pieces it arrived in. It reads what this product's snapshots are made
of — GNU tar's ``gnu`` format and POSIX ustar, long names as GNU ``L``/``K`` members or
pax ``x`` headers (``path``, ``linkpath``, ``size``, ``mtime``), numbers in octal or
base-256 — and nothing else: a header whose checksum is wrong, a pax global header, a
sparse file, or a type it does not know ends the stream as corrupt or unsupported
rather than being guessed at. What a member is (its name, type, link, size) is decided
here once, and the extraction writes exactly that: there is no second reader of the
archive to disagree with.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

BLOCK = 512

#: The most long-name and pax header data read before one member (in all).
MAX_META = 1 << 20
#: Longest member name or link target, encoded (Linux's PATH_MAX): a longer one could
#: not be written anyway, and checking one costs memory with the square of its length.
MAX_NAME = 4096
#: Member times beyond this many seconds from 1970 either way are refused (os.utime
#: overflows long before what base-256 fields can hold).
MAX_TIME = 2.0**40
#: The pax keys a member takes (others, like uname or atime, are read and dropped).
_PAX_KEYS = frozenset({"path", "linkpath", "size", "mtime"})

_REGULAR = frozenset({b"0", b"\0", b"7"})
_POSIX_MAGIC = b"ustar\x0000"
_ZERO_BLOCK = bytes(BLOCK)


class Source(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class TarFormatError(Exception):
    """The stream is not a tar archive this reader accepts (reported as corrupt)."""


class Member:
    """One member's header, as the extraction sees it (``tarfile.TarInfo``'s names)."""

    __slots__ = ("linkname", "mode", "mtime", "name", "size", "type")

    def __init__(
        self, name: str, type_: bytes, linkname: str, mode: int, mtime: float, size: int
    ) -> None:
        self.name = name
        self.type = type_
        self.linkname = linkname
        self.mode = mode
        self.mtime = mtime
        self.size = size

    def isreg(self) -> bool:
        return self.type in _REGULAR

    def isdir(self) -> bool:
        return self.type == b"5"

    def issym(self) -> bool:
        return self.type == b"2"

    def islnk(self) -> bool:
        return self.type == b"1"

    def isfifo(self) -> bool:
        return self.type == b"6"

    def ischr(self) -> bool:
        return self.type == b"3"

    def isblk(self) -> bool:
        return self.type == b"4"


def _text(field: bytes) -> str:
    """A NUL-terminated name field (UTF-8; undecodable bytes kept as surrogates)."""
    end = field.find(b"\0")
    return (field if end < 0 else field[:end]).decode("utf-8", "surrogateescape")


def _number(field: bytes) -> int:
    """A numeric field: octal digits (NUL- or space-terminated), or GNU base-256."""
    if field[-1] == 0:  # as GNU tar writes them: digits, then a NUL
        try:
            return int(field[:-1], 8)
        except ValueError:
            pass
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * (len(field) - 1))) if field[0] == 0xFF else value
    end = field.find(b"\0")
    digits = (field if end < 0 else field[:end]).strip()
    if not digits:
        return 0
    try:
        return int(digits, 8)
    except ValueError:
        raise TarFormatError(f"invalid number field {digits[:20]!r}") from None


def _checksum_ok(header: bytes) -> bool:
    """The header's checksum: its bytes summed with the checksum field as spaces
    (unsigned, as every tar writes it; signed, as some old ones did)."""
    want = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32
    if want == unsigned:
        return True
    signed = unsigned - 256 * sum(1 for b in header[:148] + header[156:] if b > 127)
    return want == signed


def _pax(data: bytes) -> dict[str, str]:
    """The records of a pax extended header: ``"<length> <key>=<value>\\n"``."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos] != 0:
        space = data.find(b" ", pos)
        if space < 0:
            raise TarFormatError("invalid pax header")
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError("invalid pax header record length") from None
        record = data[space + 1 : pos + length]
        if length <= 0 or pos + length > len(data) or not record.endswith(b"\n"):
            raise TarFormatError("invalid pax header record")
        key, sep, value = record[:-1].partition(b"=")
        if not sep:
            raise TarFormatError("invalid pax header record")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


class TarStream:
    """The members of the tar archive read from ``source``, in order (:meth:`members`);
    a regular member's data is read with :meth:`data` before the next member is asked
    for (what is left unread is skipped). ``end`` is the offset in the stream of the
    end-of-archive block once it was met (or of the end of the stream)."""

    def __init__(self, source: Source, chunk: int = 1 << 20) -> None:
        self._source = source
        self._chunk = chunk
        self._buf = b""
        self._pos = 0
        self._base = 0  # stream offset of _buf[0]
        self._unread = 0  # data (and padding) of the current member not yet consumed
        self._padding = 0
        self.end = 0

    def _more(self) -> bool:
        chunk = self._source.read(self._chunk)
        if not chunk:
            return False
        self._base += self._pos
        self._buf = self._buf[self._pos :] + chunk if self._pos < len(self._buf) else chunk
        self._pos = 0
        return True

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` bytes (raises at a premature end)."""
        while len(self._buf) - self._pos < n:
            if not self._more():
                raise TarFormatError("unexpected end of data")
        out = self._buf[self._pos : self._pos + n]
        self._pos += n
        return out

    def _skip(self, n: int) -> None:
        while n:
            if self._pos == len(self._buf) and not self._more():
                raise TarFormatError("unexpected end of data")
            step = min(n, len(self._buf) - self._pos)
            self._pos += step
            n -= step

    def data(self, piece: int) -> Iterator[memoryview]:
        """The current member's data in pieces of at most ``piece`` bytes (views of the
        stream's buffer, valid until the next piece is asked for), then its padding
        skipped."""
        while self._unread:
            if self._pos == len(self._buf) and not self._more():
                raise TarFormatError("unexpected end of data")
            step = min(self._unread, len(self._buf) - self._pos, piece)
            out = memoryview(self._buf)[self._pos : self._pos + step]
            self._pos += step
            self._unread -= step
            yield out
        self._skip(self._padding)
        self._padding = 0

    def _meta(self, size: int, budget: int) -> bytes:
        """The data of a long-name or pax member, padding skipped; what one member's
        such headers may still read is ``budget`` bytes."""
        if size > budget:
            raise TarFormatError(f"a name or pax header of {size} bytes")
        data = self._take(size)
        self._skip(-size % BLOCK)
        return data

    def members(self) -> Iterator[Member]:  # noqa: C901 -- one branch per header type
        long_name: str | None = None
        long_link: str | None = None
        pax: dict[str, str] = {}
        sparse = False
        meta = 0  # bytes of long-name and pax data read for the coming member
        while True:
            self._skip(self._unread + self._padding)  # what the previous member left
            self._unread = self._padding = 0
            self.end = self._base + self._pos
            ended = len(self._buf) - self._pos < BLOCK and not self._more_or_end()
            header = b"" if ended else self._take(BLOCK)
            if ended or header == _ZERO_BLOCK:
                if meta:
                    raise TarFormatError("the archive ends after a long name or pax header")
                return
            if not _checksum_ok(header):
                raise TarFormatError("bad checksum in a tar header")
            kind = header[156:157]
            size = _number(header[124:136])
            if size < 0:
                raise TarFormatError("negative member size")
            if kind in (b"L", b"K", b"x"):
                body = self._meta(size, MAX_META - meta)
                meta += max(size, 1)
                if kind == b"L":
                    long_name = _text(body)
                elif kind == b"K":
                    long_link = _text(body)
                else:
                    for key, value in _pax(body).items():
                        if key in _PAX_KEYS:
                            pax[key] = value
                        sparse = sparse or key.startswith("GNU.sparse")
                continue
            if kind == b"g":
                raise TarFormatError("a pax global header (not part of a snapshot)")
            if sparse or kind == b"S":
                raise TarFormatError("a sparse file (not part of a snapshot)")
            name = long_name if long_name is not None else _text(header[0:100])
            if long_name is None and header[257:265] == _POSIX_MAGIC and header[345]:
                name = _text(header[345:500]) + "/" + name
            if long_link is not None:
                link = long_link
            else:
                link = _text(header[157:257]) if header[157] else ""
            mtime: float = _number(header[136:148])
            if "path" in pax:
                name = pax["path"]
            if "linkpath" in pax:
                link = pax["linkpath"]
            try:
                if "size" in pax:
                    size = int(pax["size"])
                if "mtime" in pax:
                    mtime = float(pax["mtime"])
            except ValueError:
                raise TarFormatError("invalid number in a pax header") from None
            if size < 0:
                raise TarFormatError("negative member size")
            if not -MAX_TIME <= mtime <= MAX_TIME:  # also NaN
                raise TarFormatError("a member time out of range")
            for text in (name, link):
                # (at most 4 bytes a character: only a long one needs encoding)
                if (
                    len(text) > MAX_NAME // 4
                    and len(text.encode("utf-8", "surrogateescape")) > MAX_NAME
                ):
                    raise TarFormatError(f"a name or link longer than {MAX_NAME} bytes")
            if kind == b"\0" and name.endswith("/"):
                kind = b"5"  # the old V7 way of writing a directory
            if kind == b"5":
                name = name.rstrip("/")  # "dir/" as tar writes it, "dir" as tarfile reads it
            long_name = long_link = None
            pax = {}
            meta = 0
            data = size if kind in _REGULAR else 0
            self._unread, self._padding = data, -data % BLOCK
            yield Member(name, kind, link, _number(header[100:108]), mtime, data)

    def _more_or_end(self) -> bool:
        """Read until a whole header is buffered; False at a clean end of the stream
        (between members, where ``tarfile`` stops too)."""
        while len(self._buf) - self._pos < BLOCK:
            if not self._more():
                if self._pos == len(self._buf):
                    return False
                raise TarFormatError("unexpected end of data")
        return True
