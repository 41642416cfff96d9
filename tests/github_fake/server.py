"""A local server that answers like GitHub, for tests (stdlib WSGI, one real process).

Run it as ``python -m tests.github_fake.server --port 0 --root DIR --token T
--ready-file F`` (``tests.github_fake.start_fake_github`` does that for you). It binds
127.0.0.1, writes ``{"port": P, "pid": N}`` to the ready file once it accepts
connections, and serves three things on that port:

* **The REST API** under ``/api/v3`` (GitHub Enterprise Server layout, so that the API
  URL is ``http://127.0.0.1:P/api/v3`` and the git URL ``http://127.0.0.1:P``):
  ``GET /user``, ``GET /users/{login}``, ``GET /orgs/{org}``, ``POST /orgs/{org}/repos``,
  ``POST /user/repos``, ``GET /repos/{o}/{r}``, ``GET /repos/{o}/{r}/branches/{b}``,
  ``GET /repos/{o}/{r}/git/ref/heads/{b}`` (and ``/git/refs/...``),
  ``POST /repos/{o}/{r}/git/refs``, ``GET /rate_limit``. JSON shapes, status codes and
  error bodies follow GitHub (``{"message": ..., "documentation_url": ...}``; 422
  ``Validation Failed`` with ``errors``; ``Reference already exists``). Every answer
  carries ``x-ratelimit-limit/remaining/reset/used/resource``; every ``GET`` answer an
  ``ETag``, and a matching ``If-None-Match`` gets a ``304`` that costs no rate limit.
  The API wants ``Authorization: token T`` or ``Bearer T``; anything else is
  ``401 Bad credentials``. When the (settable) rate limit is used up the API answers
  ``403 API rate limit exceeded`` with ``x-ratelimit-remaining: 0``, like GitHub.
* **Git over smart HTTP** at ``/{owner}/{repo}.git/...``, by running ``git
  http-backend`` as a CGI program over bare repositories ``<root>/<owner>/<repo>.git``.
  It wants HTTP Basic auth whose password is the token (GitHub's
  ``x-access-token:<token>``), or ``Authorization: token/Bearer T``.
* **A control API** at ``/_control/...`` (no auth; loopback only):
  ``POST /_control/inject`` (fault rules, see :class:`Rule`), ``GET /_control/stats``,
  ``POST /_control/reset`` (``{"repos": true}`` also deletes repositories),
  ``POST /_control/rate_limit`` (``{"limit", "remaining", "reset_in"}``),
  ``POST /_control/repos`` (see below), ``GET /_control/health``.

Repositories the token cannot see: ``POST /_control/repos`` with ``{"owner", "name",
"visible": false}`` creates ``owner/name`` (private, ``auto_init``) as if another account
had, or hides an existing one; ``"visible": true`` shows it again. Like GitHub with a
token that lacks access, every API route of a hidden repository answers ``404 Not
Found``, git over HTTP answers ``Repository not found.``, and creating it answers ``422
... name already exists on this account`` (the name is taken all the same). Such a
repository is listed in the stats with ``"visible": false`` and not counted in
``repos_created``.

Organizations: every login other than the token's user (``--user``, default
``lifecycle-bot``) is an organization the token may create repositories in, unless
``--orgs a,b`` names the only organizations that exist.

Concurrency: the server is threaded; repository creation and ref creation are
serialized by locks, so 20 concurrent creators of one repository get one ``201`` and
nineteen ``422 ... name already exists on this account``.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

API_PREFIX = "/api/v3"
DOCS_URL = "https://docs.github.com/rest"
ZERO_SHA = "0" * 40
META_FILE = "fake-github.json"
RATE_WINDOW_SECONDS = 3600

SECONDARY_RATE_LIMIT_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."
)

_HOST_IDENTITY = {
    "GIT_AUTHOR_NAME": "GitHub",
    "GIT_AUTHOR_EMAIL": "noreply@github.com",
    "GIT_COMMITTER_NAME": "GitHub",
    "GIT_COMMITTER_EMAIL": "noreply@github.com",
}
_NAME = re.compile(r"[A-Za-z0-9._-]{1,100}")
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}
_STATUS_TEXT = {
    200: "OK",
    201: "Created",
    204: "No Content",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    409: "Conflict",
    422: "Unprocessable Entity",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status_line(status: int) -> str:
    return f"{status} {_STATUS_TEXT.get(status, 'Status')}"


def _git(args: list[str], cwd: Path | None = None, stdin: bytes | None = None) -> bytes:
    env = {**os.environ, **_HOST_IDENTITY, "LC_ALL": "C", "GIT_TERMINAL_PROMPT": "0"}
    for key in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_CONFIG_COUNT"):
        env.pop(key, None)
    proc = subprocess.run(
        ["git", *args], cwd=cwd, env=env, input=stdin, capture_output=True, check=False
    )
    if proc.returncode != 0:
        raise GitError(proc.stderr.decode(errors="replace").strip())
    return proc.stdout


class GitError(Exception):
    pass


# --------------------------------------------------------------------------- responses


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    route: str = "unmatched"
    counts_rate_limit: bool = True


def json_response(status: int, data: Any, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps(data, indent=2).encode()
    return Response(
        status,
        body,
        {"Content-Type": "application/json; charset=utf-8", **(headers or {})},
    )


def error_response(
    status: int, message: str, errors: list[dict[str, Any]] | None = None
) -> Response:
    data: dict[str, Any] = {"message": message}
    if errors is not None:
        data["errors"] = errors
    data["documentation_url"] = DOCS_URL
    data["status"] = str(status)
    return json_response(status, data)


def default_error_message(status: int, headers: dict[str, str]) -> str:
    lowered = {k.lower(): v for k, v in headers.items()}
    if status in (403, 429) and "retry-after" in lowered:
        return SECONDARY_RATE_LIMIT_MESSAGE
    if status in (403, 429) and lowered.get("x-ratelimit-remaining") == "0":
        return (
            "API rate limit exceeded for user ID 1. If you reach out to GitHub Support for "
            "help, please include the request ID."
        )
    return {
        401: "Bad credentials",
        403: "Resource not accessible by personal access token",
        404: "Not Found",
        409: "Conflict",
        422: "Validation Failed",
        429: SECONDARY_RATE_LIMIT_MESSAGE,
    }.get(status, "Server Error" if status >= 500 else _STATUS_TEXT.get(status, "Error"))


# ------------------------------------------------------------------------------ rules


@dataclass
class Rule:
    """A fault to inject, matched against ``METHOD PATH`` of incoming requests.

    * ``path_regex`` -- ``re.search`` against the request path (``/api/v3/...``, or
      ``/{owner}/{repo}.git/...`` for git), query string excluded.
    * ``method`` -- ``GET``, ``POST``, ... or ``*``.
    * ``times`` -- how many matching requests it affects (``null``: all of them).
    * ``action``:
        - ``respond`` (default): answer ``status`` with ``headers`` and ``body`` (a JSON
          value; default: GitHub's message for that status, e.g. the secondary rate limit
          message for 403/429 with ``Retry-After``); rate-limit headers are added unless
          given.
        - ``race``: before handling the request, handle an identical request as if
          another client had sent it a moment earlier (so a create then finds the
          repository or ref already there and answers 422).
        - ``delay``: sleep ``delay`` seconds, then handle the request normally.
    * ``delay`` -- seconds to sleep before answering (any action).
    """

    id: int
    path_regex: str
    method: str = "*"
    action: str = "respond"
    status: int = 500
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    times: int | None = 1
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method not in ("*", method):
            return False
        return re.search(self.path_regex, path) is not None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "path_regex": self.path_regex,
            "method": self.method,
            "action": self.action,
            "status": self.status,
            "headers": self.headers,
            "body": self.body,
            "times": self.times,
            "delay": self.delay,
            "hits": self.hits,
        }


# ------------------------------------------------------------------------------ state


class FakeGitHub:
    """State and request handling (one instance per server process)."""

    def __init__(
        self,
        root: Path,
        token: str,
        *,
        user: str = "lifecycle-bot",
        default_branch: str = "main",
        orgs: Iterable[str] | None = None,
    ) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.user = user
        self.default_branch = default_branch
        self.orgs = None if orgs is None else {o.lower() for o in orgs}
        self.lock = threading.Lock()  # rules, stats, rate limit, metadata
        self.create_lock = threading.Lock()  # repository creation
        self.ref_locks: dict[str, threading.Lock] = {}
        self.rules: list[Rule] = []
        self.next_rule_id = 1
        self.next_id = 1000
        self.repos: dict[tuple[str, str], dict[str, Any]] = {}
        self.rate_limit = 5000
        self.rate_remaining = 5000
        self.rate_reset = int(time.time()) + RATE_WINDOW_SECONDS
        self._reset_stats()

    # -- stats -------------------------------------------------------------------------

    def _reset_stats(self) -> None:
        self.requests: Counter[str] = Counter()
        self.not_modified: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.created: Counter[str] = Counter()
        self.refs_created: Counter[str] = Counter()
        self.injected = 0
        self.auth_failures = 0

    def stats(self) -> dict[str, Any]:
        with self.lock:
            self._roll_rate_window()
            data: dict[str, Any] = {
                "repos_created": sum(self.created.values()),
                "repos_created_by_name": dict(self.created),
                "refs_created": sum(self.refs_created.values()),
                "refs_created_by_name": dict(self.refs_created),
                "requests": dict(self.requests),
                "responses": dict(self.statuses),
                "not_modified": sum(self.not_modified.values()),
                "not_modified_by_route": dict(self.not_modified),
                "injected": self.injected,
                "auth_failures": self.auth_failures,
                "rules": [rule.as_dict() for rule in self.rules],
                "rate_limit": self._rate_dict(),
            }
        data["repos"] = self.list_repos()
        return data

    def list_repos(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.root.glob("*/*.git")):
            meta = self._load_meta(path.parent.name, path.name[: -len(".git")])
            if meta is None:
                continue
            try:
                out = _git(
                    ["for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads"], path
                )
            except GitError:
                out = b""
            branches = dict(line.split(" ", 1) for line in out.decode().splitlines() if line)
            found.append(
                {
                    "full_name": f"{meta['owner']}/{meta['name']}",
                    "private": meta["private"],
                    "auto_init": meta["auto_init"],
                    "default_branch": meta["default_branch"],
                    "visible": meta.get("visible", True),
                    "branches": branches,
                }
            )
        return found

    # -- rate limit ---------------------------------------------------------------------

    def _roll_rate_window(self) -> None:
        now = int(time.time())
        if now >= self.rate_reset:
            self.rate_remaining = self.rate_limit
            self.rate_reset = now + RATE_WINDOW_SECONDS

    def _rate_dict(self) -> dict[str, int]:
        return {
            "limit": self.rate_limit,
            "remaining": self.rate_remaining,
            "reset": self.rate_reset,
            "used": self.rate_limit - self.rate_remaining,
        }

    def _rate_headers(self) -> dict[str, str]:
        rate = self._rate_dict()
        return {
            "x-ratelimit-limit": str(rate["limit"]),
            "x-ratelimit-remaining": str(rate["remaining"]),
            "x-ratelimit-reset": str(rate["reset"]),
            "x-ratelimit-used": str(rate["used"]),
            "x-ratelimit-resource": "core",
        }

    def set_rate_limit(self, body: dict[str, Any]) -> dict[str, int]:
        with self.lock:
            if "limit" in body:
                self.rate_limit = int(body["limit"])
                self.rate_remaining = min(self.rate_remaining, self.rate_limit)
            if "remaining" in body:
                self.rate_remaining = int(body["remaining"])
            if "reset_in" in body:
                self.rate_reset = int(time.time() + float(body["reset_in"]))
            return self._rate_dict()

    # -- control ------------------------------------------------------------------------

    def add_rule(self, body: dict[str, Any]) -> Rule:
        if "path_regex" not in body:
            raise ValueError("path_regex is required")
        re.compile(str(body["path_regex"]))
        with self.lock:
            rule = Rule(
                id=self.next_rule_id,
                path_regex=str(body["path_regex"]),
                method=str(body.get("method") or "*").upper(),
                action=str(body.get("action") or "respond"),
                status=int(body.get("status", 500)),
                headers={str(k): str(v) for k, v in (body.get("headers") or {}).items()},
                body=body.get("body"),
                times=None if body.get("times", 1) is None else int(body.get("times", 1)),
                delay=float(body.get("delay") or 0.0),
            )
            if rule.action not in ("respond", "race", "delay"):
                raise ValueError(f"unknown action {rule.action!r}")
            self.next_rule_id += 1
            self.rules.append(rule)
            return rule

    def reset(self, body: dict[str, Any]) -> None:
        with self.lock:
            self.rules.clear()
            self._reset_stats()
            self.rate_remaining = self.rate_limit
            if body.get("repos"):
                with self.create_lock:
                    self.repos.clear()
                    for child in self.root.iterdir():
                        if child.is_dir():
                            shutil.rmtree(child, ignore_errors=True)

    def _take_rule(self, method: str, path: str) -> Rule | None:
        with self.lock:
            for rule in self.rules:
                if rule.matches(method, path):
                    rule.hits += 1
                    self.injected += 1
                    return rule
        return None

    # -- repositories ----------------------------------------------------------------

    def repo_path(self, owner: str, name: str) -> Path:
        return self.root / owner / f"{name}.git"

    def _find_path(self, owner: str, name: str) -> Path | None:
        """The on-disk repository for ``owner/name``, matched case-insensitively."""
        exact = self.repo_path(owner, name)
        if (exact / "HEAD").is_file():
            return exact
        if not self.root.is_dir():
            return None
        for owner_dir in self.root.iterdir():
            if owner_dir.name.lower() != owner.lower():
                continue
            for repo_dir in owner_dir.glob("*.git"):
                if repo_dir.name[:-4].lower() == name.lower() and (repo_dir / "HEAD").is_file():
                    return repo_dir
        return None

    def _load_meta(self, owner: str, name: str) -> dict[str, Any] | None:
        key = (owner.lower(), name.lower())
        with self.lock:
            cached = self.repos.get(key)
        if cached is not None:
            return cached
        path = self._find_path(owner, name)
        if path is None:
            return None
        try:
            meta = json.loads((path / META_FILE).read_text())
        except (OSError, ValueError):
            with self.lock:
                self.next_id += 1
                meta = {
                    "id": self.next_id,
                    "owner": path.parent.name,
                    "name": path.name[:-4],
                    "private": True,
                    "auto_init": True,
                    "default_branch": self.default_branch,
                    "created_at": _now_iso(),
                }
        with self.lock:
            self.repos.setdefault(key, meta)
            return self.repos[key]

    def is_org(self, login: str) -> bool:
        if login.lower() == self.user.lower():
            return False
        return self.orgs is None or login.lower() in self.orgs

    def set_visibility(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /_control/repos``: create ``owner/name`` unless it exists (as another
        account would: not counted in ``repos_created``), then make it visible to the
        token or not."""
        owner, name = body.get("owner"), body.get("name")
        if not isinstance(owner, str) or not isinstance(name, str):
            raise ValueError("owner and name are required strings")
        if not _NAME.fullmatch(owner) or not _NAME.fullmatch(name) or name in (".", ".."):
            raise ValueError("owner or name is invalid")
        visible = bool(body.get("visible", True))
        meta = self._load_meta(owner, name)
        if meta is None:
            meta, _reason = self.create_repo(
                owner, {"name": name, "private": True, "auto_init": True}, count=False
            )
            if meta is None:  # created concurrently
                meta = self._load_meta(owner, name)
            assert meta is not None
        path = self._find_path(owner, name)
        with self.lock:
            meta["visible"] = visible
            if path is not None:
                (path / META_FILE).write_text(json.dumps(meta))
            return {"full_name": f"{meta['owner']}/{meta['name']}", "visible": visible}

    @staticmethod
    def _visible(meta: dict[str, Any]) -> bool:
        return bool(meta.get("visible", True))

    def create_repo(
        self, owner: str, body: dict[str, Any], *, count: bool = True
    ) -> tuple[dict[str, Any] | None, str]:
        """Create ``owner/<body.name>``: (meta, "") or (None, reason) when it exists
        (visible to the token or not: the name is taken either way)."""
        name = body["name"]
        with self.create_lock:
            if self._find_path(owner, name) is not None:
                return None, "exists"
            owner_dir = self.root / owner
            owner_dir.mkdir(parents=True, exist_ok=True)
            tmp = owner_dir / f".tmp-{uuid.uuid4().hex}.git"
            try:
                _git(
                    [
                        "init",
                        "--bare",
                        "--quiet",
                        f"--initial-branch={self.default_branch}",
                        str(tmp),
                    ]
                )
                if body.get("auto_init"):
                    readme = f"# {name}\n".encode()
                    blob = _git(["hash-object", "-w", "--stdin"], tmp, readme).decode().strip()
                    tree = (
                        _git(["mktree"], tmp, f"100644 blob {blob}\tREADME.md\n".encode())
                        .decode()
                        .strip()
                    )
                    commit = (
                        _git(["commit-tree", tree, "-m", "Initial commit"], tmp).decode().strip()
                    )
                    _git(["update-ref", f"refs/heads/{self.default_branch}", commit, ZERO_SHA], tmp)
                with self.lock:
                    self.next_id += 1
                    repo_id = self.next_id
                meta = {
                    "id": repo_id,
                    "owner": owner,
                    "name": name,
                    "private": bool(body.get("private", False)),
                    "auto_init": bool(body.get("auto_init", False)),
                    "description": body.get("description"),
                    "default_branch": self.default_branch,
                    "created_at": _now_iso(),
                }
                (tmp / META_FILE).write_text(json.dumps(meta))
                tmp.rename(self.repo_path(owner, name))
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
            with self.lock:
                self.repos[(owner.lower(), name.lower())] = meta
                if count:
                    self.created[f"{owner}/{name}"] += 1
            return meta, ""

    def ref_sha(self, path: Path, ref: str) -> str | None:
        try:
            out = _git(["rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], path)
        except GitError:
            return None
        return out.decode().strip() or None

    def create_ref(self, meta: dict[str, Any], path: Path, ref: str, sha: str) -> str:
        """'' on success, else the GitHub error message."""
        key = str(path)
        with self.lock:
            lock = self.ref_locks.setdefault(key, threading.Lock())
        with lock:
            try:
                _git(["cat-file", "-e", f"{sha}^{{commit}}"], path)
            except GitError:
                return "Object does not exist"
            if ref in self._refs(path, ref):
                return "Reference already exists"
            try:
                _git(["update-ref", ref, sha, ZERO_SHA], path)
            except GitError as exc:
                if "exists" in str(exc) or "unable to lock" in str(exc).lower():
                    return "Reference already exists"
                return "Reference update failed"
        with self.lock:
            self.refs_created[f"{meta['owner']}/{meta['name']}:{ref}"] += 1
        return ""

    # -- JSON shapes -----------------------------------------------------------------

    def _user_json(self, base: str, login: str, org: bool) -> dict[str, Any]:
        ident = int(hashlib.sha1(login.lower().encode()).hexdigest()[:6], 16)
        data: dict[str, Any] = {
            "login": login,
            "id": ident,
            "node_id": base64.b64encode(f"04:User{ident}".encode()).decode(),
            "url": f"{base}/{'orgs' if org else 'users'}/{login}",
            "html_url": f"{self._git_base(base)}/{login}",
            "repos_url": f"{base}/{'orgs' if org else 'users'}/{login}/repos",
            "type": "Organization" if org else "User",
            "site_admin": False,
        }
        if org:
            data["description"] = None
        return data

    @staticmethod
    def _git_base(api_base: str) -> str:
        return api_base[: -len(API_PREFIX)] if api_base.endswith(API_PREFIX) else api_base

    def repo_json(self, base: str, meta: dict[str, Any]) -> dict[str, Any]:
        owner, name = meta["owner"], meta["name"]
        url = f"{base}/repos/{owner}/{name}"
        git_base = self._git_base(base)
        return {
            "id": meta["id"],
            "node_id": base64.b64encode(f"010:Repository{meta['id']}".encode()).decode(),
            "name": name,
            "full_name": f"{owner}/{name}",
            "private": meta["private"],
            "visibility": "private" if meta["private"] else "public",
            "owner": self._user_json(base, owner, self.is_org(owner)),
            "html_url": f"{git_base}/{owner}/{name}",
            "description": meta.get("description"),
            "fork": False,
            "url": url,
            "branches_url": f"{url}/branches{{/branch}}",
            "git_refs_url": f"{url}/git/refs{{/sha}}",
            "clone_url": f"{git_base}/{owner}/{name}.git",
            "default_branch": meta["default_branch"],
            "created_at": meta["created_at"],
            "updated_at": meta["created_at"],
            "pushed_at": meta["created_at"],
            "size": 0,
            "archived": False,
            "disabled": False,
            "permissions": {
                "admin": True,
                "maintain": True,
                "push": True,
                "triage": True,
                "pull": True,
            },
        }

    @staticmethod
    def ref_json(base: str, meta: dict[str, Any], ref: str, sha: str) -> dict[str, Any]:
        url = f"{base}/repos/{meta['owner']}/{meta['name']}"
        return {
            "ref": ref,
            "node_id": base64.b64encode(f"REF_{ref}".encode()).decode(),
            "url": f"{url}/git/{ref}",
            "object": {"sha": sha, "type": "commit", "url": f"{url}/git/commits/{sha}"},
        }

    # -- WSGI --------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        method = environ["REQUEST_METHOD"].upper()
        path = environ.get("PATH_INFO") or "/"
        try:
            if path.startswith("/_control/"):
                response = self.control(method, path, environ)
                headers = response.headers
            else:
                response = self.handle(method, path, environ)
                headers = response.headers
        except Exception as exc:  # a bug in the fake: say so loudly
            import traceback

            traceback.print_exc()
            response = error_response(500, f"fake GitHub server error: {exc}")
            headers = response.headers
        header_list = [
            (k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}
        ]
        header_list.append(("Content-Length", str(len(response.body))))
        start_response(_status_line(response.status), header_list)
        return [response.body]

    def control(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        body = _read_json(environ) if method == "POST" else {}
        if body is None:
            return error_response(400, "Problems parsing JSON")
        if path == "/_control/health":
            return json_response(200, {"ok": True, "pid": os.getpid()})
        if path == "/_control/stats" and method == "GET":
            return json_response(200, self.stats())
        if path == "/_control/inject" and method == "POST":
            try:
                rule = self.add_rule(body)
            except (ValueError, TypeError, re.error) as exc:
                return error_response(400, f"bad rule: {exc}")
            return json_response(201, rule.as_dict())
        if path == "/_control/reset" and method == "POST":
            self.reset(body)
            return json_response(200, {"ok": True})
        if path == "/_control/rate_limit" and method == "POST":
            return json_response(200, self.set_rate_limit(body))
        if path == "/_control/repos" and method == "POST":
            try:
                return json_response(200, self.set_visibility(body))
            except ValueError as exc:
                return error_response(400, f"bad repository: {exc}")
        return error_response(404, "Not Found")

    def handle(self, method: str, path: str, environ: dict[str, Any]) -> Response:
        rule = self._take_rule(method, path)
        if rule is not None and rule.delay > 0:
            time.sleep(rule.delay)
        is_api = path == API_PREFIX or path.startswith(API_PREFIX + "/")
        body_bytes = _read_body(environ)
        if rule is not None and rule.action == "respond":
            response = self._injected(rule, is_api)
            route = self._route_name(method, path) if is_api else self._git_route(method, path)
            with self.lock:
                self.requests[route] += 1
                self.statuses[f"{route} {response.status}"] += 1
            return response
        if rule is not None and rule.action == "race":
            # Someone else sends the same request first.
            self._dispatch(method, path, environ, body_bytes, is_api)
        return self._dispatch(method, path, environ, body_bytes, is_api, count=True)

    def _injected(self, rule: Rule, is_api: bool) -> Response:
        headers = dict(rule.headers)
        lowered = {k.lower() for k in headers}
        if is_api:
            with self.lock:
                rate = self._rate_headers()
            if "x-ratelimit-remaining" in lowered and "x-ratelimit-reset" not in lowered:
                rate.pop("x-ratelimit-reset")
            for key, value in rate.items():
                if key not in lowered:
                    headers[key] = value
        body = rule.body
        if body is None:
            body = {
                "message": default_error_message(rule.status, headers),
                "documentation_url": DOCS_URL,
            }
        if isinstance(body, str | bytes):
            raw = body.encode() if isinstance(body, str) else body
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
            return Response(rule.status, raw, headers)
        response = json_response(rule.status, body)
        response.headers.update(headers)
        return response

    def _dispatch(
        self,
        method: str,
        path: str,
        environ: dict[str, Any],
        body: bytes,
        is_api: bool,
        *,
        count: bool = False,
    ) -> Response:
        if is_api:
            response = self.api(method, path[len(API_PREFIX) :] or "/", environ, body)
        else:
            response = self.git(method, path, environ, body)
        if count:
            with self.lock:
                self.requests[response.route] += 1
                self.statuses[f"{response.route} {response.status}"] += 1
                if response.status == 304:
                    self.not_modified[response.route] += 1
        return response

    # -- REST API ----------------------------------------------------------------------

    _ROUTES: ClassVar[list[tuple[str, re.Pattern[str], str, str]]] = [
        (m, re.compile(p), t, h)
        for m, p, t, h in [
            ("GET", r"^/user$", "GET /user", "get_user"),
            ("GET", r"^/users/(?P<login>[^/]+)$", "GET /users/{login}", "get_users"),
            ("GET", r"^/orgs/(?P<org>[^/]+)$", "GET /orgs/{org}", "get_org"),
            ("POST", r"^/orgs/(?P<org>[^/]+)/repos$", "POST /orgs/{org}/repos", "post_org_repos"),
            ("POST", r"^/user/repos$", "POST /user/repos", "post_user_repos"),
            ("GET", r"^/rate_limit$", "GET /rate_limit", "get_rate_limit"),
            (
                "GET",
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)$",
                "GET /repos/{owner}/{repo}",
                "get_repo",
            ),
            (
                "GET",
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/branches/(?P<branch>.+)$",
                "GET /repos/{owner}/{repo}/branches/{branch}",
                "get_branch",
            ),
            (
                "GET",
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/git/ref/(?P<ref>.+)$",
                "GET /repos/{owner}/{repo}/git/ref/{ref}",
                "get_ref",
            ),
            (
                "GET",
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/git/refs/(?P<ref>.+)$",
                "GET /repos/{owner}/{repo}/git/refs/{ref}",
                "get_refs",
            ),
            (
                "POST",
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/git/refs$",
                "POST /repos/{owner}/{repo}/git/refs",
                "post_refs",
            ),
        ]
    ]

    def _route_name(self, method: str, path: str) -> str:
        sub = path[len(API_PREFIX) :] or "/"
        for route_method, pattern, template, _handler in self._ROUTES:
            if route_method == method and pattern.match(sub):
                return template
        return f"{method} <unmatched api>"

    @staticmethod
    def _git_route(method: str, path: str) -> str:
        tail = path.rsplit(".git", 1)[-1] if ".git" in path else path
        return f"git {method} {tail}"

    def _authenticated(self, environ: dict[str, Any]) -> bool | None:
        """True: the token; False: a wrong credential; None: none given."""
        header = str(environ.get("HTTP_AUTHORIZATION") or "")
        if not header:
            return None
        scheme, _, value = header.partition(" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme in ("token", "bearer"):
            return hmac.compare_digest(value.encode(), self.token.encode())
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value, validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return False
            _user, _, password = decoded.partition(":")
            return hmac.compare_digest(password.encode(), self.token.encode())
        return False

    def api(self, method: str, sub: str, environ: dict[str, Any], body: bytes) -> Response:
        route = f"{method} <unmatched api>"
        handler_name = None
        params: dict[str, str] = {}
        for route_method, pattern, template, name in self._ROUTES:
            match = pattern.match(sub)
            if match and route_method == method:
                route, handler_name, params = template, name, match.groupdict()
                break
        auth = self._authenticated(environ)
        with self.lock:
            self._roll_rate_window()
            rate_headers = self._rate_headers()
        if auth is not True:
            with self.lock:
                self.auth_failures += 1
            response = error_response(
                401, "Requires authentication" if auth is None else "Bad credentials"
            )
        elif handler_name is None:
            response = error_response(404, "Not Found")
        else:
            with self.lock:
                limited = self.rate_remaining <= 0
                rate_headers = self._rate_headers()
            if limited:
                response = error_response(403, default_error_message(403, rate_headers))
            else:
                scheme = environ.get("wsgi.url_scheme", "http")
                base = f"{scheme}://{environ.get('HTTP_HOST', 'localhost')}{API_PREFIX}"
                payload: dict[str, Any] = {}
                if method == "POST":
                    parsed = _parse_json(body)
                    if not isinstance(parsed, dict):
                        response = error_response(400, "Problems parsing JSON")
                        response.route = route
                        response.headers.update(rate_headers)
                        return response
                    payload = parsed
                response = getattr(self, "h_" + handler_name)(base, payload, **params)
                response = self._conditional(method, environ, response)
                if response.status != 304:
                    with self.lock:
                        self._roll_rate_window()
                        self.rate_remaining = max(0, self.rate_remaining - 1)
                        rate_headers = self._rate_headers()
        response.route = route
        for key, value in rate_headers.items():
            response.headers.setdefault(key, value)
        response.headers.setdefault("X-GitHub-Media-Type", "github.v3; format=json")
        response.headers.setdefault("X-GitHub-Request-Id", uuid.uuid4().hex[:16].upper())
        response.headers.setdefault("Vary", "Accept, Authorization, Cookie")
        return response

    @staticmethod
    def _conditional(method: str, environ: dict[str, Any], response: Response) -> Response:
        if method != "GET" or response.status != 200:
            return response
        etag = 'W/"' + hashlib.sha256(response.body).hexdigest() + '"'
        response.headers["ETag"] = etag
        wanted = environ.get("HTTP_IF_NONE_MATCH", "")
        tags = {t.strip() for t in wanted.split(",") if t.strip()}
        if etag in tags or etag.removeprefix("W/") in tags or "*" in tags:
            return Response(304, b"", {"ETag": etag})
        return response

    def h_get_user(self, base: str, _body: dict[str, Any]) -> Response:
        return json_response(200, self._user_json(base, self.user, False))

    def h_get_users(self, base: str, _body: dict[str, Any], login: str) -> Response:
        if login.lower() == self.user.lower():
            return json_response(200, self._user_json(base, self.user, False))
        if self.is_org(login):
            return json_response(200, self._user_json(base, login, True))
        return error_response(404, "Not Found")

    def h_get_org(self, base: str, _body: dict[str, Any], org: str) -> Response:
        if not self.is_org(org):
            return error_response(404, "Not Found")
        return json_response(200, self._user_json(base, org, True))

    def h_post_org_repos(self, base: str, body: dict[str, Any], org: str) -> Response:
        if not self.is_org(org):
            return error_response(404, "Not Found")
        return self._create(base, org, body)

    def h_post_user_repos(self, base: str, body: dict[str, Any]) -> Response:
        return self._create(base, self.user, body)

    def _create(self, base: str, owner: str, body: dict[str, Any]) -> Response:
        name = body.get("name")
        if not isinstance(name, str) or not name:
            return error_response(
                422,
                "Validation Failed",
                [{"resource": "Repository", "code": "missing_field", "field": "name"}],
            )
        if not _NAME.fullmatch(name) or name in (".", ".."):
            return error_response(
                422,
                "Validation Failed",
                [
                    {
                        "resource": "Repository",
                        "code": "custom",
                        "field": "name",
                        "message": "name is invalid",
                    }
                ],
            )
        meta, _reason = self.create_repo(owner, body)
        if meta is None:
            return error_response(
                422,
                "Validation Failed",
                [
                    {
                        "resource": "Repository",
                        "code": "custom",
                        "field": "name",
                        "message": "name already exists on this account",
                    }
                ],
            )
        response = json_response(201, self.repo_json(base, meta))
        response.headers["Location"] = f"{base}/repos/{owner}/{name}"
        return response

    def h_get_rate_limit(self, _base: str, _body: dict[str, Any]) -> Response:
        with self.lock:
            rate = self._rate_dict()
        return json_response(200, {"resources": {"core": rate}, "rate": rate})

    def _repo(self, owner: str, repo: str) -> tuple[dict[str, Any], Path] | None:
        """The repository as the token sees it: None when missing or hidden from it."""
        meta = self._load_meta(owner, repo)
        if meta is None or not self._visible(meta):
            return None
        path = self._find_path(owner, repo)
        return (meta, path) if path is not None else None

    def h_get_repo(self, base: str, _body: dict[str, Any], owner: str, repo: str) -> Response:
        found = self._repo(owner, repo)
        if found is None:
            return error_response(404, "Not Found")
        return json_response(200, self.repo_json(base, found[0]))

    def h_get_branch(
        self, base: str, _body: dict[str, Any], owner: str, repo: str, branch: str
    ) -> Response:
        found = self._repo(owner, repo)
        if found is None:
            return error_response(404, "Not Found")
        meta, path = found
        sha = self.ref_sha(path, f"refs/heads/{branch}")
        if sha is None:
            return error_response(404, "Branch not found")
        url = f"{base}/repos/{meta['owner']}/{meta['name']}"
        return json_response(
            200,
            {
                "name": branch,
                "commit": {
                    "sha": sha,
                    "node_id": base64.b64encode(f"C_{sha}".encode()).decode(),
                    "url": f"{url}/commits/{sha}",
                },
                "_links": {
                    "self": f"{url}/branches/{branch}",
                    "html": f"{self._git_base(base)}/{meta['owner']}/{meta['name']}/tree/{branch}",
                },
                "protected": False,
                "protection": {
                    "enabled": False,
                    "required_status_checks": {
                        "enforcement_level": "off",
                        "contexts": [],
                        "checks": [],
                    },
                },
                "protection_url": f"{url}/branches/{branch}/protection",
            },
        )

    def _is_empty(self, path: Path) -> bool:
        try:
            out = _git(["for-each-ref", "--count=1", "refs/heads"], path)
        except GitError:
            return True
        return not out.strip()

    def _refs(self, path: Path, pattern: str) -> dict[str, str]:
        """Refs matching ``pattern`` (exactly, or as a ``/``-prefix) -> their object ids."""
        try:
            out = _git(["for-each-ref", "--format=%(refname) %(objectname)", pattern], path)
        except GitError:
            return {}
        return dict(line.split(" ", 1) for line in out.decode().splitlines() if line)

    def h_get_ref(
        self, base: str, _body: dict[str, Any], owner: str, repo: str, ref: str
    ) -> Response:
        """``GET /git/ref/{ref}``: exactly one ref, or 404."""
        found = self._repo(owner, repo)
        if found is None:
            return error_response(404, "Not Found")
        meta, path = found
        if self._is_empty(path):
            return error_response(409, "Git Repository is empty.")
        full = f"refs/{ref}"
        sha = self._refs(path, full).get(full)
        if sha is None:
            return error_response(404, "Not Found")
        return json_response(200, self.ref_json(base, meta, full, sha))

    def h_get_refs(
        self, base: str, _body: dict[str, Any], owner: str, repo: str, ref: str
    ) -> Response:
        """``GET /git/refs/{ref}``: the exact ref as an object, else a list of refs under it."""
        found = self._repo(owner, repo)
        if found is None:
            return error_response(404, "Not Found")
        meta, path = found
        if self._is_empty(path):
            return error_response(409, "Git Repository is empty.")
        full = f"refs/{ref}"
        refs = self._refs(path, full)
        if full in refs:
            return json_response(200, self.ref_json(base, meta, full, refs[full]))
        if not refs:
            return error_response(404, "Not Found")
        return json_response(
            200, [self.ref_json(base, meta, r, s) for r, s in sorted(refs.items())]
        )

    def h_post_refs(self, base: str, body: dict[str, Any], owner: str, repo: str) -> Response:
        found = self._repo(owner, repo)
        if found is None:
            return error_response(404, "Not Found")
        meta, path = found
        ref, sha = body.get("ref"), body.get("sha")
        if not isinstance(ref, str) or not isinstance(sha, str):
            return error_response(
                422,
                'Invalid request.\n\n"ref", "sha" weren\'t supplied.',
            )
        if not ref.startswith("refs/") or ref.count("/") < 2:
            return error_response(
                422, "Reference name must start with 'refs/' and have at least two slashes."
            )
        try:
            _git(["check-ref-format", ref])
        except GitError:
            return error_response(422, f"{ref} is not a valid ref name.")
        if not re.fullmatch(r"[0-9a-f]{40}", sha):
            return error_response(422, "Object does not exist")
        problem = self.create_ref(meta, path, ref, sha)
        if problem:
            return error_response(422, problem)
        response = json_response(201, self.ref_json(base, meta, ref, sha))
        response.headers["Location"] = f"{base}/repos/{meta['owner']}/{meta['name']}/git/{ref}"
        return response

    # -- git smart HTTP ------------------------------------------------------------

    _GIT_PATH = re.compile(r"^/(?P<owner>[^/]+)/(?P<repo>[^/]+)\.git(?P<rest>/.*)$")

    def git(self, method: str, path: str, environ: dict[str, Any], body: bytes) -> Response:
        route = self._git_route(method, path)
        match = self._GIT_PATH.match(path)
        if match is None:
            response = Response(404, b"Not Found\n", {"Content-Type": "text/plain"})
            response.route = route
            return response
        if self._authenticated(environ) is not True:
            with self.lock:
                self.auth_failures += 1
            response = Response(
                401,
                b"Invalid username or token. Password authentication is not supported.\n",
                {"Content-Type": "text/plain", "WWW-Authenticate": 'Basic realm="GitHub"'},
            )
            response.route = route
            return response
        repo_path = self._find_path(match["owner"], match["repo"])
        meta = None if repo_path is None else self._load_meta(match["owner"], match["repo"])
        if repo_path is None or meta is None or not self._visible(meta):
            response = Response(404, b"Repository not found.\n", {"Content-Type": "text/plain"})
            response.route = route
            return response
        rel = f"/{repo_path.parent.name}/{repo_path.name}{match['rest']}"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "PATH_INFO": rel,
            "REQUEST_METHOD": method,
            "QUERY_STRING": environ.get("QUERY_STRING", ""),
            "CONTENT_TYPE": environ.get("CONTENT_TYPE", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": "x-access-token",
            "REMOTE_ADDR": environ.get("REMOTE_ADDR", "127.0.0.1"),
            "SERVER_PROTOCOL": environ.get("SERVER_PROTOCOL", "HTTP/1.1"),
            "GATEWAY_INTERFACE": "CGI/1.1",
        }
        for key in ("HTTP_CONTENT_ENCODING", "HTTP_GIT_PROTOCOL", "HTTP_ACCEPT"):
            if environ.get(key):
                env[key] = environ[key]
        if environ.get("HTTP_GIT_PROTOCOL"):
            env["GIT_PROTOCOL"] = environ["HTTP_GIT_PROTOCOL"]
        proc = subprocess.run(
            ["git", "http-backend"], input=body, env=env, capture_output=True, check=False
        )
        response = _parse_cgi(proc.stdout)
        if proc.returncode != 0 and response.status == 200 and not response.body:
            response = Response(500, proc.stderr, {"Content-Type": "text/plain"})
        response.route = route
        return response


def _parse_cgi(output: bytes) -> Response:
    for sep in (b"\r\n\r\n", b"\n\n"):
        head, found, body = output.partition(sep)
        if found:
            break
    else:
        return Response(502, b"bad CGI output\n", {"Content-Type": "text/plain"})
    status = 200
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").splitlines():
        if not line.strip():
            continue
        key, _, value = line.partition(":")
        if key.lower() == "status":
            status = int(value.strip().split()[0])
        else:
            headers[key.strip()] = value.strip()
    return Response(status, body, headers)


def _read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    if environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
        chunks = []
        while True:
            size_line = stream.readline()
            if not size_line:
                break
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                while stream.readline().strip():  # trailers
                    pass
                break
            chunks.append(stream.read(size))
            stream.readline()  # CRLF after each chunk
        return b"".join(chunks)
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    return stream.read(length) if length > 0 else b""


def _parse_json(body: bytes) -> Any:
    if not body:
        return {}
    try:
        return json.loads(body)
    except ValueError:
        return None


def _read_json(environ: dict[str, Any]) -> dict[str, Any] | None:
    parsed = _parse_json(_read_body(environ))
    return parsed if isinstance(parsed, dict) else None


# ------------------------------------------------------------------------------ server


class ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        if os.environ.get("FAKE_GITHUB_VERBOSE"):
            super().log_message(format, *args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A local GitHub-compatible test server.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--root", type=Path, required=True, help="bare repositories live here")
    parser.add_argument("--token", default=os.environ.get("FAKE_GITHUB_TOKEN"))
    parser.add_argument("--user", default="lifecycle-bot", help="login of the token's user")
    parser.add_argument("--default-branch", default="main")
    parser.add_argument("--orgs", default=None, help="comma-separated orgs (default: any login)")
    parser.add_argument("--ready-file", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.token:
        parser.error("--token (or FAKE_GITHUB_TOKEN) is required")

    app = FakeGitHub(
        args.root,
        args.token,
        user=args.user,
        default_branch=args.default_branch,
        orgs=None if args.orgs is None else [o for o in args.orgs.split(",") if o],
    )
    server = make_server(
        args.host, args.port, app, server_class=ThreadingWSGIServer, handler_class=QuietHandler
    )
    port = server.server_address[1]

    def _stop(_signum: int, _frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    if args.ready_file is not None:
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "pid": os.getpid()}))
        tmp.replace(args.ready_file)
    print(
        f"fake GitHub listening on http://{args.host}:{port}{API_PREFIX}",
        file=sys.stderr,
        flush=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever(poll_interval=0.2)
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
