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


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("bad-checksum", "bad checksum"),
        ("truncated-data", "unexpected end of data"),
        ("truncated-header", "unexpected end of data"),
        ("global-pax", "pax global header"),
        ("sparse", "sparse file"),
        ("bad-number", "invalid number"),
        ("huge-long-name", "a name or pax header of"),
        ("bad-pax-record", "invalid pax header"),
        ("dangling-long-name", "ends after a long name"),
    ],
)
def test_what_it_does_not_accept_is_corrupt(case: str, message: str) -> None:
    data, _ = _archive(tarfile.GNU_FORMAT)
    first_data = 512 * 2  # the "dir" header, then dir/a.txt's header
    if case == "bad-checksum":
        data = _corrupt(data, 512 + 10, b"Z")
    elif case == "truncated-data":
        data = data[: first_data + 3]
    elif case == "truncated-header":
        data = data[: 512 + 100]
    elif case == "bad-number":
        ti = tarfile.TarInfo("n")
        block = bytearray(ti.tobuf(tarfile.GNU_FORMAT))
        block[124:136] = b"0000000009z\0"  # size, not octal
        block[148:156] = b"        "
        block[148:155] = b"%06o\0" % (sum(block) & 0o777777)
        data = bytes(block) + bytes(1024)
    else:
        ti = tarfile.TarInfo("m")
        if case == "global-pax":
            buf = io.BytesIO()
            with tarfile.open(
                fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "x"}
            ) as tf:
                tf.addfile(ti)
            data = buf.getvalue()
        elif case == "sparse":
            ti.type = tarfile.GNUTYPE_SPARSE
            data = ti.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
        elif case == "huge-long-name":
            ti.name = "n" * (MAX_META + 10)
            data = ti.tobuf(tarfile.GNU_FORMAT) + bytes(1024)
        elif case == "bad-pax-record":
            ti.type = tarfile.XHDTYPE
            body = b"99 path=x\n"
            ti.size = len(body)
            data = ti.tobuf(tarfile.GNU_FORMAT) + body.ljust(512, b"\0") + bytes(1024)
        elif case == "dangling-long-name":
            ti.name = "n" * 200
            long_name_only = ti.tobuf(tarfile.GNU_FORMAT)[:-512]  # the L member alone
            data = long_name_only + bytes(1024)
    with pytest.raises(TarFormatError, match=message):
        _read_all(data)
