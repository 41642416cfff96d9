"""Confined commands: run a program in a sandbox's working tree under bubblewrap.

Everything a command runs is hostile. Each one gets, from ``bwrap``:

* new user, pid, ipc, uts, mount (and cgroup, when possible) namespaces, and a new
  network namespace (only a loopback of its own) unless networking is allowed;
  no capabilities, no nested user namespaces, a new terminal session, and death with
  its parent (killing the ``bwrap`` process ends every process of the command: their
  pid namespace dies with its init);
* a root of its own: the system (``/usr`` and the ``/bin``, ``/lib*`` links or
  directories) and a few pieces of ``/etc`` read-only, a generated ``/etc/passwd`` and
  ``/etc/group``, a fresh ``/proc`` (its own processes only), a minimal ``/dev``, a
  private size-bounded ``/tmp`` and ``/dev/shm``, the working tree read-write at
  ``/workspace`` (bound by descriptor, never through a link) — and nothing else: not
  the data directory, not other sandboxes, not the worker's files; ``/`` and ``/dev``
  are remounted read-only;
* an empty environment plus ``PATH``, ``HOME=/tmp``, ``LANG``, ``USER`` and the
  command's own variables. ``bwrap`` itself is started with the allow-listed
  :func:`~worker.providers.git.subprocess_env` (its init process's
  ``/proc/1/environ`` is readable inside the sandbox);
* when the worker runs as root: a host uid and gid of the sandbox's own (see
  :class:`~worker.providers.bwrap_sandbox.BwrapSandboxProvider`), so the process limit
  counts exactly that sandbox's processes and the worker can end all of them at once.

Limits (:class:`CommandLimits`), all without cgroups, each with what it does not cover:

* **wall time** — a watchdog in the worker kills the ``bwrap`` process group with
  SIGKILL at the deadline; the command's pid namespace goes with it. Covers everything
  the command started, daemons included.
* **CPU time** — ``RLIMIT_CPU`` (SIGXCPU at the limit, SIGKILL two seconds later).
  Per process: N processes may use N times as much; the wall time bounds the total.
* **memory** — ``RLIMIT_AS``, the virtual address space of each process. Not the
  sum over processes (bounded only by processes x limit), and virtual, not resident:
  runtimes that reserve large address ranges (V8, Go, Java) need a generous value.
  ``/tmp`` and ``/dev/shm`` are tmpfs (memory) bounded by their own sizes.
* **processes** — ``RLIMIT_NPROC``, set inside the sandbox's user namespace: on
  kernels from 5.14 the count is of the processes of that namespace's user (the
  command's own); on older kernels it counts the host uid's processes, which is the
  sandbox's own uid when the worker is root and the worker's user otherwise (so there it
  also counts the worker's processes). Threads count as processes.
* **open files** — ``RLIMIT_NOFILE`` per process.
* **file size** — ``RLIMIT_FSIZE``: no single file written beyond it (SIGXFSZ).
* **output bytes** — stdout and stderr each keep their first ``output_bytes``; the
  rest is read and dropped (the command is never blocked on a full pipe, the worker's
  memory stays flat) and counted, and the result says it was truncated.
* **disk** — the working tree's allocated size is measured by a walk that never
  follows links, every ``disk_check_seconds`` while the command runs and once at its
  end; above ``disk_bytes`` the command is killed (``killed="disk"``). Between two
  checks a command can write more (at most the file size limit per file it writes),
  the number of files (inodes) is not bounded, and a huge tree makes each walk slow.

Not covered at all: kernel exploits (bubblewrap is not a virtual machine); CPU
scheduling share and I/O bandwidth (no cgroups); with networking allowed, the host's
network namespace is shared, loopback services (PostgreSQL, Redis) and abstract unix
sockets included — keep it off where they listen.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from worker.providers.base import PermanentProviderError
from worker.providers.git import subprocess_env
from worker.providers.safe_tree import disk_usage

__all__ = [
    "INSTALL_HINT",
    "WORKSPACE",
    "BwrapRuntime",
    "BwrapUnavailable",
    "CommandLimits",
    "CommandResult",
    "CommandSpec",
    "SandboxUser",
    "find_bwrap",
    "inside_cwd",
    "validate_env",
]

INSTALL_HINT = "apt-get install -y bubblewrap"
WORKSPACE = "/workspace"
INSIDE_UID = 1000
SANDBOX_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Host directories that make up "the system": bound read-only (or recreated as the same
# link on merged-/usr systems).
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# The pieces of /etc programs need; nothing with secrets (no shadow, no ssl/private).
_ETC_PIECES = (
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/ssl/certs",
    "/etc/ca-certificates",
    "/etc/mime.types",
)
_NETWORK_ETC = ("/etc/resolv.conf", "/etc/gai.conf", "/etc/services", "/etc/protocols")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


class BwrapUnavailable(PermanentProviderError):
    """bubblewrap is not installed (or cannot create namespaces) on this host."""


def find_bwrap() -> str | None:
    """The ``bwrap`` binary on this host's PATH, if any."""
    return shutil.which("bwrap", path=subprocess_env()["PATH"])


