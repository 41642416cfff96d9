"""The files of a hostile tree, read and written by the worker: nothing outside it.

Each test plants what an agent could plant in its working tree (links to ``/etc/passwd``,
to the data directory, to a sibling sandbox, a link in the middle of a path, a directory
swapped for a link between calls or while an operation runs, a FIFO, a hard link) and
checks from outside that no operation read, wrote or removed anything beyond the tree.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.providers.sandbox_files import (
    MAX_DELETE_DEPTH,
    Owner,
    TreeError,
    delete,
    list_dir,
    read_file,
    split_path,
    write_file,
)

LIMIT = 1 << 20


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data directory with two sandboxes and a secret of the worker's."""
    root = tmp_path / "data"
    (root / "sandboxes" / "box-a").mkdir(parents=True)
    (root / "sandboxes" / "box-b").mkdir(parents=True)
    (root / "sandboxes" / "box-b" / "private.txt").write_text("box-b's secret\n")
    (root / "secret.env").write_text("LIFECYCLE_DATABASE_URL=postgresql://secret\n")
    return root


@pytest.fixture
def tree(data: Path) -> Path:
    t = data / "sandboxes" / "box-a"
    (t / "src").mkdir()
    (t / "src" / "main.py").write_text("print('hi')\n")
    return t


def _p(path: str) -> tuple[str, ...]:
    return split_path(path)


def _refused(kind: str, fn: object, *args: object, **kwargs: object) -> TreeError:
    with pytest.raises(TreeError) as info:
        fn(*args, **kwargs)  # type: ignore[operator]
    assert info.value.kind == kind, info.value
    return info.value


