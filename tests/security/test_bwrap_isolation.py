"""Escapes from a bubblewrap sandbox, each attempted for real and each asserted to fail.

Every test runs hostile commands through :class:`BwrapSandboxProvider` (the provider the
worker uses) against the real ``bwrap`` binary, and checks from the host side what the
command could reach. No mocks. Without ``bwrap`` these tests skip (naming the install
command), except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bwrap import searchable, uid_processes
from worker.providers.base import PermanentProviderError
from worker.providers.bwrap import (
    CommandLimits,
    CommandResult,
    CommandSpec,
    inside_cwd,
    validate_env,
)
from worker.providers.bwrap_sandbox import DEFAULT_UID_REGISTRY, BwrapSandboxProvider
from worker.providers.safe_tree import disk_usage

SECRET = "sk-test-FAKE-SECRET-0123456789abcdef"
# Generous timeouts so a broken limit fails a test instead of hanging it; never asserted.
LIMITS = CommandLimits(wall_seconds=60, cpu_seconds=60, disk_check_seconds=0.5)


@pytest.fixture
def provider(bwrap: str, tmp_path: Path) -> Iterator[BwrapSandboxProvider]:
    searchable(tmp_path)
    sandboxes = BwrapSandboxProvider(tmp_path / "data" / "sandboxes", limits=LIMITS, bwrap=bwrap)
    yield sandboxes
    for name in ("box-a", "box-b"):
        sandboxes.stop(name)


def _make(provider: BwrapSandboxProvider, name: str) -> Path:
    work = provider.workdir(name)
    work.mkdir(parents=True)
    (work / "README.md").write_text(f"{name}'s own file\n")
    return work


def _sh(
    provider: BwrapSandboxProvider, script: str, name: str = "box-a", **limits: object
) -> CommandResult:
    chosen = dataclasses.replace(LIMITS, **limits)  # type: ignore[arg-type]
    return provider.run_command(name, CommandSpec(["/bin/sh", "-c", script]), chosen)


def _text(result: CommandResult) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


@pytest.fixture
def box(provider: BwrapSandboxProvider) -> Path:
    return _make(provider, "box-a")


# ------------------------------------------------------------------ the basics


def test_a_command_runs_in_the_workspace_as_an_unprivileged_user(
    provider: BwrapSandboxProvider, box: Path
) -> None:
    result = _sh(provider, "pwd; id -u; cat README.md; echo oops >&2; exit 3")
    assert result.exit_code == 3 and result.signal is None and result.killed is None
    assert result.stdout.decode().splitlines() == ["/workspace", "1000", "box-a's own file"]
    assert result.stderr == b"oops\n"
    caps = _sh(provider, "grep CapEff /proc/self/status").stdout.decode()
    assert caps.split()[-1] == "0000000000000000"  # no capabilities at all
    # None of the worker's descriptors (tree, passwd data, bwrap's info pipe) leak in.
    fds = _sh(provider, "ls /proc/self/fd").stdout.decode().split()
    assert fds == ["0", "1", "2", "3"]  # 3: ls's own directory listing


def test_files_written_inside_land_in_the_tree_owned_by_the_sandbox(
    provider: BwrapSandboxProvider, box: Path
) -> None:
    assert _sh(provider, "mkdir -p src && echo made > src/new.txt").exit_code == 0
    assert (box / "src" / "new.txt").read_text() == "made\n"
    user = provider.user_for("box-a")
    if user is not None:  # the worker runs as root: the sandbox has a uid of its own
        assert (box / "src" / "new.txt").stat().st_uid == user.uid
        assert user.uid not in (0, os.getuid())


def test_stdin_cwd_env_and_signals(provider: BwrapSandboxProvider, box: Path) -> None:
    (box / "sub").mkdir()
    spec = CommandSpec(
        ["/bin/sh", "-c", 'pwd; echo "$GREETING"; cat'],
        cwd="sub",
        env={"GREETING": "hello"},
        stdin=b"from stdin\n",
    )
    result = provider.run_command("box-a", spec)
    assert result.stdout == b"/workspace/sub\nhello\nfrom stdin\n"
    killed = _sh(provider, "kill -TERM $$")
    assert killed.signal == 15 and killed.exit_code == 128 + 15


def test_cwd_and_env_are_validated() -> None:
    assert inside_cwd(None) == "/workspace"
    assert inside_cwd("a/b") == "/workspace/a/b"
    assert inside_cwd("/workspace/a") == "/workspace/a"
    for bad in ("../x", "a/../../x", "/etc", "/workspace/../etc", "a\x00b"):
        with pytest.raises(PermanentProviderError):
            inside_cwd(bad)
    for name in ("", "1X", "A-B", "A B", "A=B"):
        with pytest.raises(PermanentProviderError):
            validate_env({name: "x"})
    with pytest.raises(PermanentProviderError):
        validate_env({"OK": "nul\x00"})


# ------------------------------------------------------------------ secrets, files, network


def test_the_workers_environment_never_reaches_the_sandbox(
    provider: BwrapSandboxProvider, box: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LIFECYCLE_GITHUB_TOKEN", SECRET)
    monkeypatch.setenv("LIFECYCLE_DATABASE_URL", f"postgresql://u:{SECRET}@127.0.0.1/db")
    result = _sh(
        provider,
        # its own environment, every environ its /proc shows (bwrap's init included),
        # and the worker's own process by its host pid
        f"env; for f in /proc/[0-9]*/environ; do cat $f; echo; done; cat /proc/{os.getpid()}/environ",
    )
    out = _text(result)
    assert "PATH=" in out  # the commands did run
    assert SECRET not in out
    assert "LIFECYCLE_" not in out
    env_names = {line.split("=", 1)[0] for line in result.stdout.decode().splitlines()[:10]}
    assert env_names <= {"PATH", "HOME", "LANG", "USER", "LOGNAME", "PWD", "SHLVL", "_", ""}


def test_the_data_directory_and_other_sandboxes_are_out_of_sight(
    provider: BwrapSandboxProvider, box: Path, tmp_path: Path
) -> None:
    other = _make(provider, "box-b")
    (other / "private.txt").write_text("box-b secret\n")
    data = tmp_path / "data"
    (data / "snapshots").mkdir(parents=True)
    (data / "snapshots" / "s.tar.zst").write_text("snapshot bytes\n")
    script = "; ".join(
        f"cat {p} 2>&1; ls {p.parent} 2>&1"
        for p in (other / "private.txt", data / "snapshots" / "s.tar.zst")
    )
    result = _sh(provider, f"{script}; cat /etc/shadow 2>&1")
    out = _text(result)
    assert "box-b secret" not in out and "snapshot bytes" not in out
    assert out.count("No such file or directory") == 5, out
    top = set(_sh(provider, "ls /").stdout.decode().split())
    system = {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "sbin", "tmp", "usr"}
    assert "workspace" in top and top - {"workspace"} <= system, top
    etc = set(_sh(provider, "ls /etc").stdout.decode().split())
    assert "shadow" not in etc and "passwd" in etc
    # The sibling's processes are out of reach too: every command has its own pid space.
    assert provider.run_command("box-b", CommandSpec(["true"])).exit_code == 0


def test_links_in_the_tree_mean_what_the_sandbox_sees(
    provider: BwrapSandboxProvider, box: Path, tmp_path: Path
) -> None:
    """An agent's link to a host path resolves inside the sandbox's mount namespace,
    where the host path does not exist; the worker's own walks never follow it."""
    data = tmp_path / "data"
    (data / "snapshots").mkdir(parents=True, exist_ok=True)
    (data / "snapshots" / "big").write_bytes(b"x" * 4_000_000)
    os.symlink("/etc/shadow", box / "shadow")
    os.symlink(data, box / "data-link")
    os.symlink("../box-b", box / "sibling")
    result = _sh(
        provider,
        "cat shadow 2>&1; ls data-link/ 2>&1; ls sibling/ 2>&1; "
        "ln /etc/passwd hard 2>&1; ln -s /workspace/x /tmp/y && echo ok",
    )
    out = _text(result)
    assert "root:" not in out and "big" not in out
    assert out.count("No such file or directory") >= 3
    assert not (box / "hard").exists()
    assert disk_usage(box) < 1_000_000  # the 4 MB behind data-link are not counted


