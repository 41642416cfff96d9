"""Every module of the layers imports on its own, in a fresh interpreter: no import
cycle that only works when something else happened to be imported first (one did:
sessions → runs → chats → sessions, hidden while the API imported chats first)."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pytest

import api_stub
import worker

PACKAGES = [worker, api_stub]


def _modules() -> list[str]:
    found = []
    for package in PACKAGES:
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if ".migrations" in info.name or info.name.endswith(".__main__"):
                continue  # alembic loads migrations itself; __main__ runs the CLI
            found.append(info.name)
    return sorted(found)


def test_every_module_imports_alone() -> None:
    script = (
        "import subprocess, sys\n"
        "from concurrent.futures import ThreadPoolExecutor\n"
        "def check(name):\n"
        "    r = subprocess.run([sys.executable, '-c', f'import {name}'],"
        " capture_output=True, text=True)\n"
        "    return None if r.returncode == 0 else name + ': ' +"
        " (r.stderr.strip().splitlines() or ['?'])[-1]\n"
        "with ThreadPoolExecutor(4) as pool:\n"
        "    failed = [f for f in pool.map(check, sys.argv[1:]) if f]\n"
        "print('\\n'.join(failed))\n"
    )
    modules = _modules()
    assert len(modules) > 50
    done = subprocess.run(
        [sys.executable, "-c", script, *modules], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "", done.stdout


@pytest.mark.parametrize("name", ["worker.services.sessions"])
def test_the_cycle_that_was_found_stays_gone(name: str) -> None:
    subprocess.run([sys.executable, "-c", f"import {name}"], check=True)
