"""The dispatch benchmark runs end to end at its smallest size: every create's
provision task reaches the real worker (a receipt is found for each, or the run fails),
and it reports p50 and p99 rows at c=1 and c=8 with no target. Figures are not asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_dispatch_tiny(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIFECYCLE_")}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--only", "dispatch", "--output", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
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