def test_loopback_services_are_unreachable_without_network(
    provider: BwrapSandboxProvider, box: Path
) -> None:
    ports = [5432, 6379]
    broker = os.environ.get("LIFECYCLE_BROKER_URL", "")
    if broker.startswith("redis://127.0.0.1:"):
        ports.append(int(broker.split(":")[2].split("/")[0]))
    listening = []
    for port in ports:
        with socket.socket() as s:
            s.settimeout(2)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                listening.append(port)
    script = (
        "import socket, sys\n"
        f"for port in {ports}:\n"
        "    s = socket.socket(); s.settimeout(5)\n"
        "    print(port, s.connect_ex(('127.0.0.1', port)))\n"
    )
    result = provider.run_command("box-a", CommandSpec(["python3", "-c", script]))
    codes = dict(line.split() for line in result.stdout.decode().splitlines())
    assert set(codes) == {str(p) for p in ports}, _text(result)
    for port in ports:
        assert codes[str(port)] != "0", port  # refused: the sandbox's loopback is its own
    assert listening, "no service listens on the host: the check above would prove nothing"


# ------------------------------------------------------------------ processes and limits


def test_the_sandbox_sees_only_its_own_processes(provider: BwrapSandboxProvider, box: Path) -> None:
    result = _sh(provider, "ls /proc | grep -E '^[0-9]+$'; echo me=$$")
    lines = result.stdout.decode().split()
    pids = [int(p) for p in lines if p.isdigit()]
    assert pids, (result.exit_code, result.signal, result.killed, _text(result))
    assert max(pids) < 20 and len(pids) < 10, lines  # bwrap's init, the shell, ls, grep
    assert lines[-1] in ("me=1", "me=2")


