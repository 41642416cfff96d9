"""``python -m bench``: run the benchmarks, print the table, write ``bench/results.json``.

Every figure is the system measured side by side with a raw baseline in the same run,
on the same servers, as the median of several rounds (the spread is shown). Nothing here
asserts a wall-clock time: a missed target is reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import ROOT, SIZES, Context, Mode, Result

NAMES = (
    "create",
    "dispatch",
    "orchestrate",
    "sweep",
    "diff",
    "snapshot",
    "snapshot_s3",
    "memory",
    "commands",
    "time_to_active",
)
DEFAULT_OUTPUT = ROOT / "bench" / "results.json"


def _runner(name: str) -> Callable[[Context], list[Result]]:
    import importlib

    module = importlib.import_module(f"bench.{name}")
    fn: Callable[[Context], list[Result]] = module.run
    return fn


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "git": _version(["git", "--version"]),
        "zstd": _version(["zstd", "--version"]),
        "tar": _version(["tar", "--version"]),
    }


def _server_versions(ctx: Context) -> dict[str, str]:
    if ctx._servers is None:
        return {}
    import psycopg
    import redis

    with psycopg.connect(ctx.servers.conninfo()) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        pg = str(row[0]) if row else "?"
    client = redis.Redis.from_url(ctx.servers.broker_url)
    try:
        info: dict[str, Any] = client.info("server")
    finally:
        client.close()
    return {"postgresql": pg, "redis": str(info.get("redis_version", "?"))}


def _fmt(value: float, unit: str) -> str:
    if value != value:  # NaN
        return "-"
    if unit in ("req/s", "sessions/s"):
        return f"{value:,.0f} {unit}"
    if unit == "s":
        return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
    if unit == "ms":
        return f"{value:,.1f} ms"
    if unit == "MB":
        return f"{value:,.0f} MB"
    return f"{value:,.3g} {unit}"


def table(results: list[Result], mode: Mode) -> str:
    rows = [
        ("name", "metric", "size", "system", "baseline", "ratio (round range)", "target", "met")
    ]
    for r in results:
        rows.append(
            (
                r.name,
                r.metric,
                r.size,
                f"{_fmt(r.system, r.unit)} ±{r.system_spread.rel:.0%}",
                f"{_fmt(r.baseline, r.unit)} ±{r.baseline_spread.rel:.0%}",
                f"{r.ratio:.2f}x ({r.ratio_spread.min:.2f}-{r.ratio_spread.max:.2f})",
                (f"{r.target_on} " if r.target_on != "ratio" else "")
                + r.target.replace(">=", "≥").replace("<=", "≤"),
                "-" if r.met is None else "yes" if r.met else "NO",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    header = {
        "full": "full run (the issue's sizes)",
        "quick": "QUICK run: smaller sizes than the issue's (see the size column)",
        "tiny": "TINY run: smoke-test sizes, the figures mean little",
    }[mode]
    return f"{header}\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:  # noqa: C901 -- flag wiring, no logic
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller sizes (under 2 minutes)")
    size.add_argument("--tiny", action="store_true", help="smoke-test sizes (seconds)")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per figure (default by mode)")
    parser.add_argument("--api-workers", type=int, default=0, help="uvicorn workers (default 2)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="results file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)

    mode: Mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (choose from {', '.join(NAMES)})")
    sizes = SIZES[mode]
    if args.rounds:
        from dataclasses import replace

        n = args.rounds
        sizes = replace(sizes, rounds=n, orchestrate_rounds=n, snapshot_rounds=n)

    if args.api_workers:
        from dataclasses import replace

        sizes = replace(sizes, api_workers=args.api_workers)
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    work = Path(tempfile.mkdtemp(prefix="lifecycle-bench-"))
    ctx = Context(mode=mode, sizes=sizes, work=work, log=log)
    results: list[Result] = []
    errors: list[str] = []
    info = machine()
    log(
        f"mode {mode}; {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB; scratch {work}"
    )
    try:
        for name in names:
            log(f"{name}: start")
            t = time.monotonic()
            try:
                got = _runner(name)(ctx)
            except Exception as exc:
                traceback.print_exc()
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                log(f"{name}: FAILED ({exc})")
                continue
            finally:
                if ctx._servers is not None:
                    try:
                        ctx.servers.reset_tables()
                    except Exception as exc:  # the servers went away: the next one says so
                        log(f"could not reset the tables after {name}: {exc}")
            results.extend(got)
            log(f"{name}: done in {time.monotonic() - t:.1f}s")
            _write(args.output, results)
        try:
            info.update(_server_versions(ctx))
        except Exception as exc:
            log(f"could not read the server versions: {exc}")
    finally:
        ctx.close()
        if args.keep:
            log(f"scratch kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    _write(args.output, results)
    print()
    print(table(results, mode))
    print()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    print(f"wall time {time.monotonic() - started:.0f}s; results in {args.output}")
    for r in results:
        if r.note:
            print(f"note ({r.name}, {r.metric}): {r.note}")
        if r.extra:
            details = ", ".join(f"{k} {v}" for k, v in r.extra.items())
            print(f"detail ({r.name}, {r.metric}): {details}")
    if errors:
        print("\nbenchmarks that could not run:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


def _write(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps([r.to_json() for r in results], indent=2) + "\n")
    tmp.replace(path)


if __name__ == "__main__":
    sys.exit(main())
