"""The snapshot restore's tar reader against ``tarfile`` and GNU tar: every member of
archives in each format reads the same (name, type, link, mode, time, data), and what
it does not accept ends the stream as corrupt instead of being guessed at."""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from worker.providers.tar_stream import MAX_META, Member, TarFormatError, TarStream

LONG = "d" * 60 + "/" + "e" * 60 + "/" + "f" * 90 + ".txt"  # > 100: prefix, L or pax


class _Trickle(io.BytesIO):
    """Hands the stream out a few bytes at a time: headers and data split anywhere."""

    def __init__(self, data: bytes, step: int) -> None:
        super().__init__(data)
        self._step = step

    def read(self, size: int | None = -1, /) -> bytes:
        return super().read(min(self._step, size if size is not None and size >= 0 else 1 << 30))


def _read_all(data: bytes, step: int = 1 << 20) -> list[tuple[Member, bytes]]:
    tar = TarStream(_Trickle(data, step), chunk=step)
    return [(m, b"".join(tar.data(1000))) for m in tar.members()]


def _members(fmt: int) -> list[tuple[tarfile.TarInfo, bytes]]:
    def info(
        name: str, kind: bytes, data: bytes = b"", **fields: object
    ) -> tuple[tarfile.TarInfo, bytes]:
        ti = tarfile.TarInfo(name)
        ti.type = kind
        ti.size = len(data)
        ti.mode = 0o640
        ti.mtime = 1_700_000_000
        for key, value in fields.items():
            setattr(ti, key, value)
        return ti, data

    return [
        info("dir", tarfile.DIRTYPE, mode=0o755),
        info("dir/a.txt", tarfile.REGTYPE, b"hello\n"),
        info("dir/empty", tarfile.REGTYPE),
        info("dir/block", tarfile.REGTYPE, os.urandom(512 * 3)),
        info("dir/odd", tarfile.REGTYPE, os.urandom(5000)),
        info(LONG, tarfile.REGTYPE, b"deep\n"),
        info("dir/sym", tarfile.SYMTYPE, linkname="../" + "x" * 150),
        info("dir/hard", tarfile.LNKTYPE, linkname="dir/a.txt"),
        info("dir/ünïcode-名前.txt", tarfile.REGTYPE, b"u\n"),
        info("dir/old", tarfile.REGTYPE, b"o\n", mtime=-86_400),  # base-256 in gnu
    ]


def _archive(fmt: int) -> tuple[bytes, list[tuple[tarfile.TarInfo, bytes]]]:
    members = [m for m in _members(fmt) if fmt != tarfile.USTAR_FORMAT or m[0].mtime >= 0]
    if fmt == tarfile.USTAR_FORMAT:  # no long links nor non-ASCII names in plain ustar
        members = [m for m in members if len(m[0].linkname) <= 100 and m[0].name.isascii()]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, encoding="utf-8") as tf:
        for ti, data in members:
            tf.addfile(ti, io.BytesIO(data) if ti.isreg() else None)
    return buf.getvalue(), members