def test_the_system_is_read_only(provider: BwrapSandboxProvider, box: Path) -> None:
    result = _sh(
        provider,
        "for p in /usr/evil /etc/evil /evil /dev/evil /bin/evil; do "
        "touch $p 2>/dev/null && echo WROTE $p; done; echo done",
    )
    assert result.stdout == b"done\n"
    assert not Path("/usr/evil").exists() and not Path("/etc/evil").exists()


def test_a_fork_bomb_hits_the_process_limit(provider: BwrapSandboxProvider, box: Path) -> None:
    counter = (
        "import os, time\n"
        "n = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError:\n"
        "        print('capped at', n, flush=True)\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(60)\n"
        "        os._exit(0)\n"
        "    n += 1\n"
    )
    limits = dataclasses.replace(LIMITS, processes=40)
    result = provider.run_command("box-a", CommandSpec(["python3", "-c", counter]), limits)
    assert result.stdout.startswith(b"capped at "), _text(result)
    assert int(result.stdout.split()[-1]) < 40
    # The classic one, ended by its wall time; the host is left with none of it.
    bomb = provider.run_command(
        "box-a",
        CommandSpec(["/bin/bash", "-c", ":(){ :|:& };:; sleep 30"]),
        dataclasses.replace(LIMITS, processes=64, wall_seconds=3),
    )
    assert bomb.killed == "timeout"
    assert b"fork: retry: Resource temporarily unavailable" in bomb.stderr
    user = provider.user_for("box-a")
    if user is not None:
        assert uid_processes(user.uid) == []


def test_a_memory_hog_is_refused(provider: BwrapSandboxProvider, box: Path) -> None:
    hog = "b = []\nwhile True:\n    b.append(bytearray(64 << 20))\n"
    result = provider.run_command(
        "box-a",
        CommandSpec(["python3", "-c", hog]),
        dataclasses.replace(LIMITS, memory_bytes=512 << 20),
    )
    assert result.exit_code != 0 and result.killed is None
    assert b"MemoryError" in result.stderr or result.signal is not None, _text(result)
    tmp_fill = _sh(provider, "head -c 100000000 /dev/zero > /tmp/fill", tmp_bytes=8 << 20)
    assert tmp_fill.exit_code != 0 and b"No space left" in tmp_fill.stderr


def test_an_endless_loop_ends_at_the_wall_time_or_cpu_limit(
    provider: BwrapSandboxProvider, box: Path
) -> None:
    wall = _sh(provider, "while :; do :; done", wall_seconds=2)
    assert wall.killed == "timeout" and wall.signal == 9 and wall.exit_code is None
    sleeper = _sh(provider, "sleep 1000", wall_seconds=1)
    assert sleeper.killed == "timeout"
    cpu = _sh(provider, "while :; do :; done", cpu_seconds=1)
    assert cpu.killed is None
    assert cpu.signal in (9, 24), cpu  # SIGXCPU at the soft limit, SIGKILL at the hard one


def test_an_output_flood_is_cut_at_the_cap_and_the_worker_stays_flat(
    provider: BwrapSandboxProvider, box: Path
) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = _sh(provider, "head -c 300000000 /dev/zero; echo tail >&2", output_bytes=64 * 1024)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert result.exit_code == 0 and result.killed is None
    assert len(result.stdout) == 64 * 1024 and result.stdout_truncated
    assert result.stdout_bytes == 300_000_000
    assert result.stderr == b"tail\n" and not result.stderr_truncated
    assert (after - before) * 1024 < 64 << 20  # ru_maxrss is in KiB: 300 MB never held


def test_disk_use_of_the_tree_is_bounded(provider: BwrapSandboxProvider, box: Path) -> None:
    at_end = _sh(provider, "head -c 5000000 /dev/zero > big", disk_bytes=1 << 20)
    assert at_end.killed == "disk" and (at_end.disk_bytes or 0) > 1 << 20
    (box / "big").unlink()
    while_running = _sh(provider, "head -c 5000000 /dev/zero > big; sleep 1000", disk_bytes=1 << 20)
    assert while_running.killed == "disk" and while_running.signal == 9
    (box / "big").unlink()
    one_file = _sh(provider, "head -c 3000000 /dev/zero > big", file_size_bytes=1 << 20)
    assert one_file.exit_code != 0 and (box / "big").stat().st_size == 1 << 20


