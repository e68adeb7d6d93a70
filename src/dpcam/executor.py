"""How a stage runs the independent runs of a family: one after another, in local processes, or on Ray.

``serial`` runs them in the stage's process. ``local`` runs them in ``workers`` processes of this
machine (spawned: a forked copy of a process that has imported torch is not safe), the default of
the 2-core demo (docs/benchmarks.md, "Executors"). ``ray`` makes each run a Ray task asking for
``cpus_per_run`` CPUs and ``gpus_per_run`` GPUs (fractional: 0.25 lets four DP runs share one GPU):
Ray starts on this machine, or joins the cluster at ``RAY_ADDRESS`` (docs/scale-out.md).

Every executor trains a run with ``cpus_per_run`` torch threads: the thread count decides the order
of floating-point sums, so it is part of what makes a run's numbers, and with it fixed the three
executors give bit-identical results for the same seeds (tests/test_executor.py), on any number of
cores. Each run writes its own folder atomically.

A failed run fails the stage with one line naming the run and its error, after the other runs
have finished (their outputs are kept). As each run finishes, the stage prints one line (stderr): the run,
``i of N``, what it gave (``describe``), the stage's elapsed time and an estimate of the time left (the runs
left at the stage's throughput so far), so a `dvc repro` without a terminal still shows progress.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

from dpcam.errors import UserError

EXECUTORS = ("serial", "local", "ray")


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Run with ``threads`` torch threads, as every executor runs a run (then restore the caller's count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
    cpus_per_run: float = 1.0,
    gpus_per_run: float = 0.0,
    stage: str = "",
    describe: Callable[[Any], str] | None = None,
) -> list[Any]:
    """``[fn(*job) for job in jobs]``, serially, in ``workers`` local processes, or as Ray tasks (``fn``: a
    module-level function); a line per finished run (:class:`Progress`: ``stage``, ``describe(result)``)."""
    if executor not in EXECUTORS:
        raise UserError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    threads = max(1, int(cpus_per_run))
    if executor == "ray":
        return _on_ray(fn, jobs, names, cpus_per_run, gpus_per_run, threads)
    if executor == "serial" or len(jobs) <= 1 or workers <= 1:
        progress = Progress(stage, len(jobs), describe)
        with _torch_threads(threads):
            return [progress.done(name, fn(*job)) for name, job in zip(names, jobs)]
    workers = min(workers, len(jobs))
    progress = Progress(stage, len(jobs), describe)
    ctx = multiprocessing.get_context("spawn")
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *job): i for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                results[i] = progress.done(names[i], future.result())
            except Exception as e:
                errors[i] = _why(names[i], e)
    _raise_first([errors[i] for i in sorted(errors)])
    return [results[i] for i in sorted(results)]


class Progress:
    """One line per finished run of a stage (stderr): ``<stage>: run i of N <name>: <what> (elapsed; ~left)``."""

    def __init__(self, stage: str, total: int, describe: Callable[[Any], str] | None) -> None:
        self.stage, self.total, self.describe = stage, total, describe
        self.finished = 0
        self.started = time.monotonic()

    def done(self, name: str, result: Any) -> Any:
        """Print the line of the run ``name`` that gave ``result``; returns ``result``."""
        self.finished += 1
        elapsed = time.monotonic() - self.started
        left = self.total - self.finished
        eta = elapsed / self.finished * left  # at the throughput so far (runs finished per second of the stage)
        what = f": {self.describe(result)}" if self.describe is not None and result is not None else ""
        when = f"{_minutes(elapsed)} elapsed" + (f", about {_minutes(eta)} left" if left else ", done")
        head = f"{self.stage}: " if self.stage else ""
        print(f"{head}run {self.finished} of {self.total} {name}{what} ({when})", file=sys.stderr, flush=True)
        return result


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _why(name: str, e: BaseException) -> str:
    """One line: the run and its error (a UserError's own line; else the exception's type and first line)."""
    if isinstance(e, UserError):
        return f"run {name}: {e}"
    text = str(e).strip()
    return f"run {name}: {type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _raise_first(errors: list[str]) -> None:
    if errors:
        more = f" ({len(errors) - 1} more failed)" if len(errors) > 1 else ""
        raise UserError(f"{errors[0]}{more}; rerun the stage (`dvc repro`)")


# ------------------------------------------------------------------------------------ Ray


def _in_folder(folder: str, threads: int, fn: Callable[..., Any], *job: Any) -> Any:
    """A Ray task: run ``fn(*job)`` in the stage's folder (relative paths, as in the stage) with ``threads`` threads."""
    os.chdir(folder)
    _worker_init(threads)
    return fn(*job)


def _start_ray(cpus_per_run: float, gpus_per_run: float) -> Any:
    """Ray, started on this machine or joined to the cluster at RAY_ADDRESS; refuses GPUs it does not have."""
    try:
        import ray
    except ImportError:
        raise UserError("grid.executor = ray needs Ray, which is not installed: pip install 'dpcam[ray]'") from None
    address = os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        _check_reachable(address)
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
        except Exception as e:  # ConnectionError, TimeoutError, ValueError: an address with no cluster behind it
            raise UserError(
                f"RAY_ADDRESS={address}: no Ray cluster answers there ({type(e).__name__}); start one with "
                "`ray start --head` on the head machine, or unset RAY_ADDRESS to run Ray on this machine"
            ) from None
    have = ray.cluster_resources()
    where = f"the Ray cluster at {address}" if address else "this machine"
    if gpus_per_run > 0 and have.get("GPU", 0) == 0:
        raise UserError(
            f"grid.gpus_per_run = {gpus_per_run:g} but {where} has no GPU; set grid.gpus_per_run: 0 to train on CPUs"
        )
    if cpus_per_run > have.get("CPU", 0):
        raise UserError(
            f"grid.cpus_per_run = {cpus_per_run:g} but {where} has {have.get('CPU', 0):g} CPUs; lower grid.cpus_per_run"
        )
    return ray


def _check_reachable(address: str | None) -> None:
    """A quick TCP check of RAY_ADDRESS's host:port (Ray itself retries an unreachable address for minutes)."""
    if address is None or address == "auto":
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"RAY_ADDRESS={address}: not host:port (e.g. 10.0.0.5:6379, as `ray start --head` prints)")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as e:
        raise UserError(
            f"RAY_ADDRESS={address}: no Ray cluster answers there ({e.strerror or type(e).__name__}); start one with "
            "`ray start --head` on the head machine, or unset RAY_ADDRESS to run Ray on this machine"
        ) from None


def _on_ray(
    fn: Callable[..., Any],
    jobs: Sequence[tuple],
    names: Sequence[str],
    cpus_per_run: float,
    gpus_per_run: float,
    threads: int,
) -> list[Any]:
    """Each job a Ray task (no retries: a failed or killed run fails the stage, naming it)."""
    ray = _start_ray(cpus_per_run, gpus_per_run)
    task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)(_in_folder)
    refs = [task.remote(os.getcwd(), threads, fn, *job) for job in jobs]
    results: list[Any] = []
    errors: list[str] = []
    for name, ref in zip(names, refs):
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            errors.append(_why(name, e.cause if e.cause is not None else e))
        except ray.exceptions.RayError as e:  # the worker died (killed, out of memory) or the node left
            errors.append(f"run {name}: its Ray worker died ({type(e).__name__})")
    _raise_first(errors)
    return results
