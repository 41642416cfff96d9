"""create: ``POST /api/sessions`` against one raw transaction and one Redis push.

System: the real API process (``lifecycle api --workers N``, uvicorn), driven by wrk (a
load generator written in C, so the client costs the two cores almost nothing; ``make
bench`` installs it) at concurrency 1, 8 and 32: ``c`` keep-alive connections, each
sending its next request when the last is answered, for ``n / 500`` seconds (at least
one). Requests carry a title and go round-robin over 8 API keys (8 accounts); any answer
but 200 fails the run. Without wrk, the closed-loop Python load generator below drives
the system too (``extra.client`` says which).

Baseline: the same load generator shape calling, per request, one psycopg transaction
that inserts the same session, chat and outbox rows (one connection per client thread),
then one Redis ``LPUSH`` of a message of the same size as the Celery message.

Throughput = requests / wall time of the round; latencies are per request, as the
client sees them. Rounds alternate system and baseline.
"""

from __future__ import annotations

import http.client
import itertools
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import Context, Result, Spread, api_process, check, compare, percentile

CALLERS = 8

_SESSION_SQL = """
INSERT INTO sessions (id, user_id, organization_id, artist_id, title, title_generated, status,
    is_new_branch, global_skill_refs, lifecycle_state, lifecycle_version, repo_owner,
    repo_name, branch, clone_url, sandbox_state, lines_added, lines_removed, created_at,
    updated_at)
VALUES (%s, %s, NULL, NULL, %s, false, 'running', true, '[]'::jsonb, 'provisioning', 0, %s,
    %s, %s, %s, %s, 0, 0, %s, %s)
"""
_CHAT_SQL = """
INSERT INTO chats (id, session_id, title, model_id, created_at, updated_at)
VALUES (%s, %s, 'New chat', %s, %s, %s)
"""
_OUTBOX_SQL = """
INSERT INTO outbox (task_name, payload, queue, created_at, claimed_until, attempts)
VALUES ('lifecycle.provision', %s, 'lifecycle', %s, %s, 0)
"""


class Load:
    """One closed-loop round: ``n`` operations by ``concurrency`` threads."""

    def __init__(self, n: int, concurrency: int) -> None:
        self.n = n
        self.concurrency = concurrency
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._next = itertools.count()
        self._lock = threading.Lock()

    def run(self, make_worker: Callable[[], Callable[[int], None]]) -> float:
        """Each thread gets its own operation (and connection) from ``make_worker``;
        returns the wall time from the common start to the last completion."""
        workers = [make_worker() for _ in range(self.concurrency)]
        start = threading.Barrier(self.concurrency + 1)

        def loop(op: Callable[[int], None]) -> None:
            mine: list[float] = []
            start.wait()
            while True:
                with self._lock:
                    i = next(self._next)
                if i >= self.n:
                    break
                t = time.perf_counter()
                try:
                    op(i)
                except Exception as exc:
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                mine.append(time.perf_counter() - t)
            with self._lock:
                self.latencies.extend(mine)

        threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
        for t in threads:
            t.start()
        start.wait()
        began = time.perf_counter()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - began
        if self.errors:
            raise RuntimeError(f"{len(self.errors)} operations failed, e.g. {self.errors[0]}")
        return elapsed


def _callers() -> list[tuple[uuid.UUID, str]]:
    from worker.db.engine import get_sessionmaker
    from worker.services import accounts

    made = []
    with get_sessionmaker().begin() as db:
        for k in range(CALLERS):
            account = accounts.create_account(db, f"bench-{k}")
            made.append((account.id, accounts.create_key(db, account.id).key))
    return made


def _system_worker(host: str, port: int, keys: list[str]) -> Callable[[], Callable[[int], None]]:
    def make() -> Callable[[int], None]:
        conn = http.client.HTTPConnection(host, port, timeout=60)

        def op(i: int) -> None:
            body = json.dumps({"title": f"bench session {i}"})
            conn.request(
                "POST",
                "/api/sessions",
                body=body,
                headers={"x-api-key": keys[i % len(keys)], "content-type": "application/json"},
            )
            resp = conn.getresponse()
            data = resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {data[:200]!r}")

        return op

    return make


