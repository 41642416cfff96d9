"""The README's "A first session" works as written after ``make run``: its shell blocks
(and those of "Quotas", which go on from it), taken from README.md verbatim, run in one
bash (as a person types them into one terminal, from the repository) against a
``lifecycle up`` this test starts in a fresh data directory on free ports. Only ``LIFECYCLE_DATA_DIR`` and ``API`` tell the blocks
where that stack is, as ``./.lifecycle`` and the default port would after ``make run``;
no database URL is set, so the admin commands must find the stack themselves."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.processes import LIFECYCLE, ROOT, wait_until
from worker.ops.embedded import find_free_port

pytestmark = pytest.mark.e2e

SECTION = "### A first session"


def readme_blocks(section: str = SECTION) -> list[str]:
    """The ```sh blocks of ``section`` (up to the next heading), in order."""
    lines = (ROOT / "README.md").read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.rstrip("\n") == section) + 1
    body, fenced = [], False
    for line in lines[start:]:
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,3} ", line):
            break  # the next heading (a "# comment" inside a block is not one)
        body.append(line)
    return re.findall(r"^```sh\n(.*?)^```$", "".join(body), flags=re.MULTILINE | re.DOTALL)


#: The runnable sections, in the order a reader meets them; later blocks use the
#: variables the first section sets (``$ACCOUNT``), as in one terminal.
SECTIONS = (SECTION, "### Quotas")


def test_the_sections_have_the_blocks_this_test_runs() -> None:
    first, quotas = (readme_blocks(s) for s in SECTIONS)
    assert len(first) == 2, first
    assert first[0].startswith(". .venv/bin/activate")
    assert "lifecycle accounts create" in first[0] and "${API:-" in first[0]
    assert len(quotas) == 1 and "lifecycle accounts limits" in quotas[0], quotas


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    output: Path
    api_url: str

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def _bare_env() -> dict[str, str]:
    """A newcomer's shell: nothing of ours configured."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    base = tmp_path_factory.mktemp("readme")
    data_dir, output = base / "data", base / "up.out"
    api_port = find_free_port()
    env = {**_bare_env(), "LIFECYCLE_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT)}
    with output.open("wb") as out:
        proc = subprocess.Popen(
            [*LIFECYCLE, "up", "--api-port", str(api_port), "--no-flower", "--concurrency", "1"],
            env=env,
            cwd=base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    stack = Up(proc, data_dir, output, f"http://127.0.0.1:{api_port}")

    def ready() -> bool:
        assert proc.poll() is None, f"`lifecycle up` exited early:\n{stack.text()}"
        try:
            return httpx.get(f"{stack.api_url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, timeout=120, interval=0.25, what="/readyz to answer 200")
        yield stack
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_a_first_session_runs_verbatim(up: Up) -> None:
    missing = [tool for tool in ("bash", "curl", "jq") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"the README's snippet needs {', '.join(missing)} (not installed)")
    if not (ROOT / ".venv" / "bin" / "activate").exists():
        pytest.skip("the README's snippet activates .venv, which `make run` / `make test` make")
    script = "set -e\n" + "\n".join(b for s in SECTIONS for b in readme_blocks(s))
    env = {**_bare_env(), "LIFECYCLE_DATA_DIR": str(up.data_dir), "API": up.api_url}
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only: the blocks wait for the session themselves
        check=False,
    )
    print(f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")  # the note pastes this
    assert done.returncode == 0, done.stdout + done.stderr

    # The admin commands found the stack through the data directory and said so.
    port = int((up.data_dir / "postgres" / "port").read_text().split()[0])
    using = (
        f"using the database at postgresql+psycopg://postgres@127.0.0.1:{port}/lifecycle "
        f"(the `lifecycle up` stack in {up.data_dir})"
    )
    assert done.stderr.splitlines() == [using] * 5, done.stderr

    # The POST's answer (pretty-printed by jq): provisioning at version 0.
    out = done.stdout
    start = out.index("{")
    created, end = json.JSONDecoder().raw_decode(out, start)
    session = created["session"]
    assert (session["title"], session["lifecycleState"], session["lifecycleVersion"]) == (
        "first",
        "provisioning",
        0,
    )
    sid = session["id"]
    rest = out[end:]
    # Then the worker made it active, and the table lists it with its whole id.
    assert f"{sid} is active" in rest, out
    table = rest.split(f"{sid} is active", 1)[1]
    assert sid in table and "first" in table and "active" in table, table
    # The quotas block: Ada's own limits, then back to the defaults.
    assert table.strip().splitlines()[-2:] == [
        '{"maxActiveSandboxes": 2, "maxSessions": 50}',
        '{"maxActiveSandboxes": null, "maxSessions": null}',
    ], table
    creds = json.loads((up.data_dir / "dev-credentials.json").read_text())
    owner = httpx.get(
        f"{up.api_url}/api/sessions/{sid}", headers={"x-api-key": creds["key"]}, timeout=10
    )
    assert owner.status_code in (403, 404)  # Ada's session, not the development account's


#: Sections whose blocks continue from "A first session" ($API, $KEY, $ACCOUNT).
MORE_SECTIONS = ("### Events", "### Retention", "### Commands and files")


def test_the_events_retention_and_commands_blocks_run_verbatim(up: Up) -> None:
    """After the first session, the Events, Retention and Commands blocks run as written:
    the feed names the session's events, the PATCH echoes the retention settings, and the
    agent's file runs in the sandbox with its output streamed back."""
    if any(shutil.which(tool) is None for tool in ("bash", "curl", "jq")):
        pytest.skip("the README's snippets need bash, curl and jq")
    if shutil.which("bwrap") is None:
        pytest.skip("the commands block needs bubblewrap (apt-get install -y bubblewrap)")
    blocks = [b for s in (SECTION, *MORE_SECTIONS) for b in readme_blocks(s)]
    assert len(blocks) == 5  # first session (2), events, retention, commands and files
    script = "set -e\n" + "\n".join(blocks)
    env = {**_bare_env(), "LIFECYCLE_DATA_DIR": str(up.data_dir), "API": up.api_url}
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # a hang guard only
        check=False,
    )
    print(f"--- stdout\n{done.stdout}--- stderr\n{done.stderr}")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert '"type":"session.created"' in out.replace(" ", ""), out
    assert '"autoArchiveAfterSeconds": 86400' in out, out
    assert "hello from the sandbox" in out, out  # the command's output, over SSE
    assert "hello.py" in out.splitlines(), out  # the files listing