@pytest.mark.parametrize(
    "fmt",
    [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
    ids=["gnu", "pax", "ustar"],
)
@pytest.mark.parametrize("step", [1 << 20, 7, 512], ids=["whole", "7-bytes", "blocks"])
def test_every_format_reads_as_tarfile_reads_it(fmt: int, step: int) -> None:
    data, members = _archive(fmt)
    got = _read_all(data, step)
    assert len(got) == len(members)
    for (member, content), (ti, expected) in zip(got, members, strict=True):
        assert member.name == ti.name.rstrip("/")
        assert member.type == ti.type and member.linkname == ti.linkname
        assert (member.mode, member.mtime) == (ti.mode, ti.mtime)
        assert content == expected and member.size == len(expected)


def test_gnu_tar_archives_read_as_gnu_tar_lists_them(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / LONG).parent.mkdir(parents=True)
    (src / LONG).write_bytes(b"x" * 70_000)
    (src / "s").symlink_to("/" + "t" * 200)
    os.link(src / LONG, src / "h")
    for fmt in ("gnu", "posix", "ustar"):
        if fmt == "ustar":
            (src / "s").unlink()  # ustar cannot hold a 201-byte link target
        data = subprocess.run(
            ["tar", "-C", str(src), f"--format={fmt}", "-cf", "-", "."],
            capture_output=True,
            check=True,
        ).stdout
        listed = subprocess.run(
            ["tar", "-tf", "-"], input=data, capture_output=True, check=True
        ).stdout.decode()
        got = _read_all(data, 4096)
        assert [m.name for m, _ in got] == [n.rstrip("/") for n in listed.splitlines()], fmt
        # The file's data comes once, under whichever of its two names tar met first.
        (file, content), (link, _) = sorted(
            ((m, c) for m, c in got if m.name in (f"./{LONG}", "./h")), key=lambda p: p[0].islnk()
        )
        assert file.isreg() and content == b"x" * 70_000
        assert link.islnk() and link.linkname == file.name


def test_an_archive_ends_at_its_end_block_or_a_clean_end_of_stream() -> None:
    data, members = _archive(tarfile.GNU_FORMAT)
    tar = TarStream(io.BytesIO(data + b"\0" * 4096))
    assert len(list(tar.members())) == len(members)
    assert tar.end < len(data) and data[tar.end :] == b"\0" * (len(data) - tar.end)
    cut = data[: tar.end]  # no end block at all: members up to there, as tarfile does
    assert len(_read_all(cut)) == len(members)


def _corrupt(data: bytes, at: int, value: bytes) -> bytes:
    return data[:at] + value + data[at + len(value) :]


END = bytes(1024)


def _member(fmt: int = tarfile.GNU_FORMAT, **fields: object) -> bytes:
    """One member "m" (``fields`` set on its TarInfo) and the end of the archive."""
    ti = tarfile.TarInfo("m")
    for key, value in fields.items():
        setattr(ti, key, value)
    return ti.tobuf(fmt) + END


def _bad_number() -> bytes:
    block = bytearray(tarfile.TarInfo("n").tobuf(tarfile.GNU_FORMAT))
    block[124:136] = b"0000000009z\0"  # size, not octal
    block[148:156] = b"        "
    block[148:155] = b"%06o\0" % (sum(block) & 0o777777)
    return bytes(block) + END


def _global_pax() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}
    ) as tf:
        tf.addfile(tarfile.TarInfo("m"))
    return buf.getvalue()


def _pax_member(record: bytes) -> bytes:
    ti = tarfile.TarInfo("p")
    ti.type, ti.size = tarfile.XHDTYPE, len(record)
    return ti.tobuf(tarfile.GNU_FORMAT) + record + bytes(-len(record) % 512)


def _long_name_alone() -> bytes:
    return _member(name="n" * 200)[: -512 - len(END)]  # the L member, not the one it names


def _piling_pax() -> bytes:  # each under the limit, together over it
    rest = b" k=" + b"v" * 300_000 + b"\n"
    return _pax_member(str(len(rest) + 6).encode() + rest) * 4 + _member()  # 300,010 bytes


GOOD, _ = _archive(tarfile.GNU_FORMAT)
CORRUPT: dict[str, tuple[bytes, str]] = {
    "bad-checksum": (_corrupt(GOOD, 512 + 10, b"Z"), "bad checksum"),
    "truncated-data": (GOOD[: 512 * 2 + 3], "unexpected end of data"),
    "truncated-header": (GOOD[: 512 + 100], "unexpected end of data"),
    "global-pax": (_global_pax(), "pax global header"),
    "sparse": (_member(type=tarfile.GNUTYPE_SPARSE), "sparse file"),
    "bad-number": (_bad_number(), "invalid number"),
    "huge-long-name": (_member(name="n" * (MAX_META + 10)), "a name or pax header of"),
    "bad-pax-record": (_pax_member(b"99 path=x\n") + _member(), "invalid pax header"),
    "dangling-long-name": (_long_name_alone() + END, "ends after a long name"),
    "long-name-then-end-of-stream": (_long_name_alone(), "ends after a long name"),
    # costs nothing to send, megabytes to check
    "name-over-path-max": (_member(name="a/" * 2100 + "f"), "longer than 4096 bytes"),
    "link-over-path-max": (  # 2,100 characters, 4,200 bytes
        _member(tarfile.PAX_FORMAT, type=tarfile.SYMTYPE, linkname="é" * 2100),
        "longer than 4096 bytes",
    ),
    "pax-headers-piling-up": (_piling_pax(), "a name or pax header of"),
    "time-out-of-range": (_member(mtime=2**80), "time out of range"),  # os.utime overflows
    "pax-time-nan": (_member(tarfile.PAX_FORMAT, pax_headers={"mtime": "nan"}), "out of range"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_what_it_does_not_accept_is_corrupt(case: str) -> None:
    data, message = CORRUPT[case]
    with pytest.raises(TarFormatError, match=message):
        _read_all(data)