_WRK_SCRIPT = """
local keys = {%s}
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/api/sessions",
    {["x-api-key"] = keys[n %% #keys + 1], ["content-type"] = "application/json"},
    '{"title": "bench session ' .. n .. '"}')
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK %%d %%d %%d %%d %%d %%d\\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


class Wrk:
    """One wrk round against the API: throughput and the p50/p99 latency it measured."""

    def __init__(self, host: str, port: int, keys: list[str], work: Path) -> None:
        self.url = f"http://{host}:{port}"
        self.script = work / "create.lua"
        self.script.write_text(_WRK_SCRIPT % ", ".join(f'"{k}"' for k in keys))

    @staticmethod
    def available() -> bool:
        return shutil.which("wrk") is not None

    def run(self, concurrency: int, seconds: float) -> tuple[float, float, float, int]:
        """(requests/s, p50 s, p99 s, requests) of a run of ``seconds``."""
        threads = min(2, concurrency)
        argv = [
            "wrk",
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "30s",
        ]
        out = subprocess.run(
            [*argv, "-s", str(self.script), self.url],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        ).stdout
        line = next((x for x in out.splitlines() if x.startswith("WRK ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary: {out[-500:]}")
        requests, micros, failed, bad_status, p50, p99 = (int(v) for v in line.split()[1:])
        if failed or bad_status:
            raise RuntimeError(f"wrk: {failed} failed requests, {bad_status} answers not 2xx")
        return requests / (micros / 1e6), p50 / 1e6, p99 / 1e6, requests


def _raw_worker(
    conninfo: str, broker_url: str, accounts: list[uuid.UUID]
) -> Callable[[], Callable[[int], None]]:
    import psycopg
    import redis
    from psycopg.types.json import Jsonb

    from worker.config import get_settings

    settings = get_settings()
    client = redis.Redis.from_url(broker_url)
    message = json.dumps(
        {
            "body": "x" * 700,  # a Celery message body is ~0.7 kB of base64 JSON
            "headers": {"task": "lifecycle.provision", "id": str(uuid.uuid4())},
            "properties": {"delivery_tag": str(uuid.uuid4())},
        }
    )

    def make() -> Callable[[int], None]:
        conn = psycopg.connect(conninfo)

        def op(i: int) -> None:
            account = accounts[i % len(accounts)]
            sid, now = uuid.uuid4(), datetime.now(UTC)
            with conn.transaction():
                conn.execute(
                    _SESSION_SQL,
                    (
                        sid,
                        account,
                        f"bench session {i}",
                        settings.workspace_owner,
                        str(account),
                        f"session/{sid}",
                        f"file:///bench/{account}.git",
                        Jsonb({"type": "local"}),
                        now,
                        now,
                    ),
                )
                conn.execute(_CHAT_SQL, (uuid.uuid4(), sid, settings.default_model_id, now, now))
                payload = {
                    "kwargs": {"session_id": str(sid), "run_id": str(uuid.uuid4()), "version": 0},
                    "task_id": str(uuid.uuid4()),
                }
                conn.execute(_OUTBOX_SQL, (Jsonb(payload), now, now + timedelta(seconds=30)))
            client.lpush("bench.raw.create", message)

        return op

    return make


def run(ctx: Context) -> list[Result]:
    servers = ctx.servers
    sizes = ctx.sizes
    callers = _callers()
    keys = [key for _, key in callers]
    accounts = [account for account, _ in callers]
    raw = _raw_worker(servers.conninfo(), servers.broker_url, accounts)
    results: list[Result] = []
    with api_process(servers, ctx.work, sizes.api_workers) as (host, port, api):
        system = _system_worker(host, port, keys)
        wrk = Wrk(host, port, keys, ctx.work) if Wrk.available() else None
        client = "wrk" if wrk is not None else "python"
        # Warm-up: connection pools, imports on first use, prepared statements.
        Load(60, 4).run(system)
        Load(60, 4).run(raw)
        for concurrency, n in sizes.create_requests.items():
            tput: dict[str, list[float]] = {"sys": [], "raw": []}
            p50: dict[str, list[float]] = {"sys": [], "raw": []}
            p99: dict[str, list[float]] = {"sys": [], "raw": []}
            api_cpu: list[float] = []  # ms of API CPU per request
            for r in range(sizes.rounds):
                for side in ("sys", "raw") if r % 2 == 0 else ("raw", "sys"):
                    cpu = api.cpu_seconds()
                    if side == "sys" and wrk is not None:
                        rate, lat50, lat99, done = wrk.run(concurrency, n / 500)
                    else:
                        load = Load(n, concurrency)
                        elapsed = load.run(system if side == "sys" else raw)
                        rate, done = n / elapsed, n
                        lat50 = percentile(load.latencies, 50)
                        lat99 = percentile(load.latencies, 99)
                    if side == "sys":
                        api_cpu.append((api.cpu_seconds() - cpu) / done * 1000)
                    tput[side].append(rate)
                    p50[side].append(lat50 * 1000)
                    p99[side].append(lat99 * 1000)
            ctx.log(
                f"create: c={concurrency}: {Spread.of(tput['sys']).median:,.0f} vs "
                f"{Spread.of(tput['raw']).median:,.0f} req/s"
            )
            gated = concurrency >= 8
            size = f"c={concurrency}, {n:,} requests/round, {sizes.api_workers} API workers"
            results.append(
                _maybe(
                    compare(
                        "create",
                        f"throughput c={concurrency}",
                        "req/s",
                        tput["sys"],
                        tput["raw"],
                        ">= 0.5",
                        size,
                        extra={
                            "api_cpu_ms_per_request": round(Spread.of(api_cpu).median, 2),
                            "client": client,
                        },
                    ),
                    gated,
                )
            )
            results.append(
                _maybe(
                    compare(
                        "create",
                        f"p50 latency c={concurrency}",
                        "ms",
                        p50["sys"],
                        p50["raw"],
                        "<= 2.0",
                        size,
                    ),
                    False,
                )
            )
            results.append(
                _maybe(
                    compare(
                        "create",
                        f"p99 latency c={concurrency}",
                        "ms",
                        p99["sys"],
                        p99["raw"],
                        "<= 2.0",
                        size,
                    ),
                    gated,
                )
            )
    return results


def _maybe(result: Result, gated: bool) -> Result:
    """Rows the issue sets no target for are reported with ``target`` "none", ``met`` None."""
    if not gated:
        result.target = "none"
        result.met = None
    else:
        result.met = check(result.ratio, result.target)
    return result
