"""GPU smoke of the paper profiles: samples/s and peak memory of the real training step at 224 px.

Generates synthetic-fundus images at ``--size`` px into a temporary folder (the prepared-dataset
format the pipeline trains on), then for every model of the paper (resnet18, alexnet: APTOS; vgg16:
Cats vs Dogs) and every scheme runs ``--batches`` timed steps of the training step of
``dpcam.train.fit`` (same loader, ``make_private``, loss and optimizer step) after ``--warmup``
untimed ones, with the optimizer and learning rate of that model's paper profile. Gaussian DP-SGD
uses Poisson sampling with expected batch ``--batch-size`` and σ calibrated for ε = 1, δ = 1e-4 over
one epoch; its samples/s counts the images actually sampled. Each configuration is reported
relative to the non-private run of the same model, measured in the same invocation.

    python benchmarks/paper_smoke.py                                    # GPU: all models, hooks
    python benchmarks/paper_smoke.py --grad-sample-modes hooks ghost    # also Opacus ghost clipping
    python benchmarks/paper_smoke.py --device cpu --size 64 --batches 2 --batch-size 8 --models resnet18
    python benchmarks/paper_smoke.py --concurrent 1 2 4 8 --models resnet18 --grad-sample-modes ghost

``--concurrent K ...``: for each K, K processes train the same configuration at once on the one device
(as ``grid.executor: ray`` with ``gpus_per_run: 1/K`` runs them), each its own seed, started together
after their warm-up; the aggregate samples/s is all images sampled in the timed steps over the wall time
from the first start to the last finish, and "vs K = 1" compares it with one process alone.

Peak memory is CUDA ``max_memory_allocated`` per configuration (model, optimizer state, activations,
per-sample gradients); on a CPU it is not measured per configuration and shows as "–".
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

PAPER_MODELS = ("resnet18", "alexnet", "vgg16")
# optimizer and lr of each model's paper profile (profiles/paper-aptos.yaml, profiles/paper-catsdogs.yaml)
PROFILE_OPTIM = {"resnet18": ("sgd", 0.01), "alexnet": ("sgd", 0.01), "vgg16": ("adam", 1e-4)}
NUM_CLASSES = {"resnet18": 5, "alexnet": 5, "vgg16": 2}


def make_data(root: Path, size: int, n_train: int, seed: int = 0) -> Path:
    """Write a synthetic-fundus prepared dataset with at least ``n_train`` training images under ``root``.

    Returns ``root/data/prepared/smoke`` (uint8 images (N, size, size, 3), 5 grades, 90/5/5 split).
    """
    from dpcam.config import PrepareConfig
    from dpcam.data.synthetic_stage import prepare_synthetic

    n = math.ceil(n_train / 0.9) + 10
    cfg = PrepareConfig(
        dataset="smoke",
        size=size,
        seed=seed,
        split={"train": 0.9, "val": 0.05, "test": 0.05},
        synthetic={"n": n, "balance": "uniform", "lesion_scale": 1.0},
    )
    cwd = os.getcwd()
    os.chdir(root)  # prepare writes data/prepared/<dataset> relative to the working folder
    try:
        return root / prepare_synthetic(cfg)
    finally:
        os.chdir(cwd)


def measure(
    model_name: str,
    scheme: str,
    mode: str,
    data_dir: Path,
    batch_size: int,
    batches: int,
    warmup: int,
    device,
    seed: int = 0,
    barrier=None,
) -> dict:
    """Time ``batches`` training steps of ``model_name`` under ``scheme`` after ``warmup`` untimed steps.

    The training split has (warmup + batches) × batch_size images, so one Poisson epoch is
    warmup + batches steps. Returns samples/s, peak CUDA MiB (None on CPU), σ and the steps timed.
    """
    import torch

    from dpcam.data.store import load_dataset
    from dpcam.models import create_model
    from dpcam.privacy.engine import make_private

    ds = load_dataset(data_dir)
    train = ds.split("train").subset((warmup + batches) * batch_size)
    num_classes = NUM_CLASSES[model_name]
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes, ds.image_size, seed=seed).to(device)
    opt_name, lr = PROFILE_OPTIM[model_name]
    opt = (
        torch.optim.Adam(model.parameters(), lr=lr)
        if opt_name == "adam"
        else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    )
    loader = train.loader(batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        setup = make_private(
            model,
            opt,
            loader,
            scheme=scheme,
            target_epsilon=1.0,
            delta=1e-4,
            max_grad_norm=1.0,
            epochs=1,
            accountant="prv",
            grad_sample_mode=mode,
            noise_generator=torch.Generator(device=device).manual_seed(seed + 1),
        )
    loss_fn = setup.criterion
    setup.module.train()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seen, steps, t0 = 0, 0, None
    for i, (x, y) in enumerate(setup.data_loader):
        if i == warmup:
            sync()
            if barrier is not None:  # concurrent runs start their timed steps together
                barrier.wait()
            t0, wall0 = time.perf_counter(), time.time()
        # the step of dpcam.train.fit
        setup.optimizer.zero_grad(set_to_none=True)
        x = x.to(device).contiguous()
        out = setup.module(x)
        # labels of the 2-class model: grade > 0 (the synthetic data have 5 grades)
        y = y.to(device) if num_classes == 5 else (y > 0).long().to(device)
        loss = out.sum() * 0.0 if len(y) == 0 else loss_fn(out, y)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        setup.optimizer.step()
        if i >= warmup:
            seen += len(y)
            steps += 1
    sync()
    secs = time.perf_counter() - t0 if t0 is not None else math.nan
    wall = (wall0, time.time()) if t0 is not None else (math.nan, math.nan)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    sigma = setup.noise_multiplier
    del setup, model, opt, loader
    return {
        "samples_per_s": seen / secs if secs > 0 else math.nan,
        "peak_mib": peak,
        "sigma": sigma,
        "steps": steps,
        "seen": seen,
        "wall": wall,
    }


_BARRIER = None


def _init_worker(barrier, threads: int) -> None:
    global _BARRIER
    _BARRIER = barrier
    if threads:
        import torch

        torch.set_num_threads(threads)


def _measure_in_worker(args: tuple) -> dict:
    import torch

    model, scheme, mode, data_dir, batch_size, batches, warmup, device, seed = args
    return measure(
        model, scheme, mode, data_dir, batch_size, batches, warmup, torch.device(device), seed, barrier=_BARRIER
    )


def concurrent(k: int, args: tuple, threads: int) -> dict:
    """``k`` processes measuring the same configuration at once (seeds 0..k-1); aggregate samples/s and peak MiB."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(k)
    with ProcessPoolExecutor(k, mp_context=ctx, initializer=_init_worker, initargs=(barrier, threads)) as pool:
        results = list(pool.map(_measure_in_worker, [(*args, seed) for seed in range(k)]))
    start, end = min(r["wall"][0] for r in results), max(r["wall"][1] for r in results)
    peaks = [r["peak_mib"] for r in results if r["peak_mib"] is not None]
    return {
        "samples_per_s": sum(r["seen"] for r in results) / (end - start),
        "per_run": [r["samples_per_s"] for r in results],
        "peak_mib": sum(peaks) if peaks else None,
    }


