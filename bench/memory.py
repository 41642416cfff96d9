"""memory: the worker's peak resident memory while ``memory_sessions`` (the issue:
10,000) sessions go through provision → start → hibernate → resume, against the same
worker idle.

A fresh worker (``lifecycle worker -c N --pool prefork``, no-op providers) is started;
once it answers a ping its RSS (the sum over the main process and its pool processes,
via psutil) is sampled for a few seconds: the idle baseline. Then the sessions go
through in waves of ``memory_wave`` (the orchestrate driver), while a thread samples the
RSS every 0.2 s. The figure is the peak; the target is on the growth (peak - idle).
The spread columns show the per-wave peaks, so a steady climb (a leak) is visible.
"""

from __future__ import annotations

import statistics
import threading
import time

from bench.common import Context, Result, Spread, check, start_worker
from bench.orchestrate import Driver

MB = 2**20


def run(ctx: Context) -> list[Result]:
    servers = ctx.servers
    sizes = ctx.sizes
    worker = start_worker(servers, ctx.work, sizes.worker_concurrency, name="worker-memory")
    driver = Driver(servers, worker)
    peak = 0
    stop = threading.Event()
    lock = threading.Lock()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            rss = worker.rss_bytes()
            with lock:
                peak = max(peak, rss)
            stop.wait(0.2)

    try:
        idle_samples = []
        for _ in range(15):
            idle_samples.append(worker.rss_bytes())
            time.sleep(0.2)
        idle = statistics.median(idle_samples)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wave_peaks: list[float] = []
        done = 0
        while done < sizes.memory_sessions:
            n = min(sizes.memory_wave, sizes.memory_sessions - done)
            driver.system_round(n)
            done += n
            with lock:
                wave_peaks.append(peak / MB)
        stop.set()
        sampler.join()
        ctx.log(
            f"memory: idle {idle / MB:.0f} MB, peak {peak / MB:.0f} MB after {done:,} sessions "
            f"(wave peaks {', '.join(f'{p:.0f}' for p in wave_peaks)})"
        )
    finally:
        stop.set()
        driver.close()
        worker.stop()
    growth = (peak - idle) / MB
    result = Result(
        name="memory",
        metric="worker peak RSS (all processes)",
        unit="MB",
        system=peak / MB,
        baseline=idle / MB,
        ratio=peak / idle,
        target="< 100",
        met=check(growth, "< 100"),
        system_spread=Spread.of(wave_peaks),
        baseline_spread=Spread.of([s / MB for s in idle_samples]),
        ratio_spread=Spread.of([p / (idle / MB) for p in wave_peaks]),
        rounds=len(wave_peaks),
        size=f"{done:,} sessions ({4 * done:,} runs), worker -c {sizes.worker_concurrency}",
        target_on="growth MB",
        extra={"growth_mb": round(growth, 1), "wave_peaks_mb": [round(p, 1) for p in wave_peaks]},
        note=f"growth = peak - idle = {growth:.0f} MB (target < 100 MB); spread = per-wave peaks",
    )
    return [result]
