"""How a stage runs the independent runs of a family: one after another, or in parallel local processes.

``serial`` runs them in the stage's process. ``local`` runs them in ``workers`` processes of this
machine (spawned: a forked copy of a process that has imported torch is not safe), each with
``cores // workers`` torch threads: on 2 cores two small-model runs side by side, one thread each,
train 1.4× faster than one after another with two threads (docs/benchmarks.md). Each run writes
its own folder atomically, so results are identical to serial runs for the same seeds.

A failed run fails the stage with one line naming the run and its error, after the other runs
have finished (their outputs are kept).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from dpcam.errors import UserError

EXECUTORS = ("serial", "local")


def _worker_init(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_jobs(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    names: Sequence[str],
    *,
    executor: str = "serial",
    workers: int = 2,
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, serially or in ``workers`` local processes (``fn``: a module-level function)."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if executor == "serial" or len(jobs) <= 1 or workers <= 1:
        return [fn(*job) for job in jobs]
    workers = min(workers, len(jobs))
    threads = max(1, (os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    results: list[Any] = []
    errors: list[str] = []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *job) for job in jobs]
        for name, future in zip(names, futures):
            try:
                results.append(future.result())
            except UserError as e:
                errors.append(f"run {name}: {e}")
            except Exception as e:
                errors.append(
                    f"run {name}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                )
    if errors:
        more = f" ({len(errors) - 1} more failed)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}; rerun the stage (`dvc repro`)")
    return results
