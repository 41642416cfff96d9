"""FileSnapshotStore against real files, real tar and real zstd (no mocks)."""

from __future__ import annotations

import io
import os
import shutil
import socket
import stat
import tarfile
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.support.snapshots import (
    LATE_HOSTILE,
    MALICIOUS,
    Members,
    StagingSpy,
    assert_nothing_written,
    corruptions,
    git,
    make_workdir,
    make_writable,
    manifest,
    many_good_members,
    member,
    tar_bytes,
    zstd_bytes,
)
from worker.providers import snapshot_extract
from worker.providers.base import PermanentProviderError, SnapshotStore
from worker.providers.file_snapshots import FileSnapshotStore
from worker.providers.local_sandbox import LocalSandboxProvider
from worker.providers.snapshot_archive import DropSpecialMembers

STORE_VARIANTS = ["zstd-binary", "zstd-library", "python-tarfile"]


def make_store(root: Path, variant: str) -> FileSnapshotStore:
    if variant == "zstd-binary":
        if shutil.which("zstd") is None:
            pytest.skip("no zstd binary on PATH")
        return FileSnapshotStore(root, use_zstd_binary=True)
    if variant == "zstd-library":
        return FileSnapshotStore(root, use_zstd_binary=False)
    return FileSnapshotStore(root, use_zstd_binary=False, use_tar_binary=False)


@pytest.fixture
def store(tmp_path: Path) -> FileSnapshotStore:
    return FileSnapshotStore(tmp_path / "snapshots")


def test_implements_protocol(store: FileSnapshotStore) -> None:
    assert isinstance(store, SnapshotStore)
    assert store.kind == "file"


@pytest.mark.parametrize("variant", STORE_VARIANTS)
def test_round_trip_is_byte_for_byte(tmp_path: Path, variant: str) -> None:
    store = make_store(tmp_path / "snapshots", variant)
    work = make_workdir(tmp_path)
    status_before = git("status", "--porcelain", cwd=work)
    before = manifest(work)

    info = store.save("sess-1/snap-1", work)
    assert info.url == (tmp_path / "snapshots" / "sess-1" / "snap-1.tar.zst").as_uri()
    assert info.size_bytes == (tmp_path / "snapshots" / "sess-1" / "snap-1.tar.zst").stat().st_size
    assert info.size_bytes > 0
    assert info.created_at.tzinfo is not None
    assert info.created_at.utcoffset() == UTC.utcoffset(None)

    target = tmp_path / "restored"
    store.restore(info.url, target)
    after = manifest(target)
    assert before.pop("pipe")[0] == "fifo"
    assert after == before  # everything but the FIFO, which snapshots leave out
    assert stat.S_IMODE(target.stat().st_mode) == stat.S_IMODE(work.stat().st_mode)
    a, b = target / "src" / "app.py", target / "hardlinked.py"
    assert a.stat().st_ino == b.stat().st_ino  # hard links stay hard links
    assert git("status", "--porcelain", cwd=target) == status_before
    assert git("rev-parse", "--abbrev-ref", "HEAD", cwd=target).strip() == "session/x"
    assert "TWO" in git("diff", cwd=target)
    make_writable(work)
    make_writable(target)