def test_processes_end_with_their_command_and_with_the_sandbox(
    provider: BwrapSandboxProvider, box: Path
) -> None:
    # A daemon left behind dies with the command's pid namespace.
    _sh(provider, "setsid sleep 1000 < /dev/null > /dev/null 2>&1 & echo started")
    user = provider.user_for("box-a")
    if user is not None:
        assert uid_processes(user.uid) == []
    # A running command ends when the sandbox's processes are stopped (hibernate).
    results: list[CommandResult] = []
    runner = threading.Thread(target=lambda: results.append(_sh(provider, "sleep 1000")))
    runner.start()
    for _ in range(500):
        if provider.runtime.running("box-a"):
            break
        threading.Event().wait(0.02)
    assert provider.stop_processes("box-a") == 1
    runner.join(timeout=60)
    assert results and results[0].signal == 9
    assert provider.runtime.running("box-a") == []
    if user is not None:
        assert uid_processes(user.uid) == []


def test_sandboxes_get_distinct_uids_released_on_stop(provider: BwrapSandboxProvider) -> None:
    _make(provider, "box-a")
    _make(provider, "box-b")
    a, b = provider.user_for("box-a"), provider.user_for("box-b")
    if a is None or b is None:
        pytest.skip("the worker is not root: sandboxes run as the worker's user")
    assert a != b and provider.user_for("box-a") == a
    registry = DEFAULT_UID_REGISTRY
    assert (registry / str(a.uid)).read_text() == f"{provider.root}\nbox-a"
    provider.stop("box-a")
    assert not (registry / str(a.uid)).exists()


def test_two_data_directories_on_one_machine_never_share_a_uid(bwrap: str, tmp_path: Path) -> None:
    """Two worker hosts on one machine (or a test run beside ``lifecycle up``): the same
    sandbox name in two data directories gets two uids, so stopping one (``kill(-1)``
    as its uid) cannot end the other's processes; a claim left by a deleted data
    directory is taken over."""
    roots = []
    for host in ("host-a", "host-b"):
        (tmp_path / host).mkdir()
        searchable(tmp_path / host)
        roots.append(
            BwrapSandboxProvider(tmp_path / host / "sandboxes", limits=LIMITS, bwrap=bwrap)
        )
    first, second = roots
    _make(first, "box-a")
    _make(second, "box-a")
    a, b = first.user_for("box-a"), second.user_for("box-a")
    if a is None or b is None:
        pytest.skip("the worker is not root: sandboxes run as the worker's user")
    try:
        assert a != b
        results: list[CommandResult] = []
        runner = threading.Thread(target=lambda: results.append(_sh(second, "sleep 5; echo alive")))
        runner.start()
        for _ in range(500):
            if second.runtime.running("box-a"):
                break
            threading.Event().wait(0.02)
        first.stop("box-a")
        runner.join(timeout=60)
        assert results and results[0].exit_code == 0, results
        assert results[0].stdout == b"alive\n"
    finally:
        second.stop("box-a")
    # A claim whose data directory is gone is stale: the uid is free again.
    stale = tmp_path / "gone" / "sandboxes"
    (DEFAULT_UID_REGISTRY / str(b.uid)).write_text(f"{stale}\nbox-a")
    (tmp_path / "host-c").mkdir()
    searchable(tmp_path / "host-c")
    third = BwrapSandboxProvider(tmp_path / "host-c" / "sandboxes", limits=LIMITS, bwrap=bwrap)
    _make(first, "box-a")  # takes its uid (the first free one for that name) again
    _make(third, "box-a")
    try:
        assert first.user_for("box-a") == a
        assert third.user_for("box-a") == b
    finally:
        first.stop("box-a")
        third.stop("box-a")


def test_without_own_uids_commands_are_still_confined(
    bwrap: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The path of a worker that is not root: the worker's own uid in a user namespace."""
    monkeypatch.setenv("LIFECYCLE_GITHUB_TOKEN", SECRET)
    searchable(tmp_path)
    sandboxes = BwrapSandboxProvider(tmp_path / "sb", limits=LIMITS, bwrap=bwrap, own_uids=False)
    _make(sandboxes, "box-a")
    result = _sh(sandboxes, "id -u; grep CapEff /proc/self/status; cat /proc/1/environ; ls /")
    out = _text(result)
    assert result.stdout.startswith(b"1000\n") and "0000000000000000" in out
    assert SECRET not in out and "sb" not in result.stdout.decode().split()
