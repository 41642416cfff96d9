"""compute_diff against real git repositories built in tmp_path (no mocks)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from worker.providers import git_diff as diffs_compute
from worker.providers.base import PermanentProviderError
from worker.providers.git_diff import compute_diff


@pytest.fixture(autouse=True)
def _isolated_git(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the user's and the system's git config out of the tests."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for var in ("AUTHOR", "COMMITTER"):
        monkeypatch.setenv(f"GIT_{var}_NAME", "Test")
        monkeypatch.setenv(f"GIT_{var}_EMAIL", "test@example.com")
    for var in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(var, raising=False)


def git(cwd: Path, *args: str) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, check=True, text=True, encoding="utf-8"
    )
    return proc.stdout


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="")


def lines(n: int, prefix: str = "line") -> str:
    return "".join(f"{prefix} {i}\n" for i in range(n))


BASE_FILES: dict[str, str | bytes] = {
    "README.md": "hello\nworld\n",
    "src/app.py": lines(20, "app"),
    "src/old_name.py": lines(30, "moved"),
    "delete_me.txt": lines(4, "gone"),
    "image.bin": bytes(range(256)) * 4,
    "package-lock.json": '{\n  "lockfileVersion": 3\n}\n',
    ".gitignore": "*.log\nbuild/\n",
}


@pytest.fixture
def repos(tmp_path: Path) -> tuple[Path, Path, Path]:
    """``(seed, origin, work)``: origin is bare with ``main``; work is a clone on a branch."""
    seed = tmp_path / "seed"
    seed.mkdir()
    git(seed, "init", "-q", "-b", "main")
    for name, content in BASE_FILES.items():
        write(seed / name, content)
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "base")
    origin = tmp_path / "origin.git"
    git(tmp_path, "clone", "-q", "--bare", str(seed), str(origin))
    git(seed, "remote", "add", "origin", str(origin))
    work = tmp_path / "work"
    git(tmp_path, "clone", "-q", str(origin), str(work))
    git(work, "checkout", "-q", "-b", "session/abc")
    return seed, origin, work


def by_path(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f["path"]: f for f in result["files"]}


def merge_base(work: Path, ref: str = "origin/main") -> str:
    return git(work, "merge-base", "HEAD", ref).strip()


def independent_numstat(work: Path, tmp_path: Path, base: str) -> tuple[int, int, int]:
    """Totals from plain ``git add -A`` + ``git diff --cached --numstat`` in a copy."""
    copy = tmp_path / "numstat-copy"
    shutil.copytree(work, copy, symlinks=True)
    git(copy, "add", "-A")
    out = git(copy, "-c", "core.quotepath=off", "diff", "--cached", "-M", "--numstat", "-z", base)
    added = deleted = files = 0
    records = out.split("\0")
    i = 0
    while i < len(records) and records[i]:
        a, d, path = records[i].split("\t", 2)
        i += 1
        if not path:  # rename: old and new paths follow as separate records
            i += 2
        files += 1
        added += 0 if a == "-" else int(a)
        deleted += 0 if d == "-" else int(d)
    return files, added, deleted


def make_mixed_changes(seed: Path, work: Path) -> None:
    # committed on the session branch
    write(work / "src/feature.py", lines(7, "feature"))
    git(work, "add", "src/feature.py")
    git(work, "commit", "-q", "-m", "feature")
    # main moves on after branching (must not show up)
    write(seed / "main_only.txt", lines(50, "main"))
    write(seed / "README.md", "hello\nchanged on main\n")
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "main moves")
    git(seed, "push", "-q", "origin", "main")
    git(work, "fetch", "-q", "origin")
    # staged
    write(work / "staged.txt", lines(3, "staged"))
    git(work, "add", "staged.txt")
    # unstaged modification of a tracked file: 2 lines replaced, 1 appended
    app = lines(20, "app").replace("app 5\n", "APP 5\n").replace("app 9\n", "APP 9\n")
    write(work / "src/app.py", app + "tail\n")
    # deletion (unstaged)
    (work / "delete_me.txt").unlink()
    # rename with a small edit, staged via git mv
    git(work, "mv", "src/old_name.py", "src/new_name.py")
    moved = (work / "src/new_name.py").read_text()
    write(work / "src/new_name.py", moved + "one more\n")
    # binary change
    write(work / "image.bin", bytes(reversed(range(256))) * 4)
    # lock file change
    write(work / "package-lock.json", '{\n  "lockfileVersion": 3,\n  "name": "x"\n}\n')
    # untracked files, one without a trailing newline, one with an awkward name
    write(work / "notes/new file ü.md", "a\nb\nc")
    write(work / "untracked.txt", lines(5, "u"))
    # ignored files
    write(work / "debug.log", lines(100, "log"))
    write(work / "build/out.txt", lines(100, "out"))


def test_mixed_changes(repos: tuple[Path, Path, Path], tmp_path: Path) -> None:
    seed, _, work = repos
    make_mixed_changes(seed, work)
    status_before = git(work, "status", "--porcelain", "-z")
    index_before = (work / ".git/index").read_bytes()

    result = compute_diff(work)

    files = by_path(result)
    assert set(files) == {
        "src/feature.py",
        "staged.txt",
        "src/app.py",
        "delete_me.txt",
        "src/new_name.py",
        "image.bin",
        "package-lock.json",
        "notes/new file ü.md",
        "untracked.txt",
    }
    # merge-base semantics: main's later work is absent
    assert "main_only.txt" not in files and "README.md" not in files
    assert result["baseRef"] == merge_base(work)
    assert result["baseRef"] != git(work, "rev-parse", "origin/main").strip()
    assert result["headSha"] == git(work, "rev-parse", "HEAD").strip()

    assert files["src/feature.py"] | {"patch": ""} == {
        "path": "src/feature.py",
        "status": "added",
        "additions": 7,
        "deletions": 0,
        "oldPath": None,
        "binary": False,
        "generated": False,
        "truncated": False,
        "patch": "",
    }
    assert (files["staged.txt"]["status"], files["staged.txt"]["additions"]) == ("added", 3)
    app = files["src/app.py"]
    assert (app["status"], app["additions"], app["deletions"]) == ("modified", 3, 2)
    assert app["patch"].startswith("diff --git a/src/app.py b/src/app.py\n")
    assert "-app 5\n+APP 5\n" in app["patch"] and "+tail\n" in app["patch"]
    gone = files["delete_me.txt"]
    assert (gone["status"], gone["additions"], gone["deletions"]) == ("deleted", 0, 4)
    moved = files["src/new_name.py"]
    assert moved["status"] == "renamed" and moved["oldPath"] == "src/old_name.py"
    assert (moved["additions"], moved["deletions"]) == (1, 0)
    image = files["image.bin"]
    assert image["binary"] is True and image["patch"] == ""
    assert (image["status"], image["additions"], image["deletions"]) == ("modified", 0, 0)
    lock = files["package-lock.json"]
    assert lock["generated"] is True and (lock["additions"], lock["deletions"]) == (2, 1)
    note = files["notes/new file ü.md"]  # no trailing newline: the last line still counts
    assert (note["status"], note["additions"]) == ("added", 3)
    assert "\\ No newline at end of file" in note["patch"]
    assert files["untracked.txt"]["additions"] == 5
    for f in result["files"]:
        assert f["truncated"] is False
        if f["path"] != "package-lock.json":
            assert f["generated"] is False
        if f["path"] != "src/new_name.py":
            assert f["oldPath"] is None

    summary = result["summary"]
    assert summary == {
        "totalFiles": 9,
        "totalAdditions": sum(f["additions"] for f in result["files"]),
        "totalDeletions": sum(f["deletions"] for f in result["files"]),
    }
    assert (summary["totalFiles"], summary["totalAdditions"], summary["totalDeletions"]) == (
        independent_numstat(work, tmp_path, result["baseRef"])
    )

    # the real index and working tree are untouched
    assert git(work, "status", "--porcelain", "-z") == status_before
    assert (work / ".git/index").read_bytes() == index_before


def test_clean_branch_has_empty_diff(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    result = compute_diff(work)
    head = git(work, "rev-parse", "HEAD").strip()
    assert result == {
        "files": [],
        "summary": {"totalFiles": 0, "totalAdditions": 0, "totalDeletions": 0},
        "baseRef": head,
        "headSha": head,
    }


def test_local_base_branch_without_origin(tmp_path: Path) -> None:
    repo = tmp_path / "local"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "trunk")
    write(repo / "a.txt", "a\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "a")
    base = git(repo, "rev-parse", "HEAD").strip()
    git(repo, "checkout", "-q", "-b", "work")
    write(repo / "a.txt", "a\nb\n")
    git(repo, "commit", "-q", "-am", "b")

    result = compute_diff(repo, "trunk")

    assert result["baseRef"] == base
    assert [(f["path"], f["additions"], f["deletions"]) for f in result["files"]] == [
        ("a.txt", 1, 0)
    ]


def test_origin_ref_preferred_over_stale_local_branch(repos: tuple[Path, Path, Path]) -> None:
    seed, _, work = repos
    # The session branch is built on a newer origin/main than the clone's local main.
    write(seed / "later.txt", "later\n")
    git(seed, "add", "-A")
    git(seed, "commit", "-q", "-m", "later")
    git(seed, "push", "-q", "origin", "main")
    git(work, "fetch", "-q", "origin")
    git(work, "reset", "-q", "--hard", "origin/main")
    assert git(work, "rev-parse", "main") != git(work, "rev-parse", "origin/main")

    result = compute_diff(work)

    assert result["baseRef"] == git(work, "rev-parse", "origin/main").strip()
    assert result["files"] == []


def test_unusual_paths(repos: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, work = repos
    names = ["with space.txt", "ünïcödé/файл.txt", 'quo"te.txt', "tab\there.txt", "back\\slash"]
    for i, name in enumerate(names):
        write(work / name, lines(i + 1))
    (work / "docs").mkdir()
    git(work, "mv", "README.md", "docs/READ ME ü.md")

    result = compute_diff(work)

    files = by_path(result)
    for i, name in enumerate(names):
        assert files[name]["status"] == "added"
        assert files[name]["additions"] == i + 1
        assert files[name]["patch"].count("\n+line ") == i + 1
    renamed = files["docs/READ ME ü.md"]
    assert renamed["status"] == "renamed" and renamed["oldPath"] == "README.md"
    assert (renamed["additions"], renamed["deletions"]) == (0, 0)
    assert (result["summary"]["totalFiles"], result["summary"]["totalAdditions"]) == (
        independent_numstat(work, tmp_path, result["baseRef"])[:2]
    )


def test_generated_lock_files(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    for name in ("yarn.lock", "sub/Cargo.lock", "go.sum", "uv.lock", "poetry.lock"):
        write(work / name, "x\n")
    write(work / "lockfile.txt", "x\n")
    write(work / "yarn.lock.md", "x\n")

    files = by_path(compute_diff(work))

    for name in ("yarn.lock", "sub/Cargo.lock", "go.sum", "uv.lock", "poetry.lock"):
        assert files[name]["generated"] is True
    assert files["lockfile.txt"]["generated"] is False
    assert files["yarn.lock.md"]["generated"] is False


def test_untracked_binary_and_empty_files(repos: tuple[Path, Path, Path], tmp_path: Path) -> None:
    _, _, work = repos
    write(work / "blob.dat", b"\x00\x01\x02binary\n\x00")
    write(work / "empty.txt", "")
    write(work / "just-one-line", "no newline")

    result = compute_diff(work)
    files = by_path(result)

    assert files["blob.dat"] == {
        "path": "blob.dat",
        "status": "added",
        "additions": 0,
        "deletions": 0,
        "oldPath": None,
        "binary": True,
        "generated": False,
        "truncated": False,
        "patch": "",
    }
    assert (files["empty.txt"]["status"], files["empty.txt"]["additions"]) == ("added", 0)
    assert files["empty.txt"]["binary"] is False
    assert files["just-one-line"]["additions"] == 1
    assert (result["summary"]["totalFiles"], result["summary"]["totalAdditions"]) == (
        independent_numstat(work, tmp_path, result["baseRef"])[:2]
    )


def test_per_file_truncation_keeps_exact_counts(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    write(work / "big.txt", lines(5_000))
    write(work / "small.txt", "s\n")

    result = compute_diff(work, max_patch_bytes_per_file=1_000)
    files = by_path(result)

    big = files["big.txt"]
    assert big["truncated"] is True
    assert big["additions"] == 5_000
    assert 0 < len(big["patch"].encode()) <= 1_000
    assert big["patch"].endswith("\n")  # cut on a line boundary
    assert big["patch"].startswith("diff --git a/big.txt b/big.txt\n")
    assert files["small.txt"]["truncated"] is False
    assert files["small.txt"]["patch"].endswith("@@ -0,0 +1 @@\n+s\n")
    assert result["summary"]["totalAdditions"] == 5_001


def test_total_budget_exhausted(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    for i in range(10):
        write(work / f"f{i}.txt", lines(20, f"file{i}"))
    write(work / "yarn.lock", lines(20, "lock"))  # sorts last, but would be first anyway

    result = compute_diff(work, max_total_patch_bytes=1_500)
    files = result["files"]

    used = sum(len(f["patch"].encode()) for f in files)
    assert used <= 1_500
    full = [f for f in files if f["patch"] and not f["truncated"]]
    cut = [f for f in files if f["truncated"]]
    assert full and cut
    # files are budgeted in order: once one is cut, every later one is empty
    first_cut = files.index(cut[0])
    assert all(f["patch"] == "" and f.get("truncated") for f in files[first_cut + 1 :])
    assert all(f["patch"].endswith("\n") for f in files if f["patch"])
    assert sum(f["additions"] for f in files) == 11 * 20
    assert by_path(result)["yarn.lock"]["patch"] == ""


def test_lock_files_get_the_budget_last(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    write(work / "a-first/package-lock.json", lines(200, "lock"))
    write(work / "z-last.py", lines(10, "code"))

    files = by_path(compute_diff(work, max_total_patch_bytes=600))

    assert files["z-last.py"]["truncated"] is False and "+code 9\n" in files["z-last.py"]["patch"]
    assert files["a-first/package-lock.json"]["truncated"] is True
    assert files["a-first/package-lock.json"]["additions"] == 200


def test_uncommitted_deletion_of_committed_branch_file(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    write(work / "temp.txt", "t\n")
    git(work, "add", "temp.txt")
    git(work, "commit", "-q", "-m", "temp")
    (work / "temp.txt").unlink()
    write(work / "staged-then-removed.txt", "x\n")
    git(work, "add", "staged-then-removed.txt")
    (work / "staged-then-removed.txt").unlink()

    assert compute_diff(work)["files"] == []


def test_not_a_git_repository(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(PermanentProviderError, match="not"):
        compute_diff(plain)
    with pytest.raises(PermanentProviderError, match="does not exist"):
        compute_diff(tmp_path / "missing")


def test_subdirectory_of_a_repository_is_refused(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    with pytest.raises(PermanentProviderError, match="not the top"):
        compute_diff(work / "src")


def test_missing_base_branch(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    with pytest.raises(PermanentProviderError, match="not found"):
        compute_diff(work, "develop")
    with pytest.raises(PermanentProviderError, match="invalid base branch"):
        compute_diff(work, "--output=/tmp/x")


def test_unrelated_histories(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    git(work, "checkout", "-q", "--orphan", "island")
    git(work, "commit", "-q", "-m", "island")
    with pytest.raises(PermanentProviderError, match="common ancestor"):
        compute_diff(work)


def test_repository_without_commits(tmp_path: Path) -> None:
    repo = tmp_path / "empty"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    with pytest.raises(PermanentProviderError, match="no commit"):
        compute_diff(repo)


def test_pairing_falls_back_to_header_matching() -> None:
    entries = [
        diffs_compute._Entry("M", b"a.txt", b"a.txt"),
        diffs_compute._Entry("M", b"silent.txt", b"silent.txt"),
        diffs_compute._Entry("R", b'o"ld', b"n\tew"),
    ]
    first = b"diff --git a/a.txt b/a.txt\nindex 1..2 100644\n"
    second = b'diff --git "a/o\\"ld" "b/n\\tew"\nsimilarity index 90%\n'
    output = first + second
    spans = [(0, len(first)), (len(first), len(output))]
    assert diffs_compute._pair_chunks(output, entries, spans) == [spans[0], None, spans[1]]


def test_index_without_file_is_not_created(repos: tuple[Path, Path, Path]) -> None:
    _, _, work = repos
    write(work / "x.txt", "x\n")
    os.remove(work / ".git/index")

    files = by_path(compute_diff(work))

    assert files["x.txt"]["additions"] == 1
    assert not (work / ".git/index").exists()
