"""Start and drive the local GitHub-compatible test server (``tests.github_fake.server``).

Usage::

    gh = start_fake_github(tmp_path, token="test-token")
    try:
        settings = Settings(repo_host="github", github_token=gh.token,
                            github_api_url=gh.api_url)          # or: env = gh.settings_env()
        gh.inject(path_regex=r"/repos/acme/r$", method="GET", status=502, times=2)
        gh.inject_secondary_rate_limit(retry_after=2, path_regex=r"/orgs/acme/repos$")
        gh.stats()["repos_created_by_name"]                      # {"acme/r": 1}
        gh.add_repo("acme", "secret", visible=False)            # exists, token can't see it
    finally:
        gh.stop()

The server is a real separate process on 127.0.0.1 (see the server module for the
endpoints). ``api_url`` is ``http://127.0.0.1:<port>/api/v3`` (GitHub Enterprise
layout) and ``git_url`` is ``http://127.0.0.1:<port>``, which is what
``GitHubRepoHost`` derives from that API URL, so no git-URL setting is needed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["FakeGitHubServer", "start_fake_github"]

_PROJECT_ROOT = Path(__file__).resolve().parents[2]


class FakeGitHubServer:
    """Handle on a running fake GitHub process."""

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        port: int,
        token: str,
        root: Path,
        log_path: Path,
        user: str,
    ) -> None:
        self.process = process
        self.port = port
        self.token = token
        self.root = root
        self.log_path = log_path
        self.user = user
        self.base_url = f"http://127.0.0.1:{port}"
        self.api_url = f"{self.base_url}/api/v3"
        self.git_url = self.base_url

    # -- control API ---------------------------------------------------------------

    def _control(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.base_url}/_control/{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise RuntimeError(
                f"fake GitHub control {path} failed: {exc.code} {exc.read().decode(errors='replace')}"
            ) from None

    def inject(
        self,
        path_regex: str,
        *,
        method: str = "*",
        status: int = 500,
        times: int | None = 1,
        headers: dict[str, str] | None = None,
        body: Any = None,
        action: str = "respond",
        delay: float = 0.0,
    ) -> dict[str, Any]:
        """Add a fault rule (see ``server.Rule``); returns the rule as stored.

        ``path_regex`` is searched in the request path, e.g. ``r"/repos/acme/r$"`` (API
        paths start with ``/api/v3``; git paths are ``/{owner}/{repo}.git/...``).
        ``action``: ``respond`` (answer ``status``/``headers``/``body``), ``race`` (a
        concurrent client sends the same request first) or ``delay`` (sleep ``delay``
        seconds, then answer normally). ``times=None`` keeps the rule forever.
        """
        rule: dict[str, Any] = {
            "path_regex": path_regex,
            "method": method,
            "status": status,
            "times": times,
            "headers": headers or {},
            "body": body,
            "action": action,
            "delay": delay,
        }
        result: dict[str, Any] = self._control("POST", "inject", rule)
        return result

    def inject_secondary_rate_limit(
        self,
        retry_after: int = 2,
        *,
        path_regex: str = r"^/api/v3/",
        method: str = "*",
        status: int = 403,
        times: int | None = 1,
    ) -> dict[str, Any]:
        """GitHub's secondary rate limit: 403 (or 429) with ``Retry-After``."""
        return self.inject(
            path_regex,
            method=method,
            status=status,
            times=times,
            headers={"Retry-After": str(retry_after)},
        )

    def inject_primary_rate_limit(
        self,
        reset_in: float = 60,
        *,
        path_regex: str = r"^/api/v3/",
        method: str = "*",
        times: int | None = 1,
    ) -> dict[str, Any]:
        """GitHub's primary rate limit: 403 with ``x-ratelimit-remaining: 0`` and a reset."""
        reset = int(time.time() + reset_in)
        return self.inject(
            path_regex,
            method=method,
            status=403,
            times=times,
            headers={"x-ratelimit-remaining": "0", "x-ratelimit-reset": str(reset)},
        )

    def set_rate_limit(
        self,
        *,
        limit: int | None = None,
        remaining: int | None = None,
        reset_in: float | None = None,
    ) -> dict[str, int]:
        """Set the server's real primary rate limit (remaining 0: every API call is 403)."""
        body: dict[str, Any] = {}
        if limit is not None:
            body["limit"] = limit
        if remaining is not None:
            body["remaining"] = remaining
        if reset_in is not None:
            body["reset_in"] = reset_in
        result: dict[str, int] = self._control("POST", "rate_limit", body)
        return result

    def add_repo(self, owner: str, name: str, *, visible: bool = True) -> dict[str, Any]:
        """Make ``owner/name`` exist (created as another account would, private with a
        first commit) and visible to the token or not. ``visible=False`` is a repository
        the token lacks access to: GitHub answers 404 on every read and ``422 ... name
        already exists on this account`` on create. Also hides or shows an existing one."""
        result: dict[str, Any] = self._control(
            "POST", "repos", {"owner": owner, "name": name, "visible": visible}
        )
        return result

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: ``repos_created``, ``repos_created_by_name``
        (``{"owner/name": n}``), ``refs_created``, ``refs_created_by_name``
        (``{"owner/name:refs/heads/b": n}``), ``requests`` (by route, e.g.
        ``"GET /repos/{owner}/{repo}"``), ``responses`` (``"<route> <status>"``),
        ``not_modified`` (304s) and ``not_modified_by_route``, ``injected``,
        ``auth_failures``, ``rules``, ``rate_limit`` and ``repos`` (every repository with
        ``full_name``, ``private``, ``auto_init``, ``default_branch``, ``visible`` (to the
        token) and ``branches`` ``{name: sha}``)."""
        result: dict[str, Any] = self._control("GET", "stats")
        return result

    def repo(self, full_name: str) -> dict[str, Any] | None:
        """One entry of ``stats()["repos"]`` (case-insensitive), or None."""
        for repo in self.stats()["repos"]:
            if repo["full_name"].lower() == full_name.lower():
                return dict(repo)
        return None

    def reset(self, *, repos: bool = False) -> None:
        """Drop fault rules and counters, refill the rate limit; ``repos`` also deletes
        every repository."""
        self._control("POST", "reset", {"repos": repos})

    def settings_env(self) -> dict[str, str]:
        """``LIFECYCLE_*`` variables that point the worker at this server."""
        return {
            "LIFECYCLE_REPO_HOST": "github",
            "LIFECYCLE_GITHUB_TOKEN": self.token,
            "LIFECYCLE_GITHUB_API_URL": self.api_url,
        }

    # -- lifecycle -------------------------------------------------------------------

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def __enter__(self) -> FakeGitHubServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_fake_github(
    tmp_dir: Path,
    token: str,
    *,
    user: str = "lifecycle-bot",
    default_branch: str = "main",
    orgs: list[str] | None = None,
    startup_timeout: float = 30.0,
) -> FakeGitHubServer:
    """Start the fake GitHub as a separate process on a free loopback port.

    Repositories go to ``tmp_dir/github-<id>/repos``; the server's log beside them.
    """
    tmp_dir = Path(tmp_dir)
    work = tmp_dir / f"github-{uuid.uuid4().hex[:8]}"
    work.mkdir(parents=True, exist_ok=True)
    root = work / "repos"
    ready = work / "ready.json"
    log_path = work / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "tests.github_fake.server",
        "--port",
        "0",
        "--root",
        str(root),
        "--user",
        user,
        "--default-branch",
        default_branch,
        "--ready-file",
        str(ready),
    ]
    if orgs is not None:
        cmd += ["--orgs", ",".join(orgs)]
    env = dict(os.environ)
    env["FAKE_GITHUB_TOKEN"] = token  # not on the command line (ps would show it)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(_PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            cmd, cwd=_PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    deadline = time.monotonic() + startup_timeout
    while not ready.exists():
        if process.poll() is not None:
            raise RuntimeError(
                f"fake GitHub exited with {process.returncode}: {log_path.read_text()[-2000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise RuntimeError(f"fake GitHub did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.05)
    port = int(json.loads(ready.read_text())["port"])
    server = FakeGitHubServer(process, port, token, root, log_path, user)
    server._control("GET", "health")
    return server
