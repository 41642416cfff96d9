"""diff: the cached-diff computation against raw ``git diff``.

Fixture: a repository whose session branch changes ``files`` files by
``lines_per_file`` changed lines each (the issue: 2,000 files, 200,000 lines): 70% of
the files changed in commits on the branch, 20% changed in the working tree only
(half of them staged), 10% new untracked files. The base files have 300 lines.

System: :func:`worker.providers.git_diff.compute_diff` (the worker's code: merge-base,
throw-away index, one ``git diff --raw -p -M``, parsing into the cached-diff JSON).
Baseline: ``git diff --numstat <merge-base>`` plus ``git diff <merge-base>`` of the same
trees (the untracked files marked intent-to-add in a copy of the index, prepared
untimed), output captured the same way.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from pathlib import Path

from bench.common import Context, Result, compare

BASE_LINES = 300


def _git(repo: Path, *args: str, env: dict[str, str] | None = None) -> bytes:
    return subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True).stdout


def _line(i: int, j: int, tag: str) -> str:
    return f"    value_{i}_{j} = compute({i}, {j}, '{tag}')  # {tag} line {j} of module {i}\n"


def build_repo(root: Path, files: int, lines_per_file: int) -> tuple[Path, int]:
    """Create the fixture; return (workdir, expected changed lines)."""
    repo = root / "repo"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@example.com",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@example.com",
    }
    _git(repo, "init", "-q", "-b", "main", env=env)
    rng = random.Random(7)
    n_committed = files * 7 // 10
    n_worktree = files * 2 // 10
    n_new = files - n_committed - n_worktree
    tracked = n_committed + n_worktree

    def path(i: int) -> Path:
        return repo / f"pkg{i % 40:02d}" / f"mod_{i:05d}.py"

    for i in range(tracked):
        p = path(i)
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(_line(i, j, "base") for j in range(BASE_LINES)))
    _git(repo, "add", "-A", env=env)
    _git(repo, "commit", "-q", "-m", "base", env=env)
    _git(repo, "checkout", "-q", "-b", "session/bench", env=env)

    replaced = lines_per_file // 2  # each replaced line is one deletion and one addition

    def modify(i: int, tag: str) -> None:
        lines = [_line(i, j, "base") for j in range(BASE_LINES)]
        if i % 2:  # scattered edits (many hunks) ...
            step = max(1, BASE_LINES // replaced)
            rows = [j * step for j in range(replaced)]
        else:  # ... or one contiguous block
            start = rng.randrange(0, BASE_LINES - replaced)
            rows = list(range(start, start + replaced))
        for j in rows:
            lines[j] = _line(i, j, tag)
        path(i).write_text("".join(lines))

    for i in range(n_committed):
        modify(i, "branch")
    _git(repo, "add", "-A", env=env)
    _git(repo, "commit", "-q", "-m", "work on the session branch", env=env)
    for i in range(n_committed, tracked):
        modify(i, "wip")
    staged = [
        str(path(i).relative_to(repo)) for i in range(n_committed, n_committed + n_worktree // 2)
    ]
    for k in range(0, len(staged), 200):
        _git(repo, "add", "--", *staged[k : k + 200], env=env)
    for i in range(tracked, files):
        p = repo / "new" / f"new_{i:05d}.py"
        p.parent.mkdir(exist_ok=True)
        p.write_text("".join(_line(i, j, "new") for j in range(lines_per_file)))
    expected = (n_committed + n_worktree) * replaced * 2 + n_new * lines_per_file
    return repo, expected


def run(ctx: Context) -> list[Result]:
    from worker.providers.git_diff import compute_diff

    sizes = ctx.sizes
    started = time.monotonic()
    repo, expected = build_repo(ctx.work / "diff", sizes.diff_files, sizes.diff_lines_per_file)
    ctx.log(
        f"diff: fixture built in {time.monotonic() - started:.1f}s ({expected:,} changed lines)"
    )

    base = _git(repo, "merge-base", "HEAD", "main").decode().strip()
    # The baseline sees the same trees: untracked files intent-to-add in an index copy.
    index_copy = ctx.work / "diff" / "baseline-index"
    shutil.copyfile(repo / ".git" / "index", index_copy)
    raw_env = {**os.environ, "GIT_INDEX_FILE": str(index_copy), "GIT_PAGER": "cat"}
    _git(repo, "add", "-A", "-N", env=raw_env)

    def system() -> float:
        t = time.perf_counter()
        diff = compute_diff(repo, "main")
        elapsed = time.perf_counter() - t
        total = diff["summary"]["totalAdditions"] + diff["summary"]["totalDeletions"]
        if total != expected or diff["summary"]["totalFiles"] != sizes.diff_files:
            raise RuntimeError(
                f"compute_diff saw {diff['summary']} but the fixture changed "
                f"{sizes.diff_files} files / {expected} lines"
            )
        return elapsed

    def baseline() -> float:
        t = time.perf_counter()
        numstat = _git(repo, "diff", "--numstat", base, env=raw_env)
        patch = _git(repo, "diff", base, env=raw_env)
        elapsed = time.perf_counter() - t
        if not numstat or not patch:
            raise RuntimeError("git diff printed nothing")
        return elapsed

    system()  # warm the page cache and git's index stat data for both
    baseline()
    sys_times: list[float] = []
    raw_times: list[float] = []
    for r in range(sizes.rounds):
        # Alternate the order so neither side always runs right after the other.
        if r % 2:
            raw_times.append(baseline())
            sys_times.append(system())
        else:
            sys_times.append(system())
            raw_times.append(baseline())
    shutil.rmtree(ctx.work / "diff", ignore_errors=True)
    return [
        compare(
            "diff",
            "compute_diff time",
            "s",
            sys_times,
            raw_times,
            "<= 1.3",
            f"{sizes.diff_files:,} files / {expected:,} changed lines",
        )
    ]