def test_restore_into_existing_empty_dir(store: FileSnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    info = store.save("k", src)
    target = tmp_path / "empty"
    target.mkdir()
    store.restore(info.url, target)
    assert (target / "a.txt").read_text() == "a"


def test_restore_into_non_empty_dir_is_refused(store: FileSnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a")
    info = store.save("k", src)
    target = tmp_path / "busy"
    target.mkdir()
    (target / "mine.txt").write_text("keep")
    with pytest.raises(PermanentProviderError, match="not empty"):
        store.restore(info.url, target)
    assert [p.name for p in target.iterdir()] == ["mine.txt"]


def test_save_is_idempotent_per_key(store: FileSnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("first")
    first = store.save("same", src)
    (src / "a.txt").write_text("second, longer")
    second = store.save("same", src)
    assert first.url == second.url
    assert store.count() == 1
    assert [p.name for p in store.root.iterdir()] == ["same.tar.zst"]  # no temp leftovers
    target = tmp_path / "out"
    store.restore(second.url, target)
    assert (target / "a.txt").read_text() == "second, longer"


def test_count_and_delete(store: FileSnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    assert store.count() == 0
    one = store.save("s/1", src)
    two = store.save("s/2", src)
    store.save("other", src)
    assert store.count() == 3
    store.delete(one.url)
    store.delete(one.url)  # idempotent
    assert store.count() == 2
    store.delete(two.url)
    assert store.count() == 1
    with pytest.raises(PermanentProviderError, match="not found"):
        store.restore(one.url, tmp_path / "t")
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize("key", ["", "../x", "/abs", "a//b", ".hidden", "a/../b", "a/.", "x y"])
def test_unsafe_keys_are_refused(store: FileSnapshotStore, tmp_path: Path, key: str) -> None:
    with pytest.raises(PermanentProviderError, match="invalid snapshot key"):
        store.save(key, tmp_path)
    assert not store.root.exists() or store.count() == 0


@pytest.mark.parametrize(
    "url",
    [
        "s3://bucket/k.tar.zst",
        "https://example.com/k.tar.zst",
        "file:///etc/passwd",
        "file://otherhost/{root}/k.tar.zst",
        "file://{root}/../k.tar.zst",
        "file://{root}/k.tar",
        "{root}/k.tar.zst",
    ],
)
def test_foreign_urls_are_refused(store: FileSnapshotStore, tmp_path: Path, url: str) -> None:
    url = url.format(root=store.root)
    with pytest.raises(PermanentProviderError, match="not a file:// URL of this store"):
        store.restore(url, tmp_path / "t")
    with pytest.raises(PermanentProviderError):
        store.delete(url)
    assert not (tmp_path / "t").exists()


def test_missing_source_dir_is_permanent(store: FileSnapshotStore, tmp_path: Path) -> None:
    with pytest.raises(PermanentProviderError, match="source directory is missing"):
        store.save("k", tmp_path / "nope")


# ------------------------------------------------------------------ corrupt archives


def _good_archive(tmp_path: Path, store: FileSnapshotStore) -> bytes:
    src = tmp_path / "good-src"
    src.mkdir()
    (src / "a.txt").write_bytes(os.urandom(20000))
    (src / "b.txt").write_text("b" * 5000)
    info = store.save("good", src)
    return store.path_for("good").read_bytes() if info.url else b""


@pytest.mark.parametrize(
    "case",
    [
        "empty",
        "random",
        "half",
        "missing-checksum",
        "flipped-byte",
        "zstd-of-garbage",
        "trailing-junk",
        "junk-after-tar-end",
        "plain-tar",
    ],
)
@pytest.mark.parametrize("variant", ["zstd-binary", "zstd-library"])
def test_corrupt_archive_is_permanent(tmp_path: Path, case: str, variant: str) -> None:
    """Refused alike whether the ``zstd`` binary or the library decompresses."""
    store = make_store(tmp_path / "snapshots", variant)
    blob = corruptions(_good_archive(tmp_path, store))[case]
    store.path_for("bad").write_bytes(blob)
    target = tmp_path / "target"
    with pytest.raises(PermanentProviderError, match="snapshot bad is corrupt"):
        store.restore(store.url_for("bad"), target)
    assert not target.exists()


def test_failed_restore_leaves_existing_empty_target_empty(
    store: FileSnapshotStore, tmp_path: Path
) -> None:
    store.root.mkdir(parents=True)
    store.path_for("bad").write_bytes(zstd_bytes(tar_bytes({"a": b"1"}) + b"\x07" * 2048))
    target = tmp_path / "target"
    target.mkdir(mode=0o750)
    with pytest.raises(PermanentProviderError):
        store.restore(store.url_for("bad"), target)
    assert target.is_dir()
    assert list(target.iterdir()) == []
    assert stat.S_IMODE(target.stat().st_mode) == 0o750


# ---------------------------------------------------------------- malicious archives


def _write_archive(store: FileSnapshotStore, key: str, members: Members, fmt: int = tarfile.GNU_FORMAT) -> str:  # fmt: skip
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    store.root.mkdir(parents=True, exist_ok=True)
    store.path_for(key).write_bytes(zstd_bytes(buf.getvalue()))
    return store.url_for(key)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory beside the sandboxes with a sentinel a hostile archive aims at."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "sentinel.txt").write_text("original\n")
    return out


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_malicious_archive_is_refused(
    store: FileSnapshotStore, tmp_path: Path, outside: Path, case: str, fmt: int
) -> None:
    url = _write_archive(store, "evil", MALICIOUS[case](str(outside)), fmt)
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    target = parent / "target"
    before = manifest(tmp_path)
    with pytest.raises(PermanentProviderError, match="snapshot evil refused: member '") as err:
        store.restore(url, target)
    assert_nothing_written(tmp_path, parent, outside, before)
    assert "pwned" not in str(err.value)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("link-then-write-through", "would be written through the symbolic link 'a'"),
        ("write-then-link", "is a link, but earlier members are below it"),
        ("hardlinked-link-then-write-through", "would be written through the symbolic link 'h'"),
        ("hardlink-absolute", "is a hard link to '/etc/passwd', outside the sandbox"),
        (
            "hardlink-through-symlink",
            "is a hard link to 'l/sentinel.txt', through the symbolic link 'l'",
        ),
        ("dotdot", "would land outside the sandbox"),
        ("absolute", "would land outside the sandbox"),
        ("empty-name", "has an empty or invalid name"),
        ("dot-as-file", "would replace the sandbox directory itself"),
        ("fifo", "is a FIFO (named pipe)"),
        ("char-device", "is a device file"),
        ("block-device", "is a device file"),
    ],
)
def test_refusal_says_why(
    store: FileSnapshotStore, tmp_path: Path, outside: Path, case: str, reason: str
) -> None:
    url = _write_archive(store, "evil", MALICIOUS[case](str(outside)))
    with pytest.raises(PermanentProviderError) as err:
        store.restore(url, tmp_path / "t")
    message = str(err.value)
    assert message.startswith("snapshot evil refused: member '"), message
    assert reason in message, message


def test_hostile_archive_leaves_no_sandbox_and_no_temp_tree(
    store: FileSnapshotStore, tmp_path: Path, outside: Path
) -> None:
    """Through the sandbox provider: the restore's temporary tree is removed too."""
    url = _write_archive(store, "evil", MALICIOUS["link-then-write-through-outside"](str(outside)))
    sandboxes = LocalSandboxProvider(tmp_path / "sandboxes")
    before = manifest(outside)
    with pytest.raises(PermanentProviderError, match="written through the symbolic link 'a'"):
        sandboxes.start_from_snapshot("s1", store, url)
    assert not sandboxes.exists("s1")
    assert list(sandboxes.root.iterdir()) == []
    assert manifest(outside) == before


def test_refusal_message_names_the_member(store: FileSnapshotStore, tmp_path: Path) -> None:
    url = _write_archive(store, "evil", MALICIOUS["dotdot"](str(tmp_path)))
    with pytest.raises(PermanentProviderError) as err:
        store.restore(url, tmp_path / "t")
    assert str(err.value) == (
        "snapshot evil refused: member '../escape' would land outside the sandbox"
    )


# ------------------------------------------------ single pass through a staging directory


@pytest.mark.parametrize("existing", [False, True], ids=["missing-target", "empty-target"])
@pytest.mark.parametrize("case", sorted(LATE_HOSTILE))
def test_a_hostile_member_late_in_the_archive_leaves_nothing_behind(
    store: FileSnapshotStore,
    tmp_path: Path,
    outside: Path,
    monkeypatch: pytest.MonkeyPatch,
    case: str,
    existing: bool,
) -> None:
    """Hundreds of good files are written (into the staging directory) before the
    hostile member arrives: all of it goes, and the target is as it was found."""
    members = many_good_members() + LATE_HOSTILE[case](str(outside))
    url = _write_archive(store, "evil", members)
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    target = parent / "target"
    if existing:
        target.mkdir(mode=0o750)
    before = manifest(tmp_path)
    spy = StagingSpy(monkeypatch)
    with pytest.raises(PermanentProviderError, match="snapshot evil refused: member '"):
        store.restore(url, target)
    [(staging, held)] = spy.removed
    assert staging.parent == parent and held >= 300  # it was well under way
    assert manifest(tmp_path) == before
    assert sorted(p.name for p in parent.iterdir()) == (["target"] if existing else [])
    assert (outside / "sentinel.txt").read_text() == "original\n"
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize("existing", [False, True], ids=["missing-target", "empty-target"])
@pytest.mark.parametrize("flip", [1, 4, 9])
def test_corruption_in_the_last_bytes_leaves_the_target_untouched(
    store: FileSnapshotStore,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    flip: int,
    existing: bool,
) -> None:
    """The damage is only found when the stream ends (the zstd frame's checksum), once
    every file is written: the staging directory goes, the target stays as found."""
    src = tmp_path / "src"
    for i in range(200):
        (src / f"d{i % 5}").mkdir(parents=True, exist_ok=True)
        (src / f"d{i % 5}" / f"f{i}.bin").write_bytes(os.urandom(600))  # incompressible
    os.symlink("d0/f0.bin", src / "link")
    info = store.save("k", src)
    blob = bytearray(store.path_for("k").read_bytes())
    blob[-flip] ^= 0x55
    store.path_for("k").write_bytes(bytes(blob))
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    target = parent / "target"
    if existing:
        target.mkdir(mode=0o750)
    spy = StagingSpy(monkeypatch)
    with pytest.raises(PermanentProviderError, match="snapshot k is corrupt: "):
        store.restore(info.url, target)
    [(staging, held)] = spy.removed
    # The files of the blocks before the damaged one (~85 a block of 128 KiB: the zstd
    # binary holds one decoded block back until the next decodes, the library does not).
    assert staging.parent == parent and held >= 50
    if existing:
        assert [p.name for p in parent.iterdir()] == ["target"]
        assert list(target.iterdir()) == []
        assert stat.S_IMODE(target.stat().st_mode) == 0o750
    else:
        assert list(parent.iterdir()) == []


def test_without_a_root_member_the_target_keeps_its_mode(
    store: FileSnapshotStore, tmp_path: Path
) -> None:
    """As when extracting in place: an existing target keeps its mode, a missing one
    gets the mode mkdir gives (the umask's)."""
    url = _write_archive(store, "noroot", [member("a.txt", data=b"a")])
    existing = tmp_path / "existing"
    existing.mkdir(mode=0o750)
    store.restore(url, existing)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750
    assert (existing / "a.txt").read_bytes() == b"a"
    fresh = tmp_path / "fresh"
    store.restore(url, fresh)
    (tmp_path / "plain").mkdir()
    assert fresh.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_target_filled_during_the_restore_is_not_replaced(
    store: FileSnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename replaces only an empty directory: a target that something else
    filled meanwhile keeps its contents, and the restore fails."""
    url = _write_archive(store, "k", [member("a.txt", data=b"a")])
    target = tmp_path / "target"
    target.mkdir()
    real = snapshot_extract._move_into_place

    def meanwhile(key: str, staging: Path, dest: Path) -> None:
        (dest / "theirs.txt").write_text("theirs")
        real(key, staging, dest)

    monkeypatch.setattr(snapshot_extract, "_move_into_place", meanwhile)
    with pytest.raises(PermanentProviderError, match="target directory is not empty"):
        store.restore(url, target)
    assert [p.name for p in tmp_path.iterdir() if p.name != "snapshots"] == ["target"]
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]


def test_the_staging_directory_is_named_after_the_target(
    store: FileSnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hidden, beside the target, and starting with a dotted target's own name (so the
    sandbox provider's sweep of ``.tmp+<name>+*`` finds a killed restore's leftovers)."""
    url = _write_archive(store, "k", [member("a.txt", data=b"a"), member("../x")])
    spy = StagingSpy(monkeypatch)
    for name in ("plain", ".tmp+s1+abc"):
        with pytest.raises(PermanentProviderError):
            store.restore(url, tmp_path / name)
    names = [path.name for path, _ in spy.removed]
    assert names[0].startswith(".plain.restore+")
    assert names[1].startswith(".tmp+s1+abc.restore+")
    assert all(path.parent == tmp_path for path, _ in spy.removed)


def test_internal_symlinks_and_loops_are_accepted(store: FileSnapshotStore, tmp_path: Path) -> None:
    url = _write_archive(
        store,
        "fine",
        [
            member("sub", tarfile.DIRTYPE),
            member("sub/file", data=b"data"),
            member("to-file", tarfile.SYMTYPE, link="sub/file"),
            member("sub/up", tarfile.SYMTYPE, link="../to-file"),
            member("sub/self", tarfile.SYMTYPE, link="."),
            member("via-self", tarfile.SYMTYPE, link="sub/self/file"),
            member("loop-a", tarfile.SYMTYPE, link="loop-b"),
            member("loop-b", tarfile.SYMTYPE, link="loop-a"),
            member("hard", tarfile.LNKTYPE, link="sub/file"),
        ],
    )
    target = tmp_path / "t"
    store.restore(url, target)
    assert (target / "sub" / "up").read_bytes() == b"data"
    assert (target / "via-self").read_bytes() == b"data"
    assert (target / "hard").stat().st_ino == (target / "sub" / "file").stat().st_ino
    assert os.readlink(target / "loop-a") == "loop-b"


def test_links_pointing_anywhere_are_restored_as_links(
    store: FileSnapshotStore, tmp_path: Path, outside: Path
) -> None:
    """Links are kept whatever they point at, and never followed while restoring: the
    files below (and after) them land in the tree, the linked-to places stay as they
    were."""
    links = {
        "abs": str(outside),
        "abs-file": f"{outside}/sentinel.txt",
        "etc": "/etc",
        "up": "..",
        "deep-up": "../../../escape",
        "sub/up": "../../escape",
        "chain-d": ".",
        "chain-x": "chain-d/../escape",  # the kernel resolves chain-d first: ../escape
        "dangling": "no/such/file",
        "dangling-abs": "/no/such/file",
        "self": "self",
    }
    members: Members = [member("sub", tarfile.DIRTYPE)]
    members += [member(name, tarfile.SYMTYPE, link=to) for name, to in links.items()]
    members += [
        member("sub/after.txt", data=b"after the links"),
        member("hard-to-link", tarfile.LNKTYPE, link="abs"),  # a hard link to a link
    ]
    url = _write_archive(store, "links", members)
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    target = parent / "t"
    before_outside = manifest(outside)

    store.restore(url, target)

    for name, to in links.items():
        assert (target / name).is_symlink(), name
        assert os.readlink(target / name) == to, name
    assert (target / "sub" / "after.txt").read_bytes() == b"after the links"
    hard = target / "hard-to-link"
    assert hard.is_symlink() and os.readlink(hard) == str(outside)
    assert hard.lstat().st_ino == (target / "abs").lstat().st_ino
    assert manifest(outside) == before_outside
    assert sorted(p.name for p in parent.iterdir()) == ["t"]
    assert not (tmp_path / "escape").exists() and not (parent / "escape").exists()


def test_links_are_made_after_files_and_before_directory_modes(
    store: FileSnapshotStore, tmp_path: Path
) -> None:
    """A link listed before the files it sits beside, in a read-only directory."""
    ro = member("ro", tarfile.DIRTYPE)
    ro[0].mode = 0o555
    url = _write_archive(
        store,
        "order",
        [
            member("ro/link", tarfile.SYMTYPE, link="/usr/bin/python3"),
            ro,
            member("ro/file.txt", data=b"file"),
            member("implied/dir/link", tarfile.SYMTYPE, link="../../ro/file.txt"),
        ],
    )
    target = tmp_path / "t"
    store.restore(url, target)
    assert os.readlink(target / "ro" / "link") == "/usr/bin/python3"
    assert (target / "implied" / "dir" / "link").read_bytes() == b"file"
    assert stat.S_IMODE((target / "ro").stat().st_mode) == 0o555
    make_writable(target)


def make_venv_like(root: Path, outside: Path) -> Path:
    """A sandbox with a Python virtualenv and node_modules: absolute links out of the
    tree, relative ones, dangling ones, a hard link to a link."""
    work = root / "sandbox"
    venv = work / ".venv"
    (venv / "bin").mkdir(parents=True)
    site = venv / "lib" / "python3.12" / "site-packages" / "pkg"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text("VERSION = '1.0'\n")
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python3").symlink_to("python")
    (venv / "bin" / "python3.12").symlink_to("python")
    (venv / "lib64").symlink_to("lib")
    (venv / "bin" / "activate").write_text(f"VIRTUAL_ENV={venv}\n")
    (venv / "bin" / "pip").write_text("#!/usr/bin/env python\n")
    (venv / "bin" / "pip").chmod(0o755)
    tool = work / "node_modules" / "tool"
    tool.mkdir(parents=True)
    (tool / "cli.js").write_text("#!/usr/bin/env node\n")
    (work / "node_modules" / ".bin").mkdir()
    (work / "node_modules" / ".bin" / "tool").symlink_to("../tool/cli.js")
    (work / "node_modules" / "linked-pkg").symlink_to(str(outside))  # npm link
    (work / "system-lib").symlink_to("/usr/lib")
    (work / "dangling").symlink_to("/nonexistent/anywhere")
    (work / "dangling-rel").symlink_to("../not-there")
    os.link(venv / "bin" / "python", work / "python-hardlink", follow_symlinks=False)
    return work


@pytest.mark.parametrize("variant", STORE_VARIANTS)
def test_venv_with_absolute_links_round_trips(tmp_path: Path, outside: Path, variant: str) -> None:
    store = make_store(tmp_path / "snapshots", variant)
    work = make_venv_like(tmp_path, outside)
    before = manifest(work)
    info = store.save("venv", work)

    # Stored as links: nothing below them (or of what they point at) in the archive.
    with store.path_for("venv").open("rb") as fh:
        data = zstandard.ZstdDecompressor().stream_reader(fh).read()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        members = {m.name.removeprefix("./"): m for m in tf.getmembers()}
    # .venv/bin/python and python-hardlink share an inode: whichever tar met first is
    # the symbolic link, the other a hard link to it (tarfile: two symbolic links).
    python, hard = members[".venv/bin/python"], members["python-hardlink"]
    first = python if python.issym() else hard
    assert first.issym() and first.linkname == "/usr/bin/python3"
    assert {python.type, hard.type} <= {tarfile.SYMTYPE, tarfile.LNKTYPE}
    assert members["node_modules/linked-pkg"].issym()
    assert members["system-lib"].issym()
    assert not any(name.startswith(("node_modules/linked-pkg/", "system-lib/")) for name in members)
    assert b"original" not in data  # the sentinel outside was never read

    target = tmp_path / "restored"
    store.restore(info.url, target)
    assert manifest(target) == before  # byte for byte, modes, link targets
    for link in (".venv/bin/python", ".venv/lib64", "node_modules/linked-pkg", "dangling"):
        assert (target / link).is_symlink()
        assert os.readlink(target / link) == os.readlink(work / link)
    assert os.readlink(target / ".venv" / "bin" / "python") == "/usr/bin/python3"
    assert os.readlink(target / "python-hardlink") == "/usr/bin/python3"
    if tarfile.LNKTYPE in (python.type, hard.type):  # restored as one inode again
        assert (target / "python-hardlink").lstat().st_ino == (
            target / ".venv" / "bin" / "python"
        ).lstat().st_ino
    assert (target / ".venv" / "lib64" / "python3.12" / "site-packages" / "pkg").is_dir()
    assert (outside / "sentinel.txt").read_text() == "original\n"


@pytest.mark.parametrize("variant", STORE_VARIANTS)
def test_dangling_link_round_trips(tmp_path: Path, variant: str) -> None:
    store = make_store(tmp_path / "snapshots", variant)
    work = tmp_path / "work"
    work.mkdir()
    (work / "later").symlink_to("created-later.txt")
    (work / "gone").symlink_to("/tmp/definitely-not-here-" + os.urandom(4).hex())
    info = store.save("dangling", work)
    target = tmp_path / "restored"
    store.restore(info.url, target)
    assert manifest(target) == manifest(work)
    assert not (target / "later").exists() and (target / "later").is_symlink()
    assert os.readlink(target / "gone") == os.readlink(work / "gone")


@pytest.mark.parametrize("variant", STORE_VARIANTS)
def test_symlinked_sandbox_root_is_refused_not_followed(
    tmp_path: Path, outside: Path, variant: str
) -> None:
    store = make_store(tmp_path / "snapshots", variant)
    root = tmp_path / "sandbox"
    root.symlink_to(outside, target_is_directory=True)
    with pytest.raises(PermanentProviderError, match="source directory is a symbolic link"):
        store.save("root-link", root)
    assert store.count() == 0
    assert not store.path_for("root-link").exists()


@pytest.mark.parametrize("variant", STORE_VARIANTS)
def test_fifos_and_sockets_are_left_out_of_snapshots(tmp_path: Path, variant: str) -> None:
    store = make_store(tmp_path / "snapshots", variant)
    work = tmp_path / "work"
    (work / ("d" * 120)).mkdir(parents=True)
    (work / "a.txt").write_text("a")
    os.mkfifo(work / "pipe")
    os.mkfifo(work / ("d" * 120) / ("p" * 120))  # with a GNU long-name header
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(work / "sock"))
        info = store.save("special", work)
    (work / "sock").unlink()
    target = tmp_path / "restored"
    store.restore(info.url, target)
    expected = manifest(work)
    del expected["pipe"], expected[f"{'d' * 120}/{'p' * 120}"]
    assert manifest(target) == expected


def _special_archive(fmt: int) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A tar with FIFOs and devices (some with long names) between ordinary members,
    and the (name, content) list expected once they are dropped."""
    members = [
        member("a.txt", data=b"a" * 700),
        member("pipe", tarfile.FIFOTYPE),
        member("n" * 150, data=b"long name kept"),
        member("p" * 150, tarfile.FIFOTYPE),
        member("dev", tarfile.CHRTYPE),
        member("l" * 150, tarfile.SYMTYPE, link="t" * 150),
        member("blk" * 60, tarfile.BLKTYPE),
        member("z.txt", data=b""),
        member("big.bin", data=os.urandom(5000)),
    ]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if info.isreg() else None)
    kept = [
        (info.name, data if info.isreg() else info.linkname.encode())
        for info, data in members
        if info.type not in (tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE)
    ]
    return buf.getvalue(), kept


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT], ids=["gnu", "pax"])
@pytest.mark.parametrize("chunk", [1, 511, 512, 513, 4096, 1 << 20])
def test_special_members_are_dropped_from_the_tar_stream(fmt: int, chunk: int) -> None:
    raw, kept = _special_archive(fmt)
    drop = DropSpecialMembers()
    out = b"".join(drop.feed(raw[i : i + chunk]) for i in range(0, len(raw), chunk))
    out += drop.finish()
    assert drop.dropped == 4
    with tarfile.open(fileobj=io.BytesIO(out), mode="r:") as tf:
        got = [
            (m.name, tf.extractfile(m).read() if m.isreg() else m.linkname.encode())  # type: ignore[union-attr]
            for m in tf.getmembers()
        ]
    assert got == kept


def test_tar_stream_filter_passes_unparseable_data_through() -> None:
    raw, _ = _special_archive(tarfile.GNU_FORMAT)
    junk = bytearray(raw)
    junk[512 * 3 + 148] ^= 0x01  # a header checksum further on no longer matches
    drop = DropSpecialMembers()
    out = drop.feed(bytes(junk)) + drop.finish()
    assert out.endswith(bytes(junk[512 * 3 :]))  # unchanged from the bad header on


@pytest.mark.parametrize("chunk", [4096, 1 << 20])
def test_tar_stream_filter_gives_up_on_an_oversized_pax_header(chunk: int) -> None:
    """More than 1 MiB of pax header before a member: passed on unchanged (bounded
    memory), never cut in a way that would glue the header to another member."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        tf.addfile(member("a.txt", data=b"a")[0], io.BytesIO(b"a"))
        info = member("pipe", tarfile.FIFOTYPE)[0]
        info.pax_headers = {"comment": "c" * (2 << 20)}
        tf.addfile(info)
    raw = buf.getvalue()
    drop = DropSpecialMembers()
    out = b"".join(drop.feed(raw[i : i + chunk]) for i in range(0, len(raw), chunk))
    assert out + drop.finish() == raw
    assert drop.dropped == 0


def test_setuid_bits_are_dropped(store: FileSnapshotStore, tmp_path: Path) -> None:
    info, data = member("suid", data=b"#!/bin/sh\n")
    info.mode = 0o4755
    url = _write_archive(store, "suid", [(info, data)])
    store.restore(url, tmp_path / "t")
    assert stat.S_IMODE((tmp_path / "t" / "suid").stat().st_mode) == 0o755


def test_abandoned_temp_files_are_swept(store: FileSnapshotStore, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    store.root.mkdir(parents=True)
    old = store.root / ".k.tar.zst.killed.tmp"
    fresh = store.root / ".k.tar.zst.running.tmp"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"partial")
    os.utime(old, (1_000_000_000, 1_000_000_000))
    store.save("k", src)
    assert not old.exists()
    assert fresh.exists()
    assert store.count() == 1


def test_streams_run_with_a_fine_gil_switch_interval_which_is_restored_after(
    store: FileSnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from worker.providers import snapshot_extract
    from worker.providers.snapshot_archive import fine_switching

    before = sys.getswitchinterval()
    with fine_switching():
        assert sys.getswitchinterval() == min(before, 0.0005)
        with fine_switching():  # nested (another thread's stream): still fine
            pass
        assert sys.getswitchinterval() == min(before, 0.0005)
    assert sys.getswitchinterval() == before

    seen: list[float] = []
    extract = snapshot_extract._extract

    def spy(*args: Any) -> bool:
        seen.append(sys.getswitchinterval())
        return extract(*args)

    monkeypatch.setattr(snapshot_extract, "_extract", spy)
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    store.restore(store.save("k", src).url, tmp_path / "out")
    assert seen == [min(before, 0.0005)] and sys.getswitchinterval() == before


def test_a_refusal_deep_in_a_1200_level_tree_leaves_nothing_behind(
    store: FileSnapshotStore, tmp_path: Path
) -> None:
    """A legal path 1,200 directories down (past Python's recursion limit, well inside
    PATH_MAX from any temporary directory), then a refused member: the staging
    directory is removed however deep it goes (a recursive removal stopped at the
    recursion limit and left it beside the target)."""
    deep = tarfile.TarInfo("a/" * 1200 + "f")
    deep.size = 1
    fifo = tarfile.TarInfo("fifo")
    fifo.type = tarfile.FIFOTYPE
    url = _write_archive(store, "deep", [(deep, b"x"), (fifo, b"")])
    parent = tmp_path / "sandboxes"
    parent.mkdir()
    with pytest.raises(PermanentProviderError, match="member 'fifo' is a FIFO"):
        store.restore(url, parent / "t")
    assert list(parent.iterdir()) == []


def test_paths_past_the_budget_are_refused(
    store: FileSnapshotStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every directory on a member's way is recorded: names near PATH_MAX, thousands of
    levels deep, would cost megabytes each to check. Past the budget (made small here)
    the snapshot is refused."""
    from worker.providers import snapshot_extract

    monkeypatch.setattr(snapshot_extract, "_MAX_RECORDED", 50_000)
    members = []
    for branch in range(3):
        info = tarfile.TarInfo(f"b{branch}/" + "d/" * 1000 + "f")
        info.size = 1
        members.append((info, b"x"))
    url = _write_archive(store, "wide", members)
    with pytest.raises(PermanentProviderError, match="paths past 0 MiB"):
        store.restore(url, tmp_path / "t")
    assert not (tmp_path / "t").exists()