def _snapshot(path: Path) -> dict[str, bytes | str]:
    """Every entry below ``path`` with its content (files) or target (links)."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(path))
            if full.is_symlink():
                out[rel] = "-> " + os.readlink(full)
            elif full.is_file():
                out[rel] = full.read_bytes()
            else:
                out[rel] = "dir"
    return out


# ------------------------------------------------------------------ the plain operations


def test_list_read_write_delete_inside_the_tree(tree: Path) -> None:
    written = write_file(tree, _p("docs/guide/intro.md"), b"# Intro\n")
    assert written == {"path": "docs/guide/intro.md", "size": 8, "created": True}
    assert (tree / "docs" / "guide" / "intro.md").read_bytes() == b"# Intro\n"
    assert read_file(tree, _p("docs/guide/intro.md"), max_bytes=LIMIT) == b"# Intro\n"
    again = write_file(tree, _p("docs/guide/intro.md"), b"v2")
    assert again["created"] is False and (tree / "docs/guide/intro.md").read_bytes() == b"v2"
    (tree / "run.sh").write_text("#!/bin/sh\n")
    (tree / "run.sh").chmod(0o755)
    write_file(tree, _p("run.sh"), b"#!/bin/sh\necho new\n")
    assert (tree / "run.sh").stat().st_mode & 0o777 == 0o755  # the mode is kept

    os.symlink("src/main.py", tree / "link")
    listing = list_dir(tree, (), max_entries=100)
    names = [e["name"] for e in listing["entries"]]
    assert names == ["docs", "link", "run.sh", "src"] and listing["truncated"] is False
    by_name = {e["name"]: e for e in listing["entries"]}
    assert by_name["docs"]["type"] == "dir"
    assert by_name["run.sh"]["type"] == "file" and by_name["run.sh"]["mode"] == "0755"
    assert by_name["link"] == {**by_name["link"], "type": "link", "target": "src/main.py"}
    assert list_dir(tree, (), max_entries=2)["truncated"] is True
    assert [e["name"] for e in list_dir(tree, _p("./src/"), max_entries=9)["entries"]] == [
        "main.py"
    ]
    # No temporary file is left behind.
    assert not [p for p in tree.rglob("*") if ".lifecycle-put-" in p.name]

    assert delete(tree, _p("link")) == {"path": "link", "type": "link"}
    assert (tree / "src" / "main.py").exists()
    _refused("not_empty", delete, tree, _p("docs"))
    assert delete(tree, _p("docs"), recursive=True)["type"] == "dir"
    assert not (tree / "docs").exists()
    _refused("not_found", delete, tree, _p("docs"))
    _refused("not_found", read_file, tree, _p("nope.txt"), max_bytes=LIMIT)
    _refused("not_found", list_dir, tree, _p("nope"), max_entries=9)


def test_bad_paths_are_refused_before_anything_is_touched() -> None:
    for bad in ("/etc/passwd", "/workspace/x", "../x", "a/../../x", "a/..", "a\x00b"):
        _refused("invalid", split_path, bad)
    _refused("invalid", split_path, "a/" * 2100)
    _refused("invalid", split_path, "n" * 256)
    _refused("invalid", split_path, "\udcff")
    assert split_path("") == () and split_path(".") == () and split_path("a//./b/") == ("a", "b")


def test_the_root_cannot_be_replaced_or_deleted(tree: Path) -> None:
    _refused("is_dir", read_file, tree, (), max_bytes=LIMIT)
    _refused("is_dir", write_file, tree, (), b"x")
    _refused("invalid", delete, tree, (), recursive=True)
    _refused("is_dir", read_file, tree, _p("src"), max_bytes=LIMIT)
    _refused("is_dir", write_file, tree, _p("src"), b"x")
    _refused("not_dir", write_file, tree, _p("src/main.py/x"), b"x")


def test_size_limits(tree: Path) -> None:
    (tree / "big.bin").write_bytes(b"x" * 1001)
    err = _refused("too_large", read_file, tree, _p("big.bin"), max_bytes=1000)
    assert err.extra["size"] == 1001 and err.extra["limit"] == 1000
    assert read_file(tree, _p("big.bin"), max_bytes=1001) == b"x" * 1001
    # The sandbox's disk limit bounds a write as it bounds a command.
    err = _refused("too_large", write_file, tree, _p("more.bin"), b"y" * 10_000, disk_limit=8192)
    assert not (tree / "more.bin").exists()


# ------------------------------------------------------------------ links planted in the tree


def test_a_link_to_etc_passwd_is_reported_never_followed(tree: Path) -> None:
    os.symlink("/etc/passwd", tree / "passwd")
    passwd = Path("/etc/passwd").read_bytes()
    err = _refused("link", read_file, tree, _p("passwd"), max_bytes=LIMIT)
    assert err.extra["target"] == "/etc/passwd" and "root:" not in str(err)
    _refused("link", write_file, tree, _p("passwd"), b"pwned::0:0::/:/bin/sh\n")
    _refused("link", list_dir, tree, _p("passwd"), max_entries=9)
    assert Path("/etc/passwd").read_bytes() == passwd
    delete(tree, _p("passwd"))  # the link itself goes
    assert not (tree / "passwd").is_symlink() and Path("/etc/passwd").read_bytes() == passwd


@pytest.mark.parametrize("where", ["data", "sibling"])
def test_links_to_the_data_directory_and_a_sibling_sandbox(
    tree: Path, data: Path, where: str
) -> None:
    target = data if where == "data" else data / "sandboxes" / "box-b"
    os.symlink(target, tree / "escape")  # an absolute link
    os.symlink("../box-b", tree / "rel")  # a relative one, to the sibling
    before = _snapshot(data / "sandboxes" / "box-b"), (data / "secret.env").read_bytes()
    for link in ("escape", "rel"):
        _refused("link", list_dir, tree, _p(link), max_entries=9)
        for name in ("private.txt", "secret.env"):
            _refused("link", read_file, tree, _p(f"{link}/{name}"), max_bytes=LIMIT)
            _refused("link", write_file, tree, _p(f"{link}/{name}"), b"overwritten")
        _refused("link", write_file, tree, _p(f"{link}/new/dir/file"), b"planted")
        _refused("link", delete, tree, _p(f"{link}/private.txt"))
        delete(tree, _p(link), recursive=True)  # removes the link, not what it points to
    after = _snapshot(data / "sandboxes" / "box-b"), (data / "secret.env").read_bytes()
    assert after == before
    assert not (tree / "escape").exists() and not (tree / "rel").exists()


def test_a_link_in_the_middle_of_a_path(tree: Path, data: Path) -> None:
    (tree / "a").mkdir()
    os.symlink(data / "sandboxes" / "box-b", tree / "a" / "b")
    err = _refused("link", read_file, tree, _p("a/b/private.txt"), max_bytes=LIMIT)
    assert err.extra["path"] == "a/b"
    _refused("link", write_file, tree, _p("a/b/c/new.txt"), b"x")
    _refused("link", list_dir, tree, _p("a/b"), max_entries=9)
    assert sorted(os.listdir(data / "sandboxes" / "box-b")) == ["private.txt"]


def test_a_recursive_delete_never_descends_through_a_link(tree: Path, data: Path) -> None:
    before = _snapshot(data)
    deep = tree / "work" / "x" / "y"
    deep.mkdir(parents=True)
    os.symlink(data, deep / "to-data")
    os.symlink(data / "sandboxes" / "box-b", tree / "work" / "to-sibling")
    (deep / "f.txt").write_text("mine")
    delete(tree, _p("work"), recursive=True)
    assert not (tree / "work").exists()
    after = {k: v for k, v in _snapshot(data).items() if not k.startswith("sandboxes/box-a/")}
    assert after == {k: v for k, v in before.items() if not k.startswith("sandboxes/box-a/")}


def test_a_directory_swapped_for_a_link_between_calls(tree: Path, data: Path) -> None:
    write_file(tree, _p("cache/a.txt"), b"first")
    # The agent replaces the directory with a link to the sibling sandbox.
    os.rename(tree / "cache", tree / "cache.old")
    os.symlink(data / "sandboxes" / "box-b", tree / "cache")
    _refused("link", read_file, tree, _p("cache/private.txt"), max_bytes=LIMIT)
    _refused("link", write_file, tree, _p("cache/a.txt"), b"second")
    _refused("link", delete, tree, _p("cache/private.txt"))
    assert (data / "sandboxes" / "box-b" / "private.txt").read_text() == "box-b's secret\n"
    assert not (data / "sandboxes" / "box-b" / "a.txt").exists()


def test_a_directory_swapped_for_a_link_while_operations_run(tree: Path, data: Path) -> None:
    """An agent flips ``d`` between a real directory and a link to a directory outside
    as fast as it can while the worker reads, writes and lists through it."""
    outside = data / "outside"
    outside.mkdir()
    (outside / "f").write_text("OUTSIDE")
    (tree / "d").mkdir()
    (tree / "d" / "f").write_text("inside")
    # The agent: another process, flipping until told to stop.
    flipper = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "tree, outside = sys.argv[1], sys.argv[2]\n"
            "d, real, link = tree + '/d', tree + '/d.real', tree + '/d.link'\n"
            "while not os.path.exists(tree + '/stop'):\n"
            "    try:\n"
            "        os.rename(d, real); os.symlink(outside, link); os.rename(link, d)\n"
            "        os.rename(d, link); os.rename(real, d); os.unlink(link)\n"
            "    except OSError:\n"
            "        pass\n",
            str(tree),
            str(outside),
        ]
    )
    seen: set[object] = set()
    try:
        for i in range(500):
            try:
                seen.add(read_file(tree, _p("d/f"), max_bytes=LIMIT))
            except TreeError as exc:
                seen.add(exc.kind)
            with contextlib.suppress(TreeError, OSError):  # refused, or raced: never outside
                write_file(tree, _p(f"d/w{i}"), b"written")
            try:
                names = {e["name"] for e in list_dir(tree, _p("d"), max_entries=99)["entries"]}
                assert "OUTSIDE" not in names
            except TreeError:
                pass
    finally:
        (tree / "stop").touch()
        flipper.wait()
    # Only the inside file's content, or a refusal: never what the link pointed to.
    assert seen <= {b"inside", "link", "not_found", "not_dir"}, seen
    assert sorted(os.listdir(outside)) == ["f"] and (outside / "f").read_text() == "OUTSIDE"


# ------------------------------------------------------------------ special files


def test_a_fifo_or_a_socket_is_refused_without_blocking(tree: Path) -> None:
    os.mkfifo(tree / "pipe")
    _refused("not_regular", read_file, tree, _p("pipe"), max_bytes=LIMIT)
    _refused("not_regular", write_file, tree, _p("pipe"), b"x")
    entry = list_dir(tree, (), max_entries=9)["entries"]
    assert {"name": "pipe", "type": "other"}.items() <= next(
        e for e in entry if e["name"] == "pipe"
    ).items()
    delete(tree, _p("pipe"))
    assert not (tree / "pipe").exists()


def test_a_write_replaces_a_hard_link_never_writes_through_it(tree: Path, data: Path) -> None:
    other = data / "sandboxes" / "box-a-hardlinked.txt"
    other.write_text("kept")
    os.link(other, tree / "hard.txt")
    write_file(tree, _p("hard.txt"), b"replaced")
    assert other.read_text() == "kept" and (tree / "hard.txt").read_bytes() == b"replaced"


def test_names_that_are_not_utf8_are_listed_as_text(tree: Path) -> None:
    os.symlink(b"\xff-target", os.path.join(os.fsencode(tree), b"bad-\xfe"))
    entries = list_dir(tree, (), max_entries=9)["entries"]
    bad = next(e for e in entries if e["name"].startswith("bad-"))
    assert bad["name"] == "bad-\ufffd" and bad["target"] == "\ufffd-target"


def test_a_very_deep_tree_is_refused_not_overflowed(tree: Path) -> None:
    path = tree / "deep"
    path.mkdir()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(MAX_DELETE_DEPTH + 5):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)
    _refused("too_deep", delete, tree, _p("deep"), recursive=True)
    assert (tree / "deep").is_dir()


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another uid needs root")
def test_what_a_write_creates_belongs_to_the_sandbox_uid(tree: Path) -> None:
    owner = Owner(2_345_678, 2_345_678)
    write_file(tree, _p("new/dir/file.txt"), b"x", owner=owner)
    for made in (tree / "new", tree / "new" / "dir", tree / "new" / "dir" / "file.txt"):
        st = made.lstat()
        assert (st.st_uid, st.st_gid) == (owner.uid, owner.gid), made
