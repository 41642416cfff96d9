"""GitHub as the repo host, through PyGithub. The only module that imports ``github``.

What it does, per :class:`~worker.providers.base.RepoHost`:

* ``ensure_repo`` reads ``GET /repos/{owner}/{name}`` (conditionally, see below); when it
  is missing, creates it in the organization ``owner`` as a private repository with
  ``auto_init`` (so the default branch exists). When ``owner`` is not an organization but
  the token's own user, the repository is created under that user instead. A ``422
  ... already exists`` from a concurrent creator counts as success: the repository is
  read again and returned with ``created=False``. If that read still answers 404, the
  repository exists but the token cannot read it: a permanent error that names
  ``owner/name`` and asks to check the token's access to it (never retried).
* ``ensure_branch`` reads the head of the default branch (``GET git/ref/heads/<default>``)
  and creates ``refs/heads/<branch>`` there (``POST git/refs``); ``422 Reference already
  exists`` counts as success (``created=False``, the existing branch's sha).
* ``clone_source`` gives ``git`` the token through the environment only
  (``GIT_CONFIG_COUNT``/``GIT_CONFIG_KEY_0``/``GIT_CONFIG_VALUE_0`` setting an
  ``http.<git base URL>/.extraHeader`` with Basic ``x-access-token:<token>``), scoped to
  this host's git URL: the token is never in the URL, in ``cloneUrl`` or in the clone's
  ``.git/config``.

**Clone URLs.** ``clone_url`` is ``<git base>/<owner>/<name>.git``. The git base is
``LIFECYCLE_GITHUB_GIT_URL`` when set, else derived from the API URL by this rule:

1. host ``api.github.com`` becomes ``github.com``;
   any other host starting with ``api.`` loses that label
   (``api.acme.ghe.com`` -> ``acme.ghe.com``, GitHub Enterprise Cloud);
2. a path ending in ``/api/v3`` loses it (GitHub Enterprise Server:
   ``https://ghe.example.com/api/v3`` -> ``https://ghe.example.com``);
3. scheme, port and any remaining path are kept; credentials, query and fragment dropped.

**Errors.** Every failure becomes a :class:`TransientProviderError` or a
:class:`PermanentProviderError` whose message names the cause and never the token:

* primary rate limit (403/429 with ``x-ratelimit-remaining: 0`` and
  ``x-ratelimit-reset``) -> transient, ``retry_after`` = reset - now (at least 1 s);
* secondary rate limit (403/429 with ``Retry-After``) -> transient, ``retry_after`` =
  that value; a 429 or a rate-limit message without either header -> 60 s;
* 5xx, 408, connection failures and timeouts -> transient;
* 401, 403 (no rate-limit signal), 404, 422 and other 4xx -> permanent.

PyGithub's own retries and request pacing are switched off (``retry=None``, no
``seconds_between_*``): they would sleep inside the call and hide rate limits from the
task's retry policy, which is the one place that decides when to try again.

**Conditional requests.** Repository reads go through a small per-process cache of the
repository JSON and its ``ETag``; a repeated read sends ``If-None-Match`` and a ``304``
(which GitHub does not count against the rate limit) reuses the cached JSON.

**Threads.** PyGithub's connection objects are not safe to share between threads, so
every thread gets its own client; the ETag cache is shared and locked.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import requests
from github import Auth, Github, GithubException
from github.Repository import Repository

from worker.config import Settings
from worker.logging import REDACTED, get_logger, redact_text
from worker.providers.base import (
    BranchInfo,
    PermanentProviderError,
    ProviderError,
    RepoInfo,
    TransientProviderError,
)
from worker.providers.local_git import (
    strip_url_credentials,
    validate_branch_name,
    validate_safe_name,
)

__all__ = ["DEFAULT_API_URL", "GitHubRepoHost", "derive_git_base_url"]

DEFAULT_API_URL = "https://api.github.com"
DEFAULT_TIMEOUT_SECONDS = 15
DEFAULT_SECONDARY_WAIT_SECONDS = 60.0
EMPTY_REPO_RETRY_SECONDS = 2.0
USER_AGENT = "session-lifecycle-worker"
_CACHE_MAX_ENTRIES = 1024

log = get_logger(__name__)

_TRANSIENT_NETWORK_ERRORS: tuple[type[BaseException], ...] = (
    requests.exceptions.Timeout,
    requests.exceptions.ConnectionError,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


# ------------------------------------------------------------------------- clone URLs


def derive_git_base_url(api_url: str) -> str:
    """The web/git root of a GitHub API URL (the rule in the module docstring)."""
    parts = urlsplit(api_url.strip())
    scheme = (parts.scheme or "https").lower()
    host = (parts.hostname or "").lower()
    if not host:
        raise PermanentProviderError(
            f"GitHub API URL {strip_url_credentials(api_url)!r} has no host"
        )
    if host == "api.github.com":
        host = "github.com"
    elif host.startswith("api.") and host.count(".") >= 2:
        host = host[len("api.") :]
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    path = parts.path.rstrip("/")
    if path.endswith("/api/v3"):
        path = path[: -len("/api/v3")]
    return urlunsplit((scheme, netloc, path, "", ""))


# ----------------------------------------------------------------------- ETag cache


class _RepoCache:
    """``key -> (etag, repo JSON)``, least recently used first out; thread-safe."""

    def __init__(self, max_entries: int = _CACHE_MAX_ENTRIES) -> None:
        self._max = max_entries
        self._data: OrderedDict[tuple[str, ...], tuple[str, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
        with self._lock:
            entry = self._data.get(key)
            if entry is not None:
                self._data.move_to_end(key)
            return entry

    def put(self, key: tuple[str, ...], etag: str, data: dict[str, Any]) -> None:
        with self._lock:
            self._data[key] = (etag, data)
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def drop(self, key: tuple[str, ...]) -> None:
        with self._lock:
            self._data.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()


_REPO_CACHE = _RepoCache()


# ---------------------------------------------------------------------- error helpers


def _lower_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in (headers or {}).items()}


def _api_message(data: Any) -> str:
    """GitHub's ``message`` plus the ``errors[].message`` details, one line, bounded."""
    if not isinstance(data, Mapping):
        return ""
    message = str(data.get("message") or "").strip()
    details = []
    errors = data.get("errors")
    if isinstance(errors, list):
        for item in errors:
            if isinstance(item, Mapping):
                text = item.get("message") or " ".join(
                    str(item[k]) for k in ("resource", "field", "code") if item.get(k)
                )
                if text:
                    details.append(str(text))
            elif isinstance(item, str):
                details.append(item)
    if details:
        message = f"{message}: {'; '.join(details)}" if message else "; ".join(details)
    return " ".join(message.split())[:300]


