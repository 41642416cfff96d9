"""The worker's one git runner, and the environment of every subprocess it starts.

Everything in a sandbox is hostile: its ``.git`` directory, config, hooks and links were
written by whatever an agent ran. So:

* every subprocess (git, tar, zstd, anything later) gets :func:`subprocess_env`, built
  from an **allow-list** (``PATH``, a private empty ``HOME``, the C locale) plus the few
  variables the caller sets itself; nothing of the worker's own environment (database and
  broker URLs, tokens, ``LIFECYCLE_*``) reaches it;
* every git command runs with no system or global config, hooks pointed at
  ``/dev/null``, fsmonitor, pagers, editors, credential helpers and proxies off
  (:data:`SAFE_GIT_CONFIG`), and only the ``file``, ``http`` and ``https`` transports
  (``GIT_ALLOW_PROTOCOL``, which overrides every ``protocol.*`` setting);
* git never reads a sandbox's own repository config or hooks at all: commands over a
  sandbox run against a *shadow* git directory the worker writes itself
  (:func:`sandbox_git_dir`), which borrows only the sandbox's objects, refs and index as
  data. ``include.path``, ``filter.*``, ``diff.*.textconv``, ``core.fsmonitor`` … in the
  sandbox's ``.git/config`` are therefore never seen, whatever their names.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from worker.providers.base import PermanentProviderError, ProviderError, TransientProviderError

__all__ = [
    "SAFE_GIT_CONFIG",
    "GitResult",
    "classify_git_failure",
    "git_config_text",
    "git_env",
    "redact",
    "run_git",
    "sandbox_git_dir",
    "strip_url_credentials",
    "subprocess_env",
    "validate_branch_name",
]

#: Variables copied from the worker's environment into a subprocess's (and no others).
ALLOWED_ENV = ("PATH",)

#: ``-c`` settings on every git command: nothing in any config may run a program or send
#: data elsewhere. (A sandbox's own config is never read; these guard the worker's repos
#: and anything a future caller forgets.)
SAFE_GIT_CONFIG: tuple[str, ...] = (
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.untrackedCache=false",
    "core.pager=cat",
    "core.editor=false",
    "core.askPass=",
    "core.sshCommand=false",
    "core.gitProxy=",
    "credential.helper=",
    "diff.external=",
    "submodule.recurse=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "color.ui=false",
    "core.quotepath=off",
)

# stderr fragments meaning "try again later" (lock contention, network trouble).
_TRANSIENT_MARKERS = (
    ".lock': file exists",
    "another git process seems to be running",
    "could not resolve host",
    "connection timed out",
    "operation timed out",
    "connection reset",
    "connection refused",
    "early eof",
    "rpc failed",
    "remote end hung up unexpectedly",
    "the requested url returned error: 5",
    "the requested url returned error: 429",
    "temporary failure",
    "resource temporarily unavailable",
    "gnutls_handshake",
    "ssl_read",
)

_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_AUTH_HEADER = re.compile(r"(?i)(authorization:)[^\r\n]*")


# ------------------------------------------------------------------- environment


@functools.cache
def _private_home() -> str:
    """An empty directory of this process's own, used as ``HOME`` by every subprocess:
    no ``~/.gitconfig``, ``~/.netrc`` or ``~/.ssh`` of the worker's user is ever read."""
    return tempfile.mkdtemp(prefix="lifecycle-home-")


def subprocess_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for any subprocess the worker starts: allow-listed, never inherited.

    ``extra`` holds the variables the caller sets itself (a clone's credentials travel
    this way, and only to the one git process that needs them)."""
    env = {key: os.environ[key] for key in ALLOWED_ENV if key in os.environ}
    env.setdefault("PATH", os.defpath)
    env["HOME"] = _private_home()
    env["LC_ALL"] = "C"
    env["LANG"] = "C"
    if extra:
        env.update(extra)
    return env


def git_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """:func:`subprocess_env` plus what makes git non-interactive and config-free."""
    env = subprocess_env()
    env.update(
        {
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_ATTR_NOSYSTEM": "1",
            "GIT_TERMINAL_PROMPT": "0",
            "GCM_INTERACTIVE": "never",
            "GIT_ALLOW_PROTOCOL": "file:http:https",
            "GIT_NO_REPLACE_OBJECTS": "1",
            "GIT_PAGER": "cat",
        }
    )
    if extra:
        env.update(extra)
    return env


# ------------------------------------------------------------------- small helpers


def strip_url_credentials(url: str) -> str:
    """``url`` without any ``user:password@`` part (safe to store and show)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove URL passwords, authorization headers and the given secret values."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _AUTH_HEADER.sub(r"\1 ***", text)


def validate_branch_name(branch: str) -> str:
    """A branch name acceptable to ``git check-ref-format`` (and not an option)."""
    if (
        not isinstance(branch, str)
        or not branch
        or len(branch) > 200
        or branch.startswith("-")
        or branch == "HEAD"
        or any(ord(ch) < 32 or ord(ch) == 127 for ch in branch)
    ):
        raise PermanentProviderError(f"invalid branch name {branch!r}")
    if not _valid_ref(f"refs/heads/{branch}"):
        raise PermanentProviderError(f"invalid branch name {branch!r}")
    return branch


