"""``lifecycle demo``: one session through its whole lifecycle over HTTP, live.

create → provisioned → active → a file written in the sandbox (``PUT …/files/content``)
→ commands run in it (``POST …/commands``: ``git status``, a Python one-liner, their
output in the timeline) → diff (line counts) → snapshot (size) → hibernated → resumed →
the file is still there (read back by ``cat`` in the sandbox). Everything goes through
the API, so the demo runs from anywhere. Every wait is bounded; a step that fails or
times out ends the demo with a non-zero exit code.

Commands need the ``bwrap`` sandbox provider (``lifecycle up`` picks it when bubblewrap
is installed). On the plain ``local`` provider the demo says so, skips the commands and
reads the file back through the files API instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

DEMO_FILE = "DEMO.md"
#: What runs in the sandbox in the commands step: what the timeline shows, and the argv.
DEMO_COMMANDS: list[tuple[str, list[str]]] = [
    ("git status --short", ["git", "status", "--short"]),
    (
        "python3 -c '…count the lines…'",
        [
            "python3",
            "-c",
            f"import sys; n = open('{DEMO_FILE}').read().count(chr(10)); "
            f"print(f'{DEMO_FILE} has {{n}} lines, python {{sys.version.split()[0]}}')",
        ],
    ),
]
NO_COMMANDS = (
    "commands need bubblewrap: this stack runs the plain `local` sandbox provider "
    "(install it with `apt-get install -y bubblewrap`; `lifecycle up` then uses `bwrap`)"
)
_FINISHED = ("exited", "killed", "failed")


class StepFailed(Exception):
    """A demo step did not reach its goal; the message says why."""


@dataclass
class StepResult:
    name: str
    ok: bool
    seconds: float
    detail: str


Session = dict[str, Any]


def human_size(n: int | None) -> str:
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


class Demo:
    """Drives one session; :meth:`run` returns the process exit code."""

    def __init__(
        self,
        client: httpx.Client,
        console: Console,
        *,
        timeout: float = 90.0,
        poll_interval: float = 0.2,
    ) -> None:
        self.client = client
        self.console = console
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.results: list[StepResult] = []
        self.sid: str | None = None
        self.session: Session = {}
        self.content = ""
        self.sandbox_type: str | None = None
        #: Lines the current step prints under its own (a command's output).
        self.notes: list[str] = []
        self._t0 = time.monotonic()

    @property
    def commands_available(self) -> bool:
        """Whether the session's sandbox runs commands (the ``bwrap`` provider)."""
        return self.sandbox_type == "bwrap"

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, expect: int, **kwargs: Any) -> dict[str, Any]:
        return self._send(method, path, expect, **kwargs).json()  # type: ignore[no-any-return]

    def _send(self, method: str, path: str, expect: int, **kwargs: Any) -> httpx.Response:
        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise StepFailed(
                f"cannot reach the API at {self.client.base_url} ({type(exc).__name__}); "
                "is `lifecycle up` running?"
            ) from None
        if response.status_code != expect:
            try:
                message = response.json().get("error") or response.text
            except ValueError:
                message = response.text
            raise StepFailed(f"{method} {path} answered {response.status_code}: {message}")
        return response

    def _get(self) -> Session:
        session: Session = self._request("GET", f"/api/sessions/{self.sid}", 200)["session"]
        self.session = session
        return session

    def _runs(self) -> list[dict[str, Any]]:
        runs: list[dict[str, Any]] = self._request("GET", f"/api/sessions/{self.sid}/runs", 200)[
            "runs"
        ]
        return runs

    def _kick(self, what: str) -> dict[str, Any]:
        run: dict[str, Any] = self._request("POST", f"/api/sessions/{self.sid}/{what}", 202)["run"]
        return run

    def _wait(self, what: str, done: Callable[[Session], bool]) -> Session:
        """Poll the session until ``done`` (and no run holds it), a failure, or the timeout."""
        deadline = time.monotonic() + self.timeout
        while True:
            s = self._get()
            if s["lifecycleState"] == "failed" and s["lifecycleRunId"] is None:
                raise StepFailed(f"the session failed: {s['lifecycleError']}")
            if s["lifecycleRunId"] is None and done(s):
                return s
            if time.monotonic() > deadline:
                raise StepFailed(
                    f"timed out after {self.timeout:.0f}s waiting for {what} "
                    f"(state {s['lifecycleState']}, version {s['lifecycleVersion']})"
                )
            time.sleep(self.poll_interval)

    def _command(self, argv: list[str]) -> dict[str, Any]:
        """Run ``argv`` in the sandbox through the commands API and wait for its end;
        a command that does not exit 0 fails the step (with what it printed)."""
        path = f"/api/sessions/{self.sid}/commands"
        cid = self._request("POST", path, 202, json={"argv": argv})["command"]["id"]
        deadline = time.monotonic() + self.timeout
        while True:
            command: dict[str, Any] = self._request("GET", f"{path}/{cid}", 200)["command"]
            if command["status"] in _FINISHED:
                break
            if time.monotonic() > deadline:
                raise StepFailed(f"timed out after {self.timeout:.0f}s waiting for {argv[0]}")
            time.sleep(self.poll_interval)
        if command["status"] != "exited" or command["exitCode"] != 0:
            why = command["error"] or command["stderr"].strip() or command["status"]
            raise StepFailed(
                f"{argv[0]} ended {command['status']} (exit code {command['exitCode']}): {why}"
            )
        return command

    # ------------------------------------------------------------------ steps
    def step_create(self) -> str:
        body = self._request("POST", "/api/sessions", 200, json={"title": "lifecycle demo"})
        self.session = body["session"]
        self.sid = self.session["id"]
        return f"session {self.sid} (state {self.session['lifecycleState']})"

    def step_provisioned(self) -> str:
        deadline = time.monotonic() + self.timeout
        while True:
            runs = [r for r in self._runs() if r["kind"] == "provision"]
            if any(r["state"] == "succeeded" for r in runs):
                s = self._get()
                return f"repo {s['repoOwner']}/{s['repoName']}, branch {s['branch']}"
            failed = [r for r in runs if r["state"] == "failed"]
            if failed:
                raise StepFailed(f"provisioning failed: {failed[-1]['error']}")
            if time.monotonic() > deadline:
                raise StepFailed(f"timed out after {self.timeout:.0f}s waiting for provisioning")
            time.sleep(self.poll_interval)

    def step_active(self) -> str:
        s = self._wait("the sandbox to start", lambda s: s["lifecycleState"] == "active")
        self.sandbox_type = s["sandboxState"].get("type")
        where = s["sandboxState"].get("workdir") or s["sandboxState"].get("sandboxName")
        return f"{self.sandbox_type} sandbox {where} (v{s['lifecycleVersion']})"

    def step_write(self) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.content = (
            "# Written by `lifecycle demo`\n"
            f"\nWritten at {stamp} into the live sandbox.\n"
            "It must survive hibernation and come back on resume.\n"
        )
        self._send(
            "PUT",
            f"/api/sessions/{self.sid}/files/content",
            200,
            params={"path": DEMO_FILE},
            content=self.content.encode(),
        )
        return f"{DEMO_FILE} ({len(self.content.splitlines())} lines) via PUT …/files/content"

    def step_commands(self) -> str:
        if not self.commands_available:
            return f"skipped: {NO_COMMANDS}"
        ran = []
        for shown, argv in DEMO_COMMANDS:
            command = self._command(argv)
            self.notes.append(f"$ {shown}")
            output = (command["stdout"] + command["stderr"]).rstrip("\n")
            self.notes += [f"  {line}" for line in output.splitlines()] or ["  (no output)"]
            ran.append(f"{argv[0]} {command['durationMs']:.0f} ms")
        return "via POST …/commands: " + ", ".join(ran)

    def step_diff(self) -> str:
        before = self.session.get("cachedDiffUpdatedAt")
        self._kick("diff")
        s = self._wait(
            "the diff",
            lambda s: s["cachedDiffUpdatedAt"] is not None and s["cachedDiffUpdatedAt"] != before,
        )
        files = {f["path"]: f for f in (s["cachedDiff"] or {}).get("files", [])}
        mine = files.get(DEMO_FILE)
        expected = len(self.content.splitlines())
        if mine is None or mine.get("additions") != expected:
            raise StepFailed(f"the diff does not show {DEMO_FILE} with {expected} added lines")
        return (
            f"+{s['linesAdded']} -{s['linesRemoved']} in {len(files)} file(s) "
            f"({DEMO_FILE}: +{mine['additions']})"
        )

    def step_snapshot(self) -> str:
        before = self.session.get("snapshotCreatedAt")
        self._kick("snapshots")
        s = self._wait(
            "the snapshot",
            lambda s: s["snapshotCreatedAt"] is not None and s["snapshotCreatedAt"] != before,
        )
        return f"{human_size(s['snapshotSizeBytes'])}, {Path(s['snapshotUrl'] or '').name}"

    def step_hibernate(self) -> str:
        self._kick("hibernate")
        s = self._wait("hibernation", lambda s: s["lifecycleState"] == "hibernated")
        return (
            f"sandbox stopped; snapshot {human_size(s['snapshotSizeBytes'])} "
            f"(v{s['lifecycleVersion']})"
        )

    def step_resume(self) -> str:
        self._kick("sandbox")
        s = self._wait("the resume", lambda s: s["lifecycleState"] == "active")
        self.sandbox_type = s["sandboxState"].get("type")
        return f"restored from the snapshot (v{s['lifecycleVersion']})"

    def step_intact(self) -> str:
        if self.commands_available:
            found = self._command(["cat", DEMO_FILE])["stdout"]
            how = "read by `cat` in the sandbox"
        else:
            found = self._send(
                "GET", f"/api/sessions/{self.sid}/files/content", 200, params={"path": DEMO_FILE}
            ).content.decode(errors="replace")
            how = "read through GET …/files/content"
        if found != self.content:
            raise StepFailed(f"{DEMO_FILE} changed across hibernate/resume")
        return f"{DEMO_FILE} intact ({len(found.encode())} bytes, {how})"

    # ------------------------------------------------------------------ run
    def steps(self) -> list[tuple[str, str, Callable[[], str]]]:
        return [
            ("created", "creating a session", self.step_create),
            ("provisioned", "provisioning the workspace repo and branch", self.step_provisioned),
            ("active", "starting the sandbox", self.step_active),
            ("file written", "writing a file in the sandbox", self.step_write),
            ("commands", "running commands in the sandbox", self.step_commands),
            ("diff", "computing the diff", self.step_diff),
            ("snapshot", "taking a snapshot", self.step_snapshot),
            ("hibernated", "hibernating", self.step_hibernate),
            ("resumed", "resuming from the snapshot", self.step_resume),
            ("file intact", "checking the file", self.step_intact),
        ]

    def run(self) -> int:
        c = self.console
        c.print(f"[bold]Lifecycle demo[/] against {self.client.base_url}")
        self._t0 = time.monotonic()
        with Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=c,
            transient=True,
        ) as progress:
            for name, doing, fn in self.steps():
                task = progress.add_task(f"{doing} …", total=None)
                started = time.monotonic()
                try:
                    detail, ok = fn(), True
                except StepFailed as exc:
                    detail, ok = str(exc), False
                took = time.monotonic() - started
                progress.remove_task(task)
                self.results.append(StepResult(name, ok, took, detail))
                at = time.monotonic() - self._t0
                mark = "[green]✓[/]" if ok else "[red]✗[/]"
                c.print(
                    f"  {at:6.1f}s  {mark} {name:<13} {detail}", highlight=False, soft_wrap=True
                )
                for note in self.notes:
                    c.print(f"{'':26}{note}", style="dim", highlight=False, markup=False)
                self.notes.clear()
                if not ok:
                    break
        self._summary()
        return 0 if self.passed else 1

    @property
    def passed(self) -> bool:
        """Every step ran and succeeded."""
        return len(self.results) == len(self.steps()) and all(r.ok for r in self.results)

    def _summary(self) -> None:
        table = Table(title="Demo summary")
        table.add_column("step", no_wrap=True)
        table.add_column("took", justify="right", no_wrap=True)
        table.add_column("detail", no_wrap=True)
        for r in self.results:
            mark = "[green]✓[/]" if r.ok else "[red]✗[/]"
            short = r.detail if len(r.detail) <= 46 else r.detail[:45] + "…"
            table.add_row(f"{mark} {r.name}", f"{r.seconds:.1f}s", short)
        self.console.print(table)
        if self.sid:
            s = self.session
            self.console.print(
                f"session {self.sid}: {s.get('lifecycleState')} at version "
                f"{s.get('lifecycleVersion')}"
            )
        self.console.print(
            "[green]demo passed[/]" if self.passed else "[red]demo failed[/]", highlight=False
        )


def run_demo(
    api_url: str, key: str, *, timeout: float = 90.0, console: Console | None = None
) -> int:
    console = console or Console()
    with httpx.Client(base_url=api_url, headers={"x-api-key": key}, timeout=30) as client:
        return Demo(client, console, timeout=timeout).run()