def _already_exists(exc: GithubException) -> bool:
    return exc.status == 422 and "already exists" in _api_message(exc.data).lower()


def _retry_after_seconds(value: str | None) -> float | None:
    """``Retry-After`` as seconds (delta-seconds or an HTTP date)."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# ---------------------------------------------------------------------------- host


class GitHubRepoHost:
    """:class:`~worker.providers.base.RepoHost` on GitHub (or GitHub Enterprise)."""

    kind = "github"

    def __init__(
        self,
        token: str,
        *,
        api_url: str = DEFAULT_API_URL,
        git_url: str | None = None,
        default_branch: str = "main",
        timeout: int = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        if not token:
            raise PermanentProviderError(
                "GitHub repo host has no token: set LIFECYCLE_GITHUB_TOKEN"
            )
        self._token = token
        self._api_url = api_url.rstrip("/") or DEFAULT_API_URL
        self._git_base = (
            strip_url_credentials(git_url.strip()).rstrip("/")
            if git_url and git_url.strip()
            else derive_git_base_url(self._api_url)
        )
        self._default_branch = default_branch
        self._timeout = int(timeout)
        self._local = threading.local()
        fingerprint = hashlib.sha256(token.encode()).hexdigest()[:16]
        self._cache_scope = (self._api_url, fingerprint)

    @classmethod
    def from_settings(cls, settings: Settings) -> GitHubRepoHost:
        token = settings.github_token.get_secret_value() if settings.github_token else ""
        return cls(
            token,
            api_url=settings.github_api_url,
            git_url=settings.github_git_url,
            default_branch=settings.default_branch,
        )

    def __repr__(self) -> str:
        return f"GitHubRepoHost(api_url={self._api_url!r}, git_url={self._git_base!r})"

    @property
    def api_url(self) -> str:
        return self._api_url

    @property
    def git_base_url(self) -> str:
        return self._git_base

    # -- PyGithub client (one per thread) ----------------------------------------------

    def _client(self) -> Github:
        client: Github | None = getattr(self._local, "client", None)
        if client is None:
            client = Github(
                auth=Auth.Token(self._token),
                base_url=self._api_url,
                timeout=self._timeout,
                user_agent=USER_AGENT,
                retry=None,
                seconds_between_requests=None,
                seconds_between_writes=None,
                lazy=True,
            )
            self._local.client = client
        return client

    # -- RepoHost ------------------------------------------------------------------------

    def clone_url(self, owner: str, name: str) -> str:
        validate_safe_name(owner, "repository owner")
        validate_safe_name(name, "repository name")
        return f"{self._git_base}/{owner}/{name}.git"

    def ensure_repo(self, owner: str, name: str) -> RepoInfo:
        validate_safe_name(owner, "repository owner")
        validate_safe_name(name, "repository name")
        full = f"{owner}/{name}"
        data = self._read_repo(owner, name)
        if data is not None:
            return self._repo_info(owner, name, data, created=False)

        repo: Repository | None = None
        with self._translating(f"creating repository {full}"):
            try:
                repo = self._create_repo(owner, name)
            except GithubException as exc:
                if not _already_exists(exc):
                    raise
        if repo is not None:
            log.info("github.repo_created", repo=full, private=repo.private)
            data = {"default_branch": repo.default_branch, "private": repo.private}
            return self._repo_info(owner, name, data, created=True)

        # A concurrent creator won the race: theirs is ours.
        data = self._read_repo(owner, name)
        if data is None:
            # Still 404 after "already exists": the repository is there but this token
            # cannot read it. Retrying cannot fix that; the operator has to.
            raise PermanentProviderError(
                self._scrub(
                    f"repository {full} already exists on GitHub but the token cannot read "
                    f"it (GET /repos/{full} answers 404 Not Found, creating it 422 name "
                    f"already exists): check the token's access to {full} "
                    "(LIFECYCLE_GITHUB_TOKEN: its repository access or scopes, or the "
                    "GitHub App installation)"
                )
            )
        return self._repo_info(owner, name, data, created=False)

    def ensure_branch(self, repo: RepoInfo, branch: str) -> BranchInfo:
        validate_branch_name(branch)
        full = f"{repo.owner}/{repo.name}"
        default = repo.default_branch or self._default_branch
        gh_repo = self._client().get_repo(full)  # lazy: no request

        with self._translating(f"reading the head of {default!r} in {full}"):
            try:
                base_sha = gh_repo.get_git_ref(f"heads/{default}").object.sha
            except GithubException as exc:
                if exc.status not in (404, 409):
                    raise
                # Right after an auto_init create GitHub may not show the commit yet;
                # a repository that really has no default branch fails after the retries.
                raise TransientProviderError(
                    self._scrub(
                        f"repository {full} has no commit on its default branch {default!r} "
                        f"yet (GitHub {exc.status} {_api_message(exc.data)})"
                    ),
                    retry_after=EMPTY_REPO_RETRY_SECONDS,
                ) from None

        with self._translating(f"creating branch {branch!r} in {full}"):
            try:
                ref = gh_repo.create_git_ref(f"refs/heads/{branch}", base_sha)
                return BranchInfo(name=branch, sha=ref.object.sha, created=True)
            except GithubException as exc:
                if not _already_exists(exc):
                    raise

        with self._translating(f"reading branch {branch!r} in {full}"):
            existing = gh_repo.get_git_ref(f"heads/{branch}").object.sha
        return BranchInfo(name=branch, sha=existing, created=False)

    def clone_source(self, repo_clone_url: str) -> tuple[str, dict[str, str]]:
        url = strip_url_credentials(repo_clone_url)
        env = {"GIT_TERMINAL_PROMPT": "0"}
        if not self._is_own_url(url):
            return url, env  # never hand the token to another host
        basic = base64.b64encode(f"x-access-token:{self._token}".encode()).decode()
        env.update(
            {
                "GIT_CONFIG_COUNT": "1",
                "GIT_CONFIG_KEY_0": f"http.{self._git_base}/.extraHeader",
                "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}",
            }
        )
        return url, env

    # -- internals ---------------------------------------------------------------------

    def _is_own_url(self, url: str) -> bool:
        mine, theirs = urlsplit(self._git_base), urlsplit(url)
        if (mine.scheme.lower(), mine.netloc.lower()) != (
            theirs.scheme.lower(),
            theirs.netloc.lower(),
        ):
            return False
        prefix = mine.path.rstrip("/") + "/"
        return theirs.path.startswith(prefix)

    def _repo_info(
        self, owner: str, name: str, data: Mapping[str, Any], *, created: bool
    ) -> RepoInfo:
        default = data.get("default_branch")
        return RepoInfo(
            owner=owner,
            name=name,
            clone_url=self.clone_url(owner, name),
            default_branch=str(default) if default else self._default_branch,
            created=created,
        )

    def _create_repo(self, owner: str, name: str) -> Repository:
        """POST the repository into organization ``owner``, else into the token's user."""
        gh = self._client()
        try:
            return gh.get_organization(owner).create_repo(name, private=True, auto_init=True)
        except GithubException as exc:
            if exc.status != 404:
                raise
        user = gh.get_user()  # lazy; .login reads GET /user
        login = user.login
        if login.lower() != owner.lower():
            raise PermanentProviderError(
                self._scrub(
                    f"cannot create repository {owner}/{name}: GitHub has no organization "
                    f"{owner!r} this token may create repositories in (404 Not Found), and "
                    f"{owner!r} is not the token's user ({login!r})"
                )
            )
        return user.create_repo(name, private=True, auto_init=True)

    def _read_repo(self, owner: str, name: str) -> dict[str, Any] | None:
        """The repository's JSON, or None when GitHub says 404. Conditional on the ETag."""
        key = (*self._cache_scope, owner.lower(), name.lower())
        cached = _REPO_CACHE.get(key)
        headers = {"If-None-Match": cached[0]} if cached else {}
        what = f"reading repository {owner}/{name}"
        with self._translating(what):
            status, resp_headers, body = self._client().requester.requestJson(
                "GET", f"/repos/{quote(owner, safe='')}/{quote(name, safe='')}", headers=headers
            )
        if status == 304 and cached is not None:
            return cached[1]
        if status == 404:
            _REPO_CACHE.drop(key)
            return None
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if status >= 300 or not isinstance(data, dict):
            if status < 300:
                raise TransientProviderError(f"GitHub returned a malformed answer while {what}")
            raise self._status_error(status, resp_headers, data, what)
        etag = _lower_headers(resp_headers).get("etag")
        if etag:
            _REPO_CACHE.put(key, etag, data)
        return data

    @contextmanager
    def _translating(self, what: str) -> Iterator[None]:
        """Turn PyGithub and requests failures inside the block into provider errors."""
        try:
            yield
        except ProviderError:
            raise
        except GithubException as exc:
            raise self._status_error(exc.status, exc.headers, exc.data, what) from None
        except _TRANSIENT_NETWORK_ERRORS as exc:
            kind = (
                "did not answer in time"
                if isinstance(exc, requests.exceptions.Timeout)
                else "could not be reached"
            )
            raise TransientProviderError(
                self._scrub(f"GitHub {kind} while {what} ({type(exc).__name__}: {str(exc)[:200]})")
            ) from None
        except requests.exceptions.RequestException as exc:
            raise PermanentProviderError(
                self._scrub(
                    f"GitHub request failed while {what} ({type(exc).__name__}: {str(exc)[:200]}); "
                    "check LIFECYCLE_GITHUB_API_URL"
                )
            ) from None
        except RuntimeError as exc:  # PyGithub: redirected to another host or scheme
            raise PermanentProviderError(
                self._scrub(f"GitHub request failed while {what}: {str(exc)[:300]}")
            ) from None
        except ValueError as exc:  # malformed JSON
            raise TransientProviderError(
                self._scrub(f"GitHub returned a malformed answer while {what}: {str(exc)[:200]}")
            ) from None

    def _status_error(
        self, status: int, headers: Mapping[str, Any] | None, data: Any, what: str
    ) -> ProviderError:
        """The provider error for an HTTP error answer (see the module docstring)."""
        h = _lower_headers(headers)
        message = _api_message(data)
        detail = f"{status} {message}".strip()
        lowered = message.lower()

        if status in (403, 429):
            retry_after = _retry_after_seconds(h.get("retry-after"))
            if retry_after is not None:
                wait = max(1.0, float(math.ceil(retry_after)))
                log.warning("github.rate_limited", kind="secondary", retry_after=wait, what=what)
                return TransientProviderError(
                    self._scrub(
                        f"GitHub secondary rate limit while {what} ({detail}); "
                        f"retry after {wait:g}s"
                    ),
                    retry_after=wait,
                )
            reset = h.get("x-ratelimit-reset")
            if h.get("x-ratelimit-remaining", "").strip() in ("0", "0.0") and reset:
                try:
                    wait = max(1.0, float(math.ceil(float(reset) - time.time())))
                except ValueError:
                    wait = DEFAULT_SECONDARY_WAIT_SECONDS
                log.warning("github.rate_limited", kind="primary", retry_after=wait, what=what)
                return TransientProviderError(
                    self._scrub(
                        f"GitHub API rate limit exhausted while {what} ({detail}); "
                        f"it resets in {wait:g}s"
                    ),
                    retry_after=wait,
                )
            if status == 429 or "rate limit" in lowered:
                return TransientProviderError(
                    self._scrub(f"GitHub rate limit while {what} ({detail})"),
                    retry_after=DEFAULT_SECONDARY_WAIT_SECONDS,
                )

        if status == 401:
            text = (
                f"GitHub rejected the credentials ({detail}) while {what}; "
                "check LIFECYCLE_GITHUB_TOKEN"
            )
            return PermanentProviderError(self._scrub(text))
        if status == 403:
            text = (
                f"GitHub denied access ({detail}) while {what}; the token lacks the "
                "permission for this"
            )
            return PermanentProviderError(self._scrub(text))
        if status == 404:
            text = (
                f"GitHub found nothing ({detail}) while {what}: it does not exist or the "
                "token cannot see it"
            )
            return PermanentProviderError(self._scrub(text))
        if status == 422:
            return PermanentProviderError(
                self._scrub(f"GitHub refused the request ({detail}) while {what}")
            )
        if status >= 500 or status == 408:
            return TransientProviderError(
                self._scrub(f"GitHub server error ({detail}) while {what}")
            )
        return PermanentProviderError(self._scrub(f"GitHub answered {detail} while {what}"))

    def _scrub(self, text: str) -> str:
        """``text`` without the token (raw or in its Basic-auth form) or other secrets."""
        basic = base64.b64encode(f"x-access-token:{self._token}".encode()).decode()
        for secret in (self._token, basic):
            if secret:
                text = text.replace(secret, REDACTED)
        return redact_text(text)
