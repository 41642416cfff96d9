"""Compute a session's cached diff from a git working directory.

The diff is taken against the merge-base of ``HEAD`` with the base branch and includes
everything the working tree holds: commits on the session branch, staged and unstaged
changes, and untracked files (``.gitignore`` respected). Its JSON shape is the one in
SPEC section 4 (``files[]``, ``summary``, ``baseRef``, ``headSha``).

How it stays cheap (a handful of git processes, however many files changed):

1. one ``rev-parse`` (HEAD, git dir, index path) and one ``merge-base``;
2. a throw-away copy of the index (``GIT_INDEX_FILE``) in which every untracked file is
   recorded as *intent-to-add* (``git add -A -N``): no blob is written, and the user's
   real index and working tree are never touched;
3. ONE ``git diff -M --raw -z -p <merge-base>`` against the working tree: the ``-z`` raw
   section gives exact statuses and paths, the patch section gives the text. Line counts
   are read from the patch's ``+``/``-`` lines, which is what ``--numstat`` counts, so
   git does not have to diff every file a second time.

Nothing the sandbox wrote runs: git works through :func:`~worker.providers.git.sandbox_git_dir`,
a shadow git directory with the worker's own config, so the sandbox's hooks, config
(filters, textconv, external diff, fsmonitor, includes …) and attributes' drivers are never
seen; external diff drivers and textconv are also disabled on the command line.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from worker.providers.base import PermanentProviderError
from worker.providers.git import run_git_bytes, sandbox_git_dir

__all__ = ["GENERATED_FILE_NAMES", "compute_diff"]

#: Base names of dependency lock files; such files are flagged ``generated``.
GENERATED_FILE_NAMES: frozenset[str] = frozenset(
    {
        "package-lock.json",
        "npm-shrinkwrap.json",
        "yarn.lock",
        "pnpm-lock.yaml",
        "bun.lockb",
        "bun.lock",
        "deno.lock",
        "poetry.lock",
        "Pipfile.lock",
        "pdm.lock",
        "uv.lock",
        "Cargo.lock",
        "Gemfile.lock",
        "composer.lock",
        "go.sum",
        "go.work.sum",
        "flake.lock",
        "mix.lock",
        "pubspec.lock",
        "Podfile.lock",
        "Package.resolved",
        "packages.lock.json",
        "gradle.lockfile",
    }
)

_GIT_TIMEOUT_SECONDS = 600.0

_DIFF_OPTIONS = (
    "--raw",
    "-z",
    "-p",
    "-M",
    "--no-color",
    "--no-ext-diff",
    "--no-textconv",
    "--no-relative",
    "--submodule=short",
    "--ignore-submodules=all",
    "--src-prefix=a/",
    "--dst-prefix=b/",
)

_STATUS_NAMES = {
    "A": "added",
    "D": "deleted",
    "M": "modified",
    "T": "modified",  # type change (e.g. file <-> symlink)
    "U": "modified",  # unmerged: the working-tree content is what we show
    "R": "renamed",
    "C": "added",  # copies only appear with -C; the copy is a new file
}

_DIFF_HEADER = b"diff --git "
_CHUNK_SEPARATOR = b"\n" + _DIFF_HEADER


def compute_diff(
    workdir: Path,
    base_branch: str = "main",
    *,
    max_patch_bytes_per_file: int = 64_000,
    max_total_patch_bytes: int = 2_000_000,
) -> dict[str, Any]:
    """Return the cached-diff JSON object of ``workdir`` against its base branch.

    ``workdir`` must be the top level of a non-bare git working tree. The base is looked up
    as ``origin/<base_branch>`` first, then ``<base_branch>``; the diff is taken against
    the merge-base of ``HEAD`` with it.

    Line counts are always exact. Patch text is cut on a line boundary at
    ``max_patch_bytes_per_file`` bytes per file (``truncated: true``); once
    ``max_total_patch_bytes`` is used up, further files get an empty patch and
    ``truncated: true``. Hand-written files get the budget before lock files.

    Raises :class:`PermanentProviderError` when ``workdir`` is not a git working tree, has
    no commit, or the base branch (or a common ancestor with it) cannot be found.
    """
    workdir = Path(workdir)
    with sandbox_git_dir(workdir) as env:
        head_sha = _head_sha(workdir, env)
        base_ref = _merge_base(workdir, env, base_branch)
        if not Path(env["GIT_INDEX_FILE"]).exists():  # no index yet (unusual): HEAD's tree
            _git(workdir, env, ["read-tree", head_sha], what="read HEAD into an index")
        # Record untracked (non-ignored) files as intent-to-add in the throw-away index, so
        # the working-tree diff below shows them as new files. Nothing is hashed or stored.
        _git(workdir, env, ["add", "-A", "-N"], what="list untracked files")
        output = _git(
            workdir, env, ["diff", *_DIFF_OPTIONS, base_ref, "--"], what="diff the working tree"
        )

    files = _build_files(output, max_patch_bytes_per_file, max_total_patch_bytes)
    return {
        "files": files,
        "summary": {
            "totalFiles": len(files),
            "totalAdditions": sum(f["additions"] for f in files),
            "totalDeletions": sum(f["deletions"] for f in files),
        },
        "baseRef": base_ref,
        "headSha": head_sha,
    }


# --------------------------------------------------------------------------- git helpers


def _run(
    workdir: Path, env: Mapping[str, str], args: Sequence[str]
) -> subprocess.CompletedProcess[bytes]:
    return run_git_bytes(
        args, action=args[0], cwd=workdir, extra_env=env, timeout=_GIT_TIMEOUT_SECONDS
    )


def _git(workdir: Path, env: Mapping[str, str], args: Sequence[str], *, what: str) -> bytes:
    proc = _run(workdir, env, args)
    if proc.returncode != 0:
        raise PermanentProviderError(f"git could not {what}: {_first_line(proc.stderr)}")
    return proc.stdout


def _first_line(stderr: bytes) -> str:
    for line in stderr.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return "no error output"


def _head_sha(workdir: Path, env: Mapping[str, str]) -> str:
    head = _run(workdir, env, ["rev-parse", "--verify", "--quiet", "HEAD^{commit}"])
    head_sha = head.stdout.decode("ascii", "replace").strip()
    if head.returncode != 0 or not head_sha:
        raise PermanentProviderError(f"workdir {workdir} has no commit checked out")
    return head_sha


def _merge_base(workdir: Path, env: Mapping[str, str], base_branch: str) -> str:
    if not base_branch or base_branch.startswith("-") or "\0" in base_branch:
        raise PermanentProviderError(f"invalid base branch name {base_branch!r}")
    for candidate in (f"refs/remotes/origin/{base_branch}", base_branch):
        resolved = _run(
            workdir, env, ["rev-parse", "--verify", "--quiet", f"{candidate}^{{commit}}"]
        )
        base_sha = resolved.stdout.decode("ascii", "replace").strip()
        if resolved.returncode != 0 or not base_sha:
            continue
        proc = _run(workdir, env, ["merge-base", "HEAD", base_sha])
        sha = proc.stdout.decode("ascii", "replace").strip()
        if proc.returncode == 0 and sha:
            return sha
        if proc.returncode == 1:
            raise PermanentProviderError(
                f"HEAD and base branch {base_branch!r} have no common ancestor"
            )
        raise PermanentProviderError(
            f"git could not find the merge-base with {base_branch!r}: {_first_line(proc.stderr)}"
        )
    raise PermanentProviderError(
        f"base branch {base_branch!r} not found (tried origin/{base_branch} and {base_branch})"
    )


# ------------------------------------------------------------------------------ parsing


class _Entry:
    __slots__ = ("new_path", "old_path", "status")

    def __init__(self, status: str, old_path: bytes, new_path: bytes) -> None:
        self.status = status
        self.old_path = old_path
        self.new_path = new_path


def _parse_raw(output: bytes) -> tuple[list[_Entry], int]:
    """Parse the ``--raw -z`` records at the start of ``output``.

    Returns the entries and the offset where the patch text begins.
    """
    entries: list[_Entry] = []
    pos = 0
    size = len(output)
    while pos < size and output[pos] == 0x3A:  # ':'
        meta_end = output.index(b"\0", pos)
        # The status field is the last one: a letter, optionally followed by a score.
        status_field = output[output.rindex(b" ", pos, meta_end) + 1 : meta_end]
        letter = chr(status_field[0])
        path_end = output.index(b"\0", meta_end + 1)
        first = output[meta_end + 1 : path_end]
        pos = path_end + 1
        if letter in ("R", "C"):
            second_end = output.index(b"\0", pos)
            second = output[pos:second_end]
            pos = second_end + 1
            entries.append(_Entry(letter, first, second))
        else:
            entries.append(_Entry(letter, first, first))
    if pos < size and output[pos] == 0:  # separator between the raw and patch sections
        pos += 1
    return entries, pos


def _split_patches(output: bytes, start: int) -> list[tuple[int, int]]:
    """Offsets ``(start, end)`` of the per-file patches in ``output``.

    Each span starts at its ``diff --git `` line and ends after its last newline. Content
    lines in a patch start with `` ``, ``+``, ``-`` or ``\\``, so a line starting with
    ``diff --git `` is always a file header. Offsets instead of slices: the patch text of
    a big diff is tens of megabytes, and most of it is only counted, never kept.
    """
    size = len(output)
    if start >= size:
        return []
    if not output.startswith(_DIFF_HEADER, start):
        raise PermanentProviderError("unexpected output from git diff")
    spans: list[tuple[int, int]] = []
    find = output.find
    while True:
        nxt = find(_CHUNK_SEPARATOR, start + 1)
        if nxt < 0:
            spans.append((start, size))
            return spans
        spans.append((start, nxt + 1))
        start = nxt + 1


def _c_quote(prefix: bytes, path: bytes) -> bytes:
    """Quote ``prefix + path`` the way git does in a ``diff --git`` line (quotepath off)."""
    raw = prefix + path
    if not any(b < 0x20 or b in (0x22, 0x5C, 0x7F) for b in raw):
        return raw
    out = bytearray(b'"')
    for b in raw:
        if b in _C_ESCAPES:
            out += b"\\" + _C_ESCAPES[b]
        elif b < 0x20 or b == 0x7F:
            out += b"\\%03o" % b
        else:
            out.append(b)
    out += b'"'
    return bytes(out)


_C_ESCAPES = {
    0x07: b"a",
    0x08: b"b",
    0x09: b"t",
    0x0A: b"n",
    0x0B: b"v",
    0x0C: b"f",
    0x0D: b"r",
    0x22: b'"',
    0x5C: b"\\",
}


def _pair_chunks(
    output: bytes, entries: list[_Entry], spans: list[tuple[int, int]]
) -> list[tuple[int, int] | None]:
    """Give every raw entry its patch span (``None`` when git printed none for it).

    git prints the raw records and the patches from the same queue, in the same order,
    and a changed file always gets a ``diff --git`` header, so they normally pair up one
    to one. Should a file print no patch, spans are matched by their header line.
    """
    if len(spans) == len(entries):
        return list(spans)
    paired: list[tuple[int, int] | None] = []
    j = 0
    for entry in entries:
        if j < len(spans):
            header = (
                _DIFF_HEADER
                + _c_quote(b"a/", entry.old_path)
                + b" "
                + _c_quote(b"b/", entry.new_path)
                + b"\n"
            )
            if output.startswith(header, spans[j][0]):
                paired.append(spans[j])
                j += 1
                continue
        paired.append(None)
    return paired


def _count(output: bytes, start: int, end: int) -> tuple[int, int, bool]:
    """Return ``(additions, deletions, binary)`` of the patch at ``output[start:end]``."""
    first_hunk = output.find(b"\n@@ ", start, end)
    if first_hunk < 0:
        # No hunks: a pure rename, a mode change, an empty file, or a binary file.
        binary = (
            output.find(b"\nBinary files ", start, end) >= 0
            or output.find(b"\nGIT binary patch", start, end) >= 0
        )
        return 0, 0, binary
    # Every line after the first hunk header is a hunk header, context (" "), an added
    # ("+") or removed ("-") line or a "\ No newline" marker: exactly what --numstat counts.
    return output.count(b"\n+", first_hunk, end), output.count(b"\n-", first_hunk, end), False


def _cut_end(output: bytes, start: int, end: int, limit: int) -> int:
    """End of the longest line-aligned prefix of ``output[start:end]`` of ``<= limit`` bytes."""
    if end - start <= limit:
        return end
    if limit <= 0:
        return start
    newline = output.rfind(b"\n", start, start + limit)
    return newline + 1 if newline >= 0 else start


def _text(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    if "\x00" in text:  # JSON stores (e.g. Postgres jsonb) reject NUL characters
        text = text.replace("\x00", "\ufffd")
    return text


def _build_files(output: bytes, max_per_file: int, max_total: int) -> list[dict[str, Any]]:
    entries, patch_start = _parse_raw(output)
    spans = _split_patches(output, patch_start)
    paired = _pair_chunks(output, entries, spans)

    files: list[dict[str, Any]] = []
    texts: list[tuple[int, int] | None] = []  # spans of non-binary patches
    for entry, span in zip(entries, paired, strict=True):
        path = entry.new_path.decode("utf-8", "replace")
        # Every entry carries every key (a typed client gets the same shape each time).
        item: dict[str, Any] = {
            "path": path,
            "status": _STATUS_NAMES.get(entry.status, "modified"),
            "oldPath": entry.old_path.decode("utf-8", "replace") if entry.status == "R" else None,
            "binary": False,
            "generated": path.rsplit("/", 1)[-1] in GENERATED_FILE_NAMES,
            "truncated": False,
        }
        additions = deletions = 0
        text_span = None
        if span is not None:
            additions, deletions, binary = _count(output, *span)
            if binary:
                item["binary"] = True
            else:
                text_span = span
        item["additions"] = additions
        item["deletions"] = deletions
        files.append(item)
        texts.append(text_span)

    # Hand-written files get the patch budget first, lock files last; the output order
    # stays git's (sorted by path).
    order = [i for i, f in enumerate(files) if not f["generated"]]
    order += [i for i, f in enumerate(files) if f["generated"]]
    remaining = max(max_total, 0)
    for i in order:
        item = files[i]
        span = texts[i]
        if span is None:
            item["patch"] = ""
            continue
        start, end = span
        cut = _cut_end(output, start, end, max_per_file)
        truncated = cut < end
        if cut - start > remaining:
            cut = _cut_end(output, start, cut, remaining)
            truncated = True
            remaining = 0  # the budget is spent: every later file gets no text
        else:
            remaining -= cut - start
        item["patch"] = _text(output[start:cut])
        item["truncated"] = truncated
    return files
