"""Snapshot test material shared by the file and S3 store tests: a working tree with
committed, uncommitted, untracked and linked files, its manifest, hostile archives
(early and late members), corruptions of a good archive, and the staging-directory spy."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from worker.providers import snapshot_extract

GIT_ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


Manifest = dict[str, tuple[object, ...]]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, env=GIT_ENV, check=True, capture_output=True, text=True
    ).stdout


def manifest(root: Path) -> Manifest:
    """path -> (kind, mode, sha256 | link target) for everything below ``root``."""
    out: Manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = ("file", mode, hashlib.sha256(path.read_bytes()).hexdigest())
            elif stat.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", mode)
            else:
                out[rel] = ("other",)
    return out


def make_workdir(root: Path) -> Path:
    """A git working tree in every state a sandbox can be in."""
    work = root / "work"
    work.mkdir()
    git("init", "-q", "-b", "main", cwd=work)
    (work / "tracked.txt").write_text("one\ntwo\n")
    (work / "gone.txt").write_text("to be deleted\n")
    (work / "src").mkdir()
    (work / "src" / "app.py").write_text("print('hi')\n")
    git("add", "-A", cwd=work)
    git("commit", "-qm", "initial", cwd=work)
    git("checkout", "-qb", "session/x", cwd=work)
    (work / "tracked.txt").write_text("one\nTWO\nthree\n")  # modified, uncommitted
    (work / "gone.txt").unlink()  # deleted, uncommitted
    (work / "untracked.md").write_text("# notes\n")  # untracked
    (work / "blob.bin").write_bytes(bytes(range(256)) * 64 + os.urandom(4096))  # binary
    (work / "run.sh").write_text("#!/bin/sh\necho ok\n")
    (work / "run.sh").chmod(0o755)  # exec bit
    (work / "readonly.txt").write_text("ro\n")
    (work / "readonly.txt").chmod(0o444)
    (work / "empty-dir").mkdir()
    (work / "private").mkdir(mode=0o700)
    (work / "private" / "k").write_text("k")
    (work / "link-to-file").symlink_to("src/app.py")  # symlinks inside the tree
    (work / "src" / "link-up").symlink_to("../tracked.txt")
    (work / "link-to-dir").symlink_to("src")
    (work / "dangling").symlink_to("not-there-yet")
    deep = work / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    (deep / ("f" * 90 + ".txt")).write_text("long path\n")  # > 100 chars: GNU long names
    (work / "spaces and ünïcödé.txt").write_text("ok\n")
    os.link(work / "src" / "app.py", work / "hardlinked.py")
    os.mkfifo(work / "pipe")
    (work / "ro-dir").mkdir()
    (work / "ro-dir" / "inside.txt").write_text("x\n")
    (work / "ro-dir").chmod(0o555)
    return work


def make_writable(path: Path) -> None:
    for dirpath, dirnames, _ in os.walk(path):
        for name in dirnames:
            p = Path(dirpath) / name
            if not p.is_symlink():
                p.chmod(0o755)


def tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zstd_bytes(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(data)


def corruptions(good: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0xFF
    tar = tar_bytes({"a.txt": b"hello"})
    return {
        "empty": b"",
        "random": os.urandom(4096),
        "half": good[: len(good) // 2],
        "missing-checksum": good[:-3],
        "flipped-byte": bytes(flipped),
        "zstd-of-garbage": zstd_bytes(b"\x01garbage" * 1000),
        "trailing-junk": good + b"not zstd at all",
        "junk-after-tar-end": zstd_bytes(tar + b"\x07" * 1024),
        "plain-tar": tar,
    }


Members = list[tuple[tarfile.TarInfo, bytes]]


def member(name: str, kind: bytes = tarfile.REGTYPE, data: bytes = b"pwned", link: str = "") -> tuple[tarfile.TarInfo, bytes]:  # fmt: skip
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


SAFE_FIRST = member("ok.txt", data=b"fine")


LONG = "x" * 150  # a GNU long-name ('L') header before the member


# Each case gets OUT, an absolute directory outside the target holding sentinel.txt.
MALICIOUS: dict[str, Callable[[str], Members]] = {
    # Names that leave the target, or are not names.
    "dotdot": lambda out: [SAFE_FIRST, member("../escape")],
    "dotdot-nested": lambda out: [SAFE_FIRST, member("sub/../../escape")],
    "dotdot-long": lambda out: [SAFE_FIRST, member(f"../{LONG}")],
    "absolute": lambda out: [SAFE_FIRST, member("/tmp/abs-escape")],
    "absolute-outside": lambda out: [SAFE_FIRST, member(f"{out}/sentinel.txt")],
    "empty-name": lambda out: [SAFE_FIRST, member("")],
    "dot-as-file": lambda out: [member(".")],
    "dot-slash-as-file": lambda out: [SAFE_FIRST, member("./")],
    "dot-as-symlink": lambda out: [member(".", tarfile.SYMTYPE, link=out)],
    "root-replaced": lambda out: [member(".", tarfile.SYMTYPE, link="/tmp")],
    "dot-as-hardlink": lambda out: [SAFE_FIRST, member(".", tarfile.LNKTYPE, link="ok.txt")],
    # Writes through a symbolic link: the link would only exist at the end, but a
    # member below it is refused whatever the order.
    "link-then-write-through": lambda out: [
        member("a", tarfile.SYMTYPE, link="/etc"),
        member("a/passwd"),
    ],
    "link-then-write-through-outside": lambda out: [
        member("a", tarfile.SYMTYPE, link=out),
        member("a/sentinel.txt"),
    ],
    "write-then-link": lambda out: [
        member("a/sentinel.txt"),
        member("a", tarfile.SYMTYPE, link=out),
    ],
    "dir-then-link": lambda out: [
        member("a", tarfile.DIRTYPE),
        member("a", tarfile.SYMTYPE, link=out),
    ],
    "link-then-dir": lambda out: [
        member("a", tarfile.SYMTYPE, link=out),
        member("a", tarfile.DIRTYPE),
    ],
    "link-then-write-through-dotted": lambda out: [
        member("a", tarfile.SYMTYPE, link=out),
        member("./a/./sentinel.txt"),
    ],
    "link-then-write-through-long-name": lambda out: [
        member("a", tarfile.SYMTYPE, link=out),
        member(f"a/{LONG}"),
    ],
    "link-then-dir-through": lambda out: [
        member("a", tarfile.SYMTYPE, link=out),
        member("a/newdir", tarfile.DIRTYPE),
    ],
    "link-then-link-through": lambda out: [
        member("a", tarfile.SYMTYPE, link=out),
        member("a/sentinel.txt", tarfile.SYMTYPE, link="/etc/passwd"),
    ],
    "nested-link-then-write-through": lambda out: [
        member("d", tarfile.DIRTYPE),
        member("d/l", tarfile.SYMTYPE, link=out),
        member("d/l/sentinel.txt"),
    ],
    "dotdot-link-then-write-through": lambda out: [
        member("up", tarfile.SYMTYPE, link=".."),
        member("up/escape"),
    ],
    "inside-link-then-write-through": lambda out: [
        member("sub", tarfile.DIRTYPE),
        member("link", tarfile.SYMTYPE, link="sub"),
        member("link/escape"),
    ],
    "escaping-link-then-write-through": lambda out: [
        member("link", tarfile.SYMTYPE, link="sub/../.."),
        member("link/escape"),
    ],
    "hardlinked-link-then-write-through": lambda out: [
        member("l", tarfile.SYMTYPE, link=out),
        member("h", tarfile.LNKTYPE, link="l"),
        member("h/sentinel.txt"),
    ],
    "symlink-replaced-by-file": lambda out: [
        member("a", tarfile.SYMTYPE, link="ok.txt"),
        member("a", data=b"overwrite through link"),
    ],
    "dir-replaced-by-symlink": lambda out: [
        member("sub/f", data=b"x"),
        member("sub", tarfile.SYMTYPE, link="."),
    ],
    # Hard links must name an earlier member of the tree, not through a link.
    "hardlink-absolute": lambda out: [
        SAFE_FIRST,
        member("h", tarfile.LNKTYPE, link="/etc/passwd"),
    ],
    "hardlink-absolute-outside": lambda out: [
        SAFE_FIRST,
        member("h", tarfile.LNKTYPE, link=f"{out}/sentinel.txt"),
    ],
    "hardlink-dotdot": lambda out: [
        SAFE_FIRST,
        member("h", tarfile.LNKTYPE, link="../outside.txt"),
    ],
    "hardlink-not-in-archive": lambda out: [
        SAFE_FIRST,
        member("h", tarfile.LNKTYPE, link="outside.txt"),
    ],
    "hardlink-later-member": lambda out: [
        member("h", tarfile.LNKTYPE, link="ok.txt"),
        SAFE_FIRST,
    ],
    "hardlink-to-dir": lambda out: [
        member("sub", tarfile.DIRTYPE),
        member("h", tarfile.LNKTYPE, link="sub"),
    ],
    "hardlink-through-symlink": lambda out: [
        member("l", tarfile.SYMTYPE, link=out),
        member("h", tarfile.LNKTYPE, link="l/sentinel.txt"),
    ],
    "hardlink-through-inside-symlink": lambda out: [
        member("sub", tarfile.DIRTYPE),
        member("sub/file", data=b"data"),
        member("l", tarfile.SYMTYPE, link="sub"),
        member("h", tarfile.LNKTYPE, link="l/file"),
    ],
    # Special files.
    "fifo": lambda out: [SAFE_FIRST, member("pipe", tarfile.FIFOTYPE)],
    "char-device": lambda out: [SAFE_FIRST, member("null", tarfile.CHRTYPE)],
    "block-device": lambda out: [SAFE_FIRST, member("disk", tarfile.BLKTYPE)],
}


def assert_nothing_written(tmp_path: Path, parent: Path, outside: Path, before: Manifest) -> None:
    """Not the target (removed), not beside it, not above it, not through a link."""
    assert list(parent.iterdir()) == []
    assert manifest(tmp_path) == before
    assert (outside / "sentinel.txt").read_text() == "original\n"
    assert sorted(p.name for p in outside.iterdir()) == ["sentinel.txt"]
    assert not Path("/tmp/abs-escape").exists()


class StagingSpy:
    """Records each staging directory a failed restore removes, with how many files
    and links it held then: proof that the restore had already written into it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.removed: list[tuple[Path, int]] = []
        real = snapshot_extract._remove_tree

        def spy(path: Path) -> None:
            held = sum(len(files) for _, _, files in os.walk(path))
            self.removed.append((path, held))
            real(path)

        monkeypatch.setattr(snapshot_extract, "_remove_tree", spy)


def many_good_members(count: int = 300) -> Members:
    """``count`` small files over a few directories, and a link early on."""
    members: Members = [member("early-link", tarfile.SYMTYPE, link="d0/f0.txt")]
    for i in range(count):
        members.append(member(f"d{i % 7}/f{i}.txt", data=f"file {i}\n".encode() * 20))
    return members


# Hostile members that only come after many good ones.
LATE_HOSTILE: dict[str, Callable[[str], Members]] = {
    "dotdot": lambda out: [member("../escape")],
    "absolute-outside": lambda out: [member(f"{out}/sentinel.txt")],
    "link-then-write-through-outside": lambda out: [
        member("zz", tarfile.SYMTYPE, link=out),
        member("zz/sentinel.txt"),
    ],
    "write-then-link": lambda out: [member("d3", tarfile.SYMTYPE, link=out)],
    "early-link-written-through": lambda out: [member("early-link/x")],
    "hardlink-outside": lambda out: [member("h", tarfile.LNKTYPE, link=f"{out}/sentinel.txt")],
    "replaces-a-file": lambda out: [member("d1/f1.txt", data=b"second copy")],
    "fifo": lambda out: [member("pipe", tarfile.FIFOTYPE)],
}