_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//")


def _valid_ref(ref: str) -> bool:
    """``git check-ref-format``'s rules (git-check-ref-format(1)), here rather than in a
    process of their own (2 ms a new branch name): no control character, space, ``~ ^ :
    ? * [ \\``, ``..`` or ``@{``; not ``@``; at least two components, none empty,
    starting with a dot or ending with ``.lock``; no trailing dot or slash."""
    if ref == "@" or ref.endswith((".", "/")) or ref.startswith("/"):
        return False
    if _REF_FORBIDDEN.search(ref):
        return False
    parts = ref.split("/")
    return len(parts) >= 2 and all(
        part and not part.startswith(".") and not part.endswith(".lock") for part in parts
    )


def git_config_text(sections: Mapping[tuple[str, str | None], Sequence[tuple[str, str]]]) -> str:
    """Sections of a git config file: ``{(section, subsection or None): [(key, value)]}``,
    every value and subsection quoted and escaped as git's config syntax reads them (a
    backslash or double quote escaped; control characters refused, so nothing can end a
    line and start another setting)."""

    def quoted(text: str) -> str:
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in text):
            raise PermanentProviderError(f"control character in git config value {text!r}")
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for (section, subsection), entries in sections.items():
        if not re.fullmatch(r"[A-Za-z0-9.-]+", section):
            raise ValueError(f"bad git config section {section!r}")
        lines.append(f"[{section}]" if subsection is None else f"[{section} {quoted(subsection)}]")
        for key, value in entries:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key):
                raise ValueError(f"bad git config key {key!r}")
            lines.append(f"\t{key} = {quoted(value)}")
    return "".join(f"{line}\n" for line in lines)


# ------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class GitResult:
    """What a git command printed and returned."""

    returncode: int
    stdout: str
    stderr: str