@dataclass(frozen=True)
class CommandLimits:
    """Per-command limits; see the module docstring for what each covers."""

    wall_seconds: float = 300.0
    cpu_seconds: int = 300
    memory_bytes: int = 8 << 30
    processes: int = 256
    open_files: int = 1024
    file_size_bytes: int = 1 << 30
    output_bytes: int = 1 << 20
    disk_bytes: int = 10 << 30
    tmp_bytes: int = 512 << 20
    disk_check_seconds: float = 5.0


@dataclass(frozen=True)
class SandboxUser:
    """The host uid/gid a sandbox's processes run as (worker running as root)."""

    uid: int
    gid: int


@dataclass(frozen=True)
class CommandSpec:
    """What to run: ``argv`` in ``cwd`` (inside ``/workspace``) with ``env`` added."""

    argv: Sequence[str]
    cwd: str = WORKSPACE
    env: Mapping[str, str] = field(default_factory=dict)
    stdin: bytes | None = None


@dataclass
class _Capture:
    limit: int
    data: bytearray = field(default_factory=bytearray)
    total: int = 0

    def feed(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.total > len(self.data)


@dataclass(frozen=True)
class CommandResult:
    """How a command ended. ``signal`` is set when it died of one (the watchdog's, or
    ``exit_code`` 128+N as ``bwrap`` reports a signalled command — a command that
    itself exits with 128+N reads the same). ``killed`` says why the worker ended it:
    ``timeout``, ``disk`` or ``killed`` (on request)."""

    exit_code: int | None
    signal: int | None
    duration: float
    stdout: bytes
    stderr: bytes
    stdout_bytes: int
    stderr_bytes: int
    stdout_truncated: bool
    stderr_truncated: bool
    killed: str | None = None
    disk_bytes: int | None = None


def validate_env(env: Mapping[str, str]) -> dict[str, str]:
    """Names like shell variables, values without NUL (raises ``PermanentProviderError``)."""
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise PermanentProviderError(f"invalid environment variable name {key!r}")
        if not isinstance(value, str) or "\x00" in value:
            raise PermanentProviderError(f"invalid value for environment variable {key}")
        out[key] = value
    return out


def inside_cwd(cwd: str | None) -> str:
    """The absolute directory inside the sandbox for ``cwd``: relative to
    ``/workspace``, or absolute below it; never ``..`` (``PermanentProviderError``).

    Where it leads once inside (links in the tree) is decided inside the sandbox's
    mount namespace, which holds nothing but the tree and the system."""
    if cwd is None or cwd in ("", "."):
        return WORKSPACE
    if "\x00" in cwd or "\\" in cwd:
        raise PermanentProviderError("cwd must be a plain path inside /workspace")
    path = PurePosixPath(cwd)
    if path.is_absolute():
        try:
            path = path.relative_to(WORKSPACE)
        except ValueError:
            raise PermanentProviderError("cwd must be inside /workspace") from None
    if ".." in path.parts:
        raise PermanentProviderError("cwd must not contain '..'")
    return str(PurePosixPath(WORKSPACE, path))


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` (from /proc), which tells a pid from a later reuse."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


class BwrapRuntime:
    """Runs commands of sandboxes under ``bwrap`` and keeps track of them.

    ``runs_dir`` holds one directory per sandbox with a file per live ``bwrap``
    process (pid and start time), so any worker process of the host can end every
    process of a sandbox (:meth:`kill_all`)."""

    def __init__(self, runs_dir: Path, *, bwrap: str | None = None, network: bool = False) -> None:
        self.runs_dir = Path(runs_dir)
        self._bwrap = bwrap
        self.network = network

    @property
    def bwrap(self) -> str:
        path = self._bwrap or find_bwrap()
        if path is None:
            raise BwrapUnavailable(
                f"bubblewrap (bwrap) is not installed on this worker host: {INSTALL_HINT}"
            )
        return path

    # ----------------------------------------------------------------- command line
    def command_line(
        self,
        spec: CommandSpec,
        limits: CommandLimits,
        *,
        workspace_fd: int,
        passwd_fd: int,
        group_fd: int,
        info_fd: int | None = None,
        network: bool | None = None,
    ) -> list[str]:
        """The ``bwrap`` argv for ``spec`` (descriptors are passed to the child)."""
        allow_net = self.network if network is None else network
        args = [
            self.bwrap,
            "--unshare-user",
            "--disable-userns",
            "--uid",
            str(INSIDE_UID),
            "--gid",
            str(INSIDE_UID),
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
        ]
        if info_fd is not None:  # bwrap writes {"child-pid": …} there: the namespace's init
            args += ["--info-fd", str(info_fd)]
        if not allow_net:
            args.append("--unshare-net")
        args += _system_binds()
        for piece in _ETC_PIECES + (_NETWORK_ETC if allow_net else ()):
            args += ["--ro-bind-try", piece, piece]
        args += [
            "--proc", "/proc",
            "--dev", "/dev",
            "--size", str(limits.tmp_bytes), "--tmpfs", "/dev/shm",
            "--size", str(limits.tmp_bytes), "--tmpfs", "/tmp",
            "--perms", "0444", "--ro-bind-data", str(passwd_fd), "/etc/passwd",
            "--perms", "0444", "--ro-bind-data", str(group_fd), "/etc/group",
            "--bind-fd", str(workspace_fd), WORKSPACE,
            "--remount-ro", "/dev",
            "--remount-ro", "/",
            "--chdir", inside_cwd(spec.cwd),
            "--clearenv",
        ]  # fmt: skip
        env = {
            "PATH": SANDBOX_PATH,
            "HOME": "/tmp",
            "LANG": "C.UTF-8",
            "USER": "sandbox",
            "LOGNAME": "sandbox",
        }
        env.update(validate_env(spec.env))
        for key, value in env.items():
            args += ["--setenv", key, value]
        cpu = max(1, int(limits.cpu_seconds))
        args += [
            "--",
            "/usr/bin/prlimit",
            f"--cpu={cpu}:{cpu + 2}",
            f"--as={limits.memory_bytes}",
            f"--nproc={limits.processes}",
            f"--nofile={limits.open_files}",
            f"--fsize={limits.file_size_bytes}",
            "--core=0",
            "--",
            *spec.argv,
        ]
        return args

    # ----------------------------------------------------------------- running
    def run(
        self,
        sandbox: str,
        workdir: Path,
        spec: CommandSpec,
        limits: CommandLimits,
        *,
        user: SandboxUser | None = None,
        network: bool | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
    ) -> CommandResult:
        """Run ``spec`` confined in ``workdir`` and wait for it (or for a limit).

        ``on_output(stream, chunk)`` sees every chunk read (also past the capture
        limit); ``should_stop()`` is polled about twice a second and ends the command
        when it returns a reason."""
        if not spec.argv:
            raise PermanentProviderError("a command needs at least a program to run")
        proc, started, info = self._spawn(sandbox, workdir, spec, limits, user, network)
        try:
            return self._supervise(proc, started, info, workdir, limits, on_output, should_stop)
        finally:
            if proc.poll() is None:
                _kill_group(proc.pid)
            proc.wait()
            with contextlib.suppress(OSError):
                os.close(info)
            self._unregister(sandbox, proc.pid)

    def _spawn(
        self,
        sandbox: str,
        workdir: Path,
        spec: CommandSpec,
        limits: CommandLimits,
        user: SandboxUser | None,
        network: bool | None,
    ) -> tuple[subprocess.Popen[bytes], float, int]:
        try:
            workspace_fd = os.open(workdir, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise PermanentProviderError(
                f"the sandbox's working tree is not a directory: {exc.strerror}"
            ) from exc
        passwd_fd = _data_fd(
            "root:x:0:0::/:/usr/sbin/nologin\n"
            f"sandbox:x:{INSIDE_UID}:{INSIDE_UID}:sandbox:/tmp:/bin/sh\n"
            "nobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\n"
        )
        group_fd = _data_fd(f"root:x:0:\nsandbox:x:{INSIDE_UID}:\nnogroup:x:65534:\n")
        info_read, info_fd = os.pipe()
        fds = (workspace_fd, passwd_fd, group_fd, info_fd)
        try:
            argv = self.command_line(
                spec,
                limits,
                workspace_fd=workspace_fd,
                passwd_fd=passwd_fd,
                group_fd=group_fd,
                info_fd=info_fd,
                network=network,
            )
            identity: dict[str, object] = {}
            if user is not None:
                identity = {"user": user.uid, "group": user.gid, "extra_groups": []}
            started = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE if spec.stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=subprocess_env({"PATH": SANDBOX_PATH}),
                cwd="/",
                pass_fds=fds,
                start_new_session=True,
                **identity,  # type: ignore[call-overload]
            )
        except BaseException:
            os.close(info_read)
            raise
        finally:
            for fd in fds:
                os.close(fd)
        self._register(sandbox, proc.pid)
        if spec.stdin is not None:
            threading.Thread(
                target=_feed_stdin, args=(proc, spec.stdin), daemon=True, name="cmd-stdin"
            ).start()
        return proc, started, info_read

    def _supervise(
        self,
        proc: subprocess.Popen[bytes],
        started: float,
        info_fd: int,
        workdir: Path,
        limits: CommandLimits,
        on_output: Callable[[str, bytes], None] | None,
        should_stop: Callable[[], str | None] | None,
    ) -> CommandResult:
        captures = {
            "stdout": _Capture(limits.output_bytes),
            "stderr": _Capture(limits.output_bytes),
            "info": _Capture(64 * 1024),
        }
        watch = _Watchdog(started, workdir, limits, should_stop)
        sel = selectors.DefaultSelector()
        assert proc.stdout is not None and proc.stderr is not None
        sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(info_fd, selectors.EVENT_READ, "info")
        try:
            # Drain both pipes to their end (every process holding them gone), whatever
            # is kept: the command never blocks on a full pipe.
            while sel.get_map():
                if watch.killed is None and watch.check() is not None:
                    _kill_group(proc.pid)
                for key, _ in sel.select(timeout=watch.wait()):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                        continue
                    captures[key.data].feed(chunk)
                    if on_output is not None and key.data != "info":
                        on_output(key.data, chunk)
        finally:
            sel.close()
        proc.wait()
        duration = time.monotonic() - started
        # bwrap may exit as soon as the command does, while the kernel is still ending
        # the namespace's other processes: its init is gone only once they all are.
        _wait_namespace_gone(bytes(captures["info"].data))
        watch.final_check()
        return _result(proc.returncode, duration, captures, watch.killed, watch.disk)

    # ----------------------------------------------------------------- registry
    def _register(self, sandbox: str, pid: int) -> None:
        folder = self.runs_dir / sandbox
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        (folder / str(pid)).write_text(_process_start(pid) or "", encoding="ascii")

    def _unregister(self, sandbox: str, pid: int) -> None:
        (self.runs_dir / sandbox / str(pid)).unlink(missing_ok=True)

    def running(self, sandbox: str) -> list[int]:
        """Pids of this sandbox's live ``bwrap`` processes (stale entries dropped)."""
        folder = self.runs_dir / sandbox
        pids: list[int] = []
        if not folder.is_dir():
            return pids
        for entry in folder.iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            recorded = entry.read_text(encoding="ascii").strip()
            if recorded and _process_start(pid) == recorded:
                pids.append(pid)
            else:
                entry.unlink(missing_ok=True)
        return pids

    def kill_all(self, sandbox: str, user: SandboxUser | None = None) -> int:
        """End every process of ``sandbox``: each registered ``bwrap`` process group
        (its pid namespace dies with it) and, when the sandbox has a uid of its own,
        every process of that uid. Returns how many ``bwrap`` processes were killed."""
        pids = self.running(sandbox)
        for pid in pids:
            _kill_group(pid)
        if user is not None:
            kill_uid(user)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(
            _process_start(p) is not None and not _is_zombie(p) for p in pids
        ):
            time.sleep(0.02)
        folder = self.runs_dir / sandbox
        for pid in pids:
            (folder / str(pid)).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
        return len(pids)


class _Watchdog:
    """The limits checked while a command runs: wall time, disk, a stop request."""

    def __init__(
        self,
        started: float,
        workdir: Path,
        limits: CommandLimits,
        should_stop: Callable[[], str | None] | None,
    ) -> None:
        self.deadline = started + limits.wall_seconds
        self.workdir = workdir
        self.limits = limits
        self.should_stop = should_stop
        self.next_disk = started + limits.disk_check_seconds
        self.next_poll = started
        self.killed: str | None = None
        self.disk: int | None = None

    def check(self) -> str | None:
        """The reason to end the command now, if any (remembered in ``killed``)."""
        now = time.monotonic()
        reason: str | None = None
        if now >= self.deadline:
            reason = "timeout"
        elif now >= self.next_disk:
            self.next_disk = now + self.limits.disk_check_seconds
            if self._over_disk():
                reason = "disk"
        if reason is None and self.should_stop is not None and now >= self.next_poll:
            self.next_poll = now + 0.5
            reason = self.should_stop()
        self.killed = reason
        return reason

    def wait(self) -> float:
        if self.killed is not None:
            return 0.25
        return max(0.0, min(self.deadline - time.monotonic(), 0.25))

    def final_check(self) -> None:
        if self.killed is None and self._over_disk():
            self.killed = "disk"

    def _over_disk(self) -> bool:
        self.disk = disk_usage(self.workdir, stop_above=self.limits.disk_bytes)
        return self.disk > self.limits.disk_bytes


def kill_uid(user: SandboxUser) -> None:
    """SIGKILL every process of ``user.uid``: ``kill(-1)`` sent as that uid may signal
    exactly its own processes (and never the sender). Sent twice, to catch a process
    forked meanwhile."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child only makes system calls, then leaves
        try:
            os.setgroups([])
            os.setresgid(user.gid, user.gid, user.gid)
            os.setresuid(user.uid, user.uid, user.uid)
            for _ in range(2):
                os.kill(-1, signal.SIGKILL)
        except BaseException:
            os._exit(1)
        os._exit(0)
    os.waitpid(pid, 0)


def _is_zombie(pid: int) -> bool:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True
    fields = raw.rsplit(")", 1)[-1].split()
    return bool(fields) and fields[0] in ("Z", "X")


def _wait_namespace_gone(info: bytes, timeout: float = 30.0) -> None:
    """Wait until the pid namespace's init (``child-pid`` in bwrap's info) has exited:
    the kernel lets it go only after every other process of the namespace."""
    try:
        pid = int(json.loads(info.decode())["child-pid"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return  # bwrap failed before starting it: nothing runs
    deadline = time.monotonic() + timeout
    while not _is_zombie(pid) and time.monotonic() < deadline:
        time.sleep(0.01)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _feed_stdin(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(OSError):
        proc.stdin.write(data)
    with contextlib.suppress(OSError):
        proc.stdin.close()


def _data_fd(text: str) -> int:
    """A pipe's read end holding ``text`` (small: fits the pipe buffer)."""
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, text.encode())
    finally:
        os.close(write_fd)
    return read_fd


def _system_binds() -> list[str]:
    args: list[str] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _result(
    returncode: int,
    duration: float,
    captures: dict[str, _Capture],
    killed: str | None,
    disk: int | None,
) -> CommandResult:
    out, err = captures["stdout"], captures["stderr"]
    exit_code: int | None = returncode
    sig: int | None = None
    if returncode < 0:  # bwrap itself killed (the watchdog): its command with it
        exit_code, sig = None, -returncode
    elif 128 < returncode <= 128 + 64:
        sig = returncode - 128
    return CommandResult(
        exit_code=exit_code,
        signal=sig,
        duration=duration,
        stdout=bytes(out.data),
        stderr=bytes(err.data),
        stdout_bytes=out.total,
        stderr_bytes=err.total,
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        killed=killed,
        disk_bytes=disk,
    )
