"""``lifecycle demo``: one session through its whole lifecycle over HTTP, live.

create → provisioned → active → a file written in the sandbox → diff (line counts) →
snapshot (size) → hibernated → resumed → the file is still there. Every wait is
bounded; a step that fails or times out ends the demo with a non-zero exit code.

The file step writes into ``sandboxState.workdir`` directly, so the demo has to run on
the machine that holds the sandbox (the local stack of ``lifecycle up``).
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
        self.workdir: Path | None = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ HTTP
    def _request(self, method: str, path: str, expect: int, **kwargs: Any) -> dict[str, Any]:
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
        body: dict[str, Any] = response.json()
        return body

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
        workdir = s["sandboxState"].get("workdir")
        if not workdir:
            raise StepFailed("the active session has no sandboxState.workdir")
        self.workdir = Path(workdir)
        return f"sandbox {workdir} (v{s['lifecycleVersion']})"

    def step_write(self) -> str:
        assert self.workdir is not None
        if not self.workdir.is_dir():
            raise StepFailed(
                f"{self.workdir} is not on this machine: run the demo where the worker runs"
            )
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self.content = (
            "# Written by `lifecycle demo`\n"
            f"\nWritten at {stamp} into the live sandbox.\n"
            "It must survive hibernation and come back on resume.\n"
        )
        (self.workdir / DEMO_FILE).write_text(self.content)
        self._request("POST", f"/api/sessions/{self.sid}/activity", 200)
        return f"{DEMO_FILE} ({len(self.content.splitlines())} lines) in the sandbox"

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
        assert self.workdir is not None
        gone = "sandbox stopped" if not self.workdir.exists() else "sandbox directory still there"
        return f"{gone}; snapshot {human_size(s['snapshotSizeBytes'])} (v{s['lifecycleVersion']})"

    def step_resume(self) -> str:
        self._kick("sandbox")
        s = self._wait("the resume", lambda s: s["lifecycleState"] == "active")
        self.workdir = Path(s["sandboxState"].get("workdir") or self.workdir or ".")
        return f"restored from the snapshot (v{s['lifecycleVersion']})"

    def step_intact(self) -> str:
        assert self.workdir is not None
        path = self.workdir / DEMO_FILE
        try:
            found = path.read_text()
        except OSError as exc:
            raise StepFailed(f"{DEMO_FILE} is missing after the resume ({exc})") from None
        if found != self.content:
            raise StepFailed(f"{DEMO_FILE} changed across hibernate/resume")
        return f"{DEMO_FILE} intact ({len(found.encode())} bytes)"

    # ------------------------------------------------------------------ run
    def steps(self) -> list[tuple[str, str, Callable[[], str]]]:
        return [
            ("created", "creating a session", self.step_create),
            ("provisioned", "provisioning the workspace repo and branch", self.step_provisioned),
            ("active", "starting the sandbox", self.step_active),
            ("file written", "writing a file in the sandbox", self.step_write),
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