def classify_git_failure(action: str, stderr: str, secrets: Iterable[str] = ()) -> ProviderError:
    """Turn a failed git command into a transient or permanent provider error."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    detail = redact(" / ".join(lines[-3:]), secrets)[:500] or "no error output"
    message = f"git {action} failed: {detail}"
    lowered = stderr.lower()
    if any(marker in lowered for marker in _TRANSIENT_MARKERS):
        return TransientProviderError(message)
    return PermanentProviderError(message)


def git_command(args: Sequence[str]) -> list[str]:
    """``git`` with the safe settings, then ``args``."""
    command = ["git"]
    for setting in SAFE_GIT_CONFIG:
        command += ["-c", setting]
    return [*command, *args]


def run_git_bytes(
    args: Sequence[str],
    *,
    action: str,
    cwd: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 600.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run git (safe settings, allow-listed environment) and return its raw result."""
    try:
        return subprocess.run(
            git_command(args),
            cwd=cwd,
            env=git_env(extra_env),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as exc:
        if cwd is not None and not cwd.is_dir():
            raise PermanentProviderError(f"directory {cwd} does not exist") from exc
        raise PermanentProviderError("git is not installed (no 'git' on PATH)") from exc
    except NotADirectoryError as exc:
        raise PermanentProviderError(f"{cwd} is not a directory") from exc
    except subprocess.TimeoutExpired as exc:
        raise TransientProviderError(f"git {action} timed out after {timeout:g}s") from exc


def run_git(
    args: Sequence[str],
    *,
    action: str,
    cwd: Path | None = None,
    extra_env: Mapping[str, str] | None = None,
    stdin: str | None = None,
    timeout: float = 600.0,
    check: bool = True,
    secrets: Iterable[str] = (),
) -> GitResult:
    """Run ``git <args>``; with ``check`` a failure raises a provider error.

    ``secrets`` (and every value in ``extra_env``) are redacted from error messages.
    """
    hidden = [*secrets, *(extra_env or {}).values()]
    proc = run_git_bytes(
        args,
        action=action,
        cwd=cwd,
        extra_env=extra_env,
        stdin=None if stdin is None else stdin.encode("utf-8"),
        timeout=timeout,
    )
    result = GitResult(
        proc.returncode,
        proc.stdout.decode("utf-8", "replace"),
        proc.stderr.decode("utf-8", "replace"),
    )
    if check and proc.returncode != 0:
        raise classify_git_failure(action, result.stderr, hidden)
    return result


# ------------------------------------------------------------------- sandbox repositories

# The shadow git directory's own config: everything git needs, nothing a sandbox wrote.
_SHADOW_CONFIG = """[core]
\trepositoryformatversion = 0
\tbare = false
\tfilemode = true
\tlogallrefupdates = false
\thooksPath = /dev/null
\tfsmonitor = false
"""

# Refs larger than this are not refs (a loose ref is one line).
_MAX_REF_BYTES = 4096
_MAX_PACKED_REFS_BYTES = 64 * 1024 * 1024
_MAX_INFO_BYTES = 1024 * 1024


def _read_regular(path: Path, limit: int, what: str) -> bytes | None:
    """The bytes of regular file ``path`` (never through a link); None when missing."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise PermanentProviderError(f"sandbox {what} is unreadable or a link: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise PermanentProviderError(f"sandbox {what} is not a regular file")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise PermanentProviderError(f"sandbox {what} is larger than {limit} bytes")
    return data


def _copy_regular(source: Path, target: Path, what: str) -> bool:
    """Copy regular file ``source`` (never through a link) to ``target``; False if missing."""
    try:
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise PermanentProviderError(f"sandbox {what} is unreadable or a link: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise PermanentProviderError(f"sandbox {what} is not a regular file")
        with open(target, "wb") as out:
            shutil.copyfileobj(fh, out, 1 << 20)
    return True


def _real_dir(path: Path, what: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise PermanentProviderError(f"sandbox has no {what}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PermanentProviderError(f"sandbox {what} is a link or not a directory")


def _copy_refs(source: Path, target: Path) -> None:
    """Copy the loose refs under ``source`` (regular files only, links skipped)."""
    for dirpath, dirnames, filenames in os.walk(source, followlinks=False):
        rel = os.path.relpath(dirpath, source)
        out_dir = target if rel == "." else target / rel
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in filenames:
            data = _read_regular(Path(dirpath) / name, _MAX_REF_BYTES, "ref")
            if data is not None:
                (out_dir / name).write_bytes(data)
        # os.walk does not descend into directory links; drop them explicitly anyway.
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


def _check_objects(objects: Path) -> None:
    """Refuse an object store that would make git read outside the sandbox."""
    _real_dir(objects, ".git/objects")
    for rel in ("info/alternates", "info/http-alternates"):
        if os.path.lexists(objects / rel):
            raise PermanentProviderError(
                f"sandbox repository uses {rel} (objects outside the sandbox); refusing to read it"
            )
    for dirpath, dirnames, filenames in os.walk(objects, followlinks=False):
        for name in (*dirnames, *filenames):
            if os.path.islink(os.path.join(dirpath, name)):
                rel = os.path.relpath(os.path.join(dirpath, name), objects)
                raise PermanentProviderError(
                    f"sandbox .git/objects/{rel} is a symbolic link; refusing to follow it"
                )


@contextlib.contextmanager
def sandbox_git_dir(workdir: Path) -> Iterator[dict[str, str]]:
    """Environment variables that let git work on the sandbox tree ``workdir`` safely.

    Yields ``GIT_DIR`` (a shadow git directory the worker writes: its own config, a copy
    of the sandbox's ``HEAD``, loose refs and ``packed-refs``), ``GIT_WORK_TREE``,
    ``GIT_OBJECT_DIRECTORY`` (the sandbox's object store, read as data, refused when it
    holds links or alternates) and ``GIT_INDEX_FILE`` (a private copy of the sandbox's
    index). The sandbox's config, hooks, ``info/attributes`` and everything else in its
    ``.git`` are never read by git; the sandbox's files are never written.
    """
    workdir = Path(workdir)
    if not os.path.lexists(workdir):
        raise PermanentProviderError(f"workdir {workdir} does not exist")
    _real_dir(workdir, "working tree")
    git = workdir / ".git"
    try:
        _real_dir(git, ".git directory")
    except PermanentProviderError:
        raise PermanentProviderError(
            f"workdir {workdir} is not the top of a git working tree (no .git directory)"
        ) from None
    _check_objects(git / "objects")
    with tempfile.TemporaryDirectory(prefix="lifecycle-gitdir-") as tmp:
        shadow = Path(tmp) / "git"
        (shadow / "refs").mkdir(parents=True)
        (shadow / "config").write_text(_SHADOW_CONFIG, encoding="utf-8")
        head = _read_regular(git / "HEAD", _MAX_REF_BYTES, ".git/HEAD")
        if head is None:
            raise PermanentProviderError("sandbox has no .git/HEAD")
        (shadow / "HEAD").write_bytes(head)
        packed = _read_regular(git / "packed-refs", _MAX_PACKED_REFS_BYTES, ".git/packed-refs")
        if packed is not None:
            (shadow / "packed-refs").write_bytes(packed)
        if os.path.isdir(git / "refs") and not os.path.islink(git / "refs"):
            _copy_refs(git / "refs", shadow / "refs")
        exclude = _read_regular(git / "info" / "exclude", _MAX_INFO_BYTES, ".git/info/exclude")
        if exclude is not None:  # patterns only: data, never executed
            (shadow / "info").mkdir()
            (shadow / "info" / "exclude").write_bytes(exclude)
        index_path = Path(tmp) / "index"
        _copy_regular(git / "index", index_path, ".git/index")
        yield {
            "GIT_DIR": str(shadow),
            "GIT_WORK_TREE": str(workdir),
            "GIT_OBJECT_DIRECTORY": str(git / "objects"),
            "GIT_INDEX_FILE": str(index_path),
        }