def concurrent_table(a, data_dir: Path, device, configs: list[tuple[str, str]]) -> list[str]:
    """One row per model, configuration and K of ``--concurrent``."""
    rows = []
    for model in a.models:
        for scheme, mode in configs:
            one = None
            for k in a.concurrent:
                args = (model, scheme, "hooks" if mode == "-" else mode, data_dir, a.batch_size, a.batches, a.warmup,
                        str(device))  # fmt: skip
                r = concurrent(k, args, a.threads or max(1, (os.cpu_count() or 1) // k))
                one = r["samples_per_s"] if k == 1 or one is None else one
                vs = f"{r['samples_per_s'] / one:.2f}×" if 1 in a.concurrent else "–"
                mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "–"
                each = ", ".join(f"{v:.0f}" for v in r["per_run"])
                rows.append(f"| {model} | {scheme} | {mode} | {k} | {r['samples_per_s']:.1f} | {vs} | {each} | {mem} |")
                print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--models", nargs="+", default=list(PAPER_MODELS), choices=PAPER_MODELS)
    ap.add_argument(
        "--schemes", nargs="+", default=["none", "gaussian"], choices=["none", "clip-only", "gaussian", "laplace"]
    )
    ap.add_argument(
        "--grad-sample-modes",
        nargs="+",
        default=["hooks"],
        choices=["hooks", "ew", "functorch", "ghost"],
        help="per-sample gradient modes for the clipping schemes (ghost: gaussian/clip-only only)",
    )
    ap.add_argument("--batches", type=int, default=10, help="timed steps per configuration")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (cuDNN autotune, allocator)")
    ap.add_argument("--batch-size", type=int, default=32, help="(expected) batch size; the paper profiles use 32")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument(
        "--concurrent",
        type=int,
        nargs="+",
        metavar="K",
        help="aggregate samples/s of K processes training at once on the device, for each K (include 1)",
    )
    a = ap.parse_args(argv)
    if a.batches < 1 or a.batch_size < 1 or a.warmup < 0:
        ap.error("--batches and --batch-size must be >= 1 and --warmup >= 0")
    if a.concurrent and min(a.concurrent) < 1:
        ap.error("--concurrent: every K must be >= 1")

    import torch

    from dpcam.errors import UserError
    from dpcam.saved import resolve_device

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        device = resolve_device(a.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import opacus

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device {name}; torch {torch.__version__}, opacus {opacus.__version__}; {a.size} px, "
        f"expected batch {a.batch_size}, {a.warmup} warm-up + {a.batches} timed steps per configuration"
    )

    configs = []
    for scheme in a.schemes:
        modes = (
            ["-"]
            if scheme == "none"
            else [m for m in a.grad_sample_modes if not (scheme == "laplace" and m == "ghost")]
        )
        configs += [(scheme, m) for m in modes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpcam-smoke-") as tmp:
        t = time.perf_counter()
        data_dir = make_data(Path(tmp), a.size, (a.warmup + a.batches) * a.batch_size)
        print(f"synthetic data: {data_dir.name} in {time.perf_counter() - t:.1f} s")
        if a.concurrent:
            rows = concurrent_table(a, data_dir, device, configs)
            print(
                "\n| model | scheme | grad_sample_mode | K | total samples/s | vs K = 1 | each run | peak MiB (sum) |"
            )
            print("|---|---|---|---:|---:|---:|---|---:|")
            print("\n".join(rows))
            return 0
        for model in a.models:
            base = None
            for scheme, mode in configs:
                try:
                    r = measure(
                        model,
                        scheme,
                        "hooks" if mode == "-" else mode,
                        data_dir,
                        a.batch_size,
                        a.batches,
                        a.warmup,
                        device,
                    )
                except torch.cuda.OutOfMemoryError:
                    rows.append(f"| {model} | {scheme} | {mode} | out of GPU memory | | | | |")
                    torch.cuda.empty_cache()
                    continue
                if scheme == "none":
                    base = r
                vs = f"{r['samples_per_s'] / base['samples_per_s']:.2f}×" if base else "–"
                mem = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "–"
                mem_vs = f"{r['peak_mib'] / base['peak_mib']:.2f}×" if base and r["peak_mib"] is not None else "–"
                sigma = f"{r['sigma']:.3f}" if r["sigma"] else "–"
                rows.append(
                    f"| {model} | {scheme} | {mode} | {r['samples_per_s']:.1f} | {vs} | {mem} | {mem_vs} | {sigma} |"
                )
                print(rows[-1], flush=True)
    print("\n| model | scheme | grad_sample_mode | samples/s | vs none | peak CUDA MiB | vs none | σ |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
