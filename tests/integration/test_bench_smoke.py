"""The benchmark runner's lightest path runs and writes ``results.json`` of the right
shape. The figures themselves are never asserted (no wall-clock assertions)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
FIELDS = {"name", "metric", "system", "baseline", "ratio", "target", "met"}
SPREADS = ("system_spread", "baseline_spread", "ratio_spread")


def _run_bench(tmp_path: Path, only: str) -> tuple[str, list[dict[str, Any]]]:
    """``python -m bench --tiny --only <only>``: its table and its results.json. The
    broker may be configured (the bench takes database 14 of it); the rest is found."""
    out = tmp_path / "results.json"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LIFECYCLE_") or k == "LIFECYCLE_BROKER_URL"
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--only", only, "--output", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,  # only stops a broken run from hanging
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert isinstance(results, list)
    return proc.stdout, results


def test_bench_tiny_writes_results(tmp_path: Path) -> None:
    table, results = _run_bench(tmp_path, "diff,snapshot")
    assert "| diff" in table and "| snapshot" in table  # the table is printed
    assert [(r["name"], r["metric"]) for r in results] == [
        ("diff", "compute_diff time"),
        ("snapshot", "save time"),
        ("snapshot", "restore time"),
    ]
    for r in results:
        assert r.keys() >= FIELDS, r
        for key in ("system", "baseline", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, r
        assert math.isclose(r["ratio"], r["system"] / r["baseline"], rel_tol=1e-3)
        assert isinstance(r["target"], str) and r["target"].split(" ")[0] in {"<=", ">=", "<"}
        assert isinstance(r["met"], bool)
        for key in SPREADS:
            spread = r[key]
            assert spread["min"] <= spread["median"] <= spread["max"], r
            assert len(spread["values"]) == r["rounds"] >= 2


def test_bench_time_to_active_rows(tmp_path: Path) -> None:
    """The time-to-active benchmark runs the real API and worker with local providers
    and writes its three rows; the p50's target is absolute (on the figure itself)."""
    table, results = _run_bench(tmp_path, "time_to_active")
    assert "| time_to_active" in table and "system ≤ 100" in table
    assert [(r["name"], r["metric"], r["unit"]) for r in results] == [
        ("time_to_active", "create → active p50", "ms"),
        ("time_to_active", "create → active p99", "ms"),
        ("time_to_active", "resume (2 MB tree)", "s"),
    ]
    p50, p99, resume = results
    for r in results:
        assert r.keys() >= FIELDS, r
        for key in ("system", "baseline", "ratio"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, r
        for key in SPREADS:
            assert r[key]["min"] <= r[key]["median"] <= r[key]["max"], r
            assert len(r[key]["values"]) == r["rounds"] >= 2
    # create -> active p50: an absolute target on the system's figure, not the ratio.
    assert (p50["target"], p50["target_on"]) == ("<= 100", "system")
    assert p50["met"] is (p50["system"] <= 100)
    assert p99["system"] >= p50["system"]
    assert (p99["target"], p99["met"]) == ("none", None)
    assert (resume["target"], resume["target_on"]) == ("<= 1.3", "ratio")
    assert resume["met"] is (resume["ratio"] <= 1.3)


def test_bench_dispatch_rows(tmp_path: Path) -> None:
    """The dispatch benchmark: every create's provision task must reach the real worker
    (a receipt for each, or the run fails); four rows at c=1 and c=8, no target."""
    _, rows = _run_bench(tmp_path, "dispatch")
    assert [r["metric"] for r in rows] == [
        "p50 answer → worker c=1",
        "p99 answer → worker c=1",
        "p50 answer → worker c=8",
        "p99 answer → worker c=8",
    ]
    for r in rows:
        assert r["name"] == "dispatch" and r["target"] == "none" and r["met"] is None
        assert math.isfinite(r["system"]) and math.isfinite(r["baseline"])
        assert r["rounds"] >= 2 and len(r["system_spread"]["values"]) == r["rounds"]
