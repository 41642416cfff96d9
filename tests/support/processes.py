"""What the end-to-end tests, the fault suite and the benchmarks share to drive real
processes: the ``python -m worker`` command line, a bounded polling loop, and whether a
process answers over HTTP."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]  # the repository
LIFECYCLE = [sys.executable, "-m", "worker"]


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``python -m worker <args>`` in its own process group (so a signal to the group
    reaches a prefork parent and its children), output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [*LIFECYCLE, *args],
            env=env,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def worker_args(concurrency: int, *extra: str) -> list[str]:
    """``lifecycle worker`` as the harnesses run it: prefork, no gossip or mingle (they
    only slow start-up when workers come and go)."""
    return [
        "worker",
        "-c",
        str(concurrency),
        "--pool",
        "prefork",
        "--without-gossip",
        "--without-mingle",
        *extra,
    ]


def wait_until(
    check: Callable[[], Any],
    *,
    timeout: float = 60.0,
    interval: float = 0.1,
    what: str = "condition",
    alive: Callable[[], str | None] | None = None,
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll ``check`` until it returns something truthy, and return that. A bounded loop,
    not a timing assertion: the bound only stops a broken run from hanging. ``alive``
    returns why waiting is pointless (a process died), or None."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        if alive is not None and (dead := alive()) is not None:
            raise error(f"{dead} while waiting for {what}")
        time.sleep(interval)
    raise error(f"timed out after {timeout:g}s waiting for {what}; last value: {last!r}")


def poll(check: Callable[[], Any], *, timeout: float, interval: float = 0.1) -> Any:
    """Call ``check`` until it returns something truthy or ``timeout`` has passed, and
    return its last value either way: for waits whose timeout is an outcome to count,
    not a failure (:func:`wait_until` raises instead)."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last or time.monotonic() >= deadline:
            return last
        time.sleep(interval)


def answers_ok(url: str, timeout: float = 1.0) -> bool:
    """Whether ``GET url`` answers 200 now (a refused or timed-out request: False)."""
    try:
        return httpx.get(url, timeout=timeout).status_code == 200
    except httpx.HTTPError:
        return False
