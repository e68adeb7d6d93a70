"""Benchmark: synthetic-fundus generation speed (images/s) at 64 px and 224 px.

Goal (issue 2): 5000 images at 64 px in under 30 s on 2 cores. Runs each case with one process
and with all cores (``workers=0``), prints a markdown table, and exits non-zero when the goal is
missed. ``python benchmarks/bench_synthetic.py [--n64 5000] [--n224 500] [--repeat 1]``
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

from dpcam.data.synthetic import generate

GOAL_N, GOAL_S = 5000, 30.0


def _time(n: int, size: int, workers: int, repeat: int) -> float:
    """Best wall time of ``repeat`` runs of ``generate(n, size, workers=workers)``."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        generate(n, size, seed=0, balance="uniform", workers=workers)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n64", type=int, default=GOAL_N, help="images at 64 px")
    ap.add_argument("--n224", type=int, default=500, help="images at 224 px")
    ap.add_argument("--repeat", type=int, default=1, help="runs per case (best is reported)")
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    generate(64, 64, workers=1)  # warm-up: imports, page faults
    rows = []
    goal_time = None
    for size, n in ((64, args.n64), (224, args.n224)):
        for workers in (1, 0):
            dt = _time(n, size, workers, args.repeat)
            procs = 1 if workers == 1 else cores
            rows.append((size, n, procs, dt, n / dt))
            if size == 64 and workers == 0:
                goal_time = dt * GOAL_N / n
    print(
        f"\nsynthetic-fundus generation ({platform.processor() or platform.machine()}, {cores} cores usable, "
        f"python {platform.python_version()})\n"
    )
    print("| size | images | processes | seconds | images/s |")
    print("|---:|---:|---:|---:|---:|")
    for size, n, procs, dt, rate in rows:
        print(f"| {size} px | {n} | {procs} | {dt:.2f} | {rate:.0f} |")
    ok = goal_time is not None and goal_time < GOAL_S
    print(
        f"\ngoal: {GOAL_N} images at 64 px in < {GOAL_S:.0f} s on all {cores} cores: "
        f"{goal_time:.1f} s -> {'met' if ok else 'MISSED'}"
    )
    if cores != 2:
        print(
            f"(note: the goal is stated for 2 cores; this machine lets the process use {cores}; "
            "pin with `taskset -c 0,1` to measure it)",
            file=sys.stderr,
        )
    return 0 if ok else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
