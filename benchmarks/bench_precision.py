"""bfloat16 training (issue 21): speed of a training step and accuracy of the DP recipe, float32 against bfloat16.

**Speed.** Milliseconds per training step (zero_grad, forward, loss, backward, optimizer step) of smallcnn at
32 px on one fixed batch of 512 random images, one torch thread, for

- float32; bfloat16 autocast (``make_private(precision="bf16")`` and ``setup.autocast()``); channels-last
  float32 (model and batch in ``torch.channels_last``);
- each plain (no privacy: SGD), with Opacus hooks (gaussian: per-example L2 clipping, Gaussian noise) and with
  dpcam's Laplace optimizer (per-example L1 clipping, Laplace noise);
- and one more row: gaussian under bfloat16 autocast with Opacus's own optimizer (the fp32 setup under a bare
  ``torch.autocast``), whose per-sample norms are bfloat16 and whose clipped gradients exceed C (by up to 0.6 %):
  what exact clipping costs on top of it.

The configurations are interleaved over ``--rounds`` rounds (median reported), each ratio against float32 of the
same scheme measured in the same run. The per-example gradients of every DP configuration are compared with
float32 NCHW's: Opacus's hooks read conv inputs as contiguous NCHW, so channels-last per-example gradients are
wrong (bounded by C all the same, but not the gradients).

**Accuracy.** The DP recipe of params.yaml's ``train`` section (gaussian at ``--epsilon`` 10, its clip, batch,
lr, momentum and cosine schedule; ``--epochs``) trained on an independent draw of synthetic-fundus (generator
and split seed ``--data-seed`` 1, as ``scripts/recipes.py`` does: no image of the study's data is read) in
float32 and bfloat16 (``train.precision``), for each training seed of ``--seeds``, by ``dpcam.train.fit.fit``; the
best epoch's validation accuracy is reported (``keep_best``), with the last epoch's.

    OMP_NUM_THREADS=1 python benchmarks/bench_precision.py     # speed + 4 epochs of seed 100: 6 min on the dev box
    python benchmarks/bench_precision.py --no-speed --epochs 8 --seeds 100 101    # the full recipe: 16 min there

(The dev box has AVX2 only: bfloat16 is emulated there and 5-7x slower than float32; see docs/benchmarks.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import statistics
import subprocess
import tempfile
import time
import warnings
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("fp32", "bf16", "channels-last")
SCHEMES = ("none", "gaussian", "laplace")
OPACUS_BF16 = ("bf16, Opacus's own clipping", "gaussian")  # the extra row: bfloat16 norms, inexact


# ------------------------------------------------------------------------------------------------ machine


def machine() -> dict:
    from dpcam.privacy.precision import native_bf16

    cpu = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True)
        commit += " + uncommitted changes" if dirty.stdout.strip() else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import opacus

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "capability": torch.backends.cpu.get_cpu_capability(),
        "native_bf16": native_bf16("cpu"),
        "torch": torch.__version__,
        "opacus": opacus.__version__,
        "threads": torch.get_num_threads(),
        "commit": commit,
        "date": date.today().isoformat(),
    }


# ------------------------------------------------------------------------------------------------ speed


class Config:
    """One timed configuration: a model, its (private) optimizer, the batch and the step's context."""

    def __init__(self, variant: str, scheme: str, batch: int, size: int, classes: int = 5):
        from torch.utils.data import DataLoader, TensorDataset

        from dpcam.models import create_model
        from dpcam.privacy.engine import make_private

        self.variant, self.scheme = variant, scheme
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(batch, 3, size, size, generator=g)
        self.y = torch.randint(0, classes, (batch,), generator=g)
        channels_last = variant == "channels-last"
        model = create_model("smallcnn", classes, size, seed=0)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        # a training set of 10 batches: q = 0.1, expected batch `batch` (the steps below use the fixed batch)
        data = DataLoader(TensorDataset(torch.zeros(10 * batch, 1), torch.zeros(10 * batch)), batch_size=batch)
        self.setup = make_private(
            model,
            opt,
            data,
            scheme=scheme,
            target_epsilon=10.0,
            delta=1e-5,
            max_grad_norm=100.0 if scheme == "laplace" else 1.0,  # grid.laplace_clip for L1, train.clip for L2
            epochs=8,
            noise_generator=torch.Generator().manual_seed(1),
            precision="bf16" if variant == "bf16" else "fp32",
        )
        self.context = (
            (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
            if variant.startswith("bf16,")
            else self.setup.autocast
        )

    def backward(self) -> None:
        s = self.setup
        s.optimizer.zero_grad(set_to_none=True)
        with self.context():
            loss = s.criterion(s.module(self.x), self.y)
        loss.backward()

    def step(self) -> tuple[float, float]:
        """(seconds of the whole step, seconds of optimizer.step(): clipping, noise and the update)."""
        started = time.perf_counter()
        self.backward()
        backward_done = time.perf_counter()
        self.setup.optimizer.step()
        done = time.perf_counter()
        return done - started, done - backward_done

    def per_sample_grads(self) -> list[torch.Tensor]:
        self.backward()
        out = [p.grad_sample.float().clone() for p in self.setup.optimizer.params]
        self.setup.optimizer.zero_grad(set_to_none=True)
        return out


def relative_error(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """max over examples of ‖g_i − r_i‖ / ‖r_i‖, each example's gradient over all parameters."""
    flat = [torch.cat([g.reshape(len(g), -1) for g in gs], dim=1).double() for gs in (ours, ref)]
    return ((flat[0] - flat[1]).norm(dim=1) / flat[1].norm(dim=1).clamp(min=1e-30)).max().item()


def speed(batch: int, size: int, rounds: int) -> list[dict]:
    configs = [Config(v, s, batch, size) for s in SCHEMES for v in VARIANTS]
    configs.append(Config(*OPACUS_BF16, batch, size))
    reference = {c.scheme: c.per_sample_grads() for c in configs if c.variant == "fp32" and c.scheme != "none"}
    # per-example gradients against fp32 NCHW's: bf16 rounding gives about 1 %; channels-last's are wrong
    agree = {id(c): relative_error(c.per_sample_grads(), reference[c.scheme]) for c in configs if c.scheme != "none"}
    for c in configs:
        c.step()  # warm-up
    times: dict[int, list[tuple[float, float]]] = {id(c): [] for c in configs}
    for r in range(rounds):
        for c in configs:
            times[id(c)].append(c.step())
        print(f"speed round {r + 1}/{rounds} done", flush=True)

    def median(c, part: int) -> float:
        return statistics.median(t[part] for t in times[id(c)])

    base = {c.scheme: median(c, 0) for c in configs if c.variant == "fp32"}
    return [
        {
            "variant": c.variant,
            "scheme": c.scheme,
            "ms": 1000 * median(c, 0),
            "step_ms": 1000 * median(c, 1),
            "vs_fp32": base[c.scheme] / median(c, 0),
            "grad_sample_error": agree.get(id(c)),
        }
        for c in configs
    ]


# ------------------------------------------------------------------------------------------------ accuracy


def train_once(cfg, precision: str) -> dict:
    """cfg's DP run in ``precision``, trained by ``dpcam.train.fit.fit`` (validation after every epoch, float32)."""
    from dpcam.train.fit import fit

    started = time.perf_counter()
    res = fit(cfg.model_copy(update={"precision": precision}), progress=False)
    m, curve = res.metrics, [row["val_accuracy"] for row in res.history]
    return {
        "precision": precision,
        "seed": cfg.seed,
        "best_val": max(curve),
        "last_val": curve[-1],
        "curve": curve,
        "epsilon": m["epsilon"],
        "steps": m["steps"],
        "seconds": time.perf_counter() - started,
    }


def accuracy_runs(epochs: int, seeds: list[int], epsilon: float, data_seed: int) -> tuple[object, list[dict]]:
    from dpcam import config
    from dpcam.config import PrepareConfig
    from dpcam.data.synthetic_stage import prepare_synthetic

    params = ROOT / "params.yaml"
    prep = config.load_section("prepare", path=params)
    base = config.load_section("train", path=params)
    os.chdir(tempfile.mkdtemp(prefix="dpcam-precision-"))
    prepare_synthetic(PrepareConfig.model_validate({**prep.model_dump(), "seed": data_seed, "dataset": "draw"}))
    base = base.model_copy(
        update={"dataset": "draw", "scheme": "gaussian", "epsilon": epsilon, "epochs": epochs, "device": "cpu"}
    )
    runs = []
    for seed in seeds:
        for precision in ("fp32", "bf16"):
            r = train_once(base.model_copy(update={"seed": seed}), precision)
            runs.append(r)
            print(
                f"seed {seed} {precision}: best val {r['best_val']:.3f}, last {r['last_val']:.3f}, "
                f"ε {r['epsilon']:.3f}, {r['steps']} steps, {r['seconds']:.0f} s",
                flush=True,
            )
    return base, runs


# ------------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed steps per configuration (interleaved)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-speed", action="store_true", help="skip the speed table")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of the accuracy runs (the recipe has 8); 0: none")
    ap.add_argument("--seeds", type=int, nargs="+", default=[100], help="training seeds of the accuracy runs")
    ap.add_argument("--epsilon", type=float, default=10.0)
    ap.add_argument("--data-seed", type=int, default=1, help="generator and split seed of the independent draw")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Full backward hook")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    logging.getLogger("dpcam.privacy.precision").setLevel(logging.ERROR)  # the no-native-bf16 warning: in the header

    m = machine()
    print(
        f"\n{m['date']}, {m['cpu']} ({m['cores']} cores, torch CPU capability {m['capability']}, native bf16: "
        f"{m['native_bf16']}), {m['threads']} torch thread(s), torch {m['torch']}, opacus {m['opacus']}, "
        f"commit {m['commit']}\n",
        flush=True,
    )
    if not a.no_speed:
        rows = speed(a.batch, a.size, a.rounds)
        print(f"\nsmallcnn, {a.size} px, batch {a.batch}, median of {a.rounds} interleaved steps\n")
        print(
            "| scheme | precision | ms/step | speed vs fp32 | of which optimizer.step ms "
            "| per-example grads vs fp32 NCHW (max rel. error) |"
        )
        print("|---|---|---:|---:|---:|---:|")
        for r in rows:
            err = r["grad_sample_error"]
            shown = "–" if err is None else f"{err:.1e}" + (" (wrong)" if err > 0.05 else "")
            print(
                f"| {r['scheme']} | {r['variant']} | {r['ms']:.0f} | {r['vs_fp32']:.2f}× | {r['step_ms']:.1f} "
                f"| {shown} |"
            )
    if a.epochs > 0:
        cfg, runs = accuracy_runs(a.epochs, a.seeds, a.epsilon, a.data_seed)
        print(
            f"\nDP recipe: gaussian ε {cfg.target_epsilon:g} (δ {cfg.delta:g}), C {cfg.clip:g}, "
            f"batch {cfg.batch_size}, sgd lr {cfg.lr:g} momentum {cfg.momentum:g}, {cfg.schedule}, "
            f"{cfg.epochs} epochs; synthetic-fundus draw {a.data_seed} ({prep_size(cfg)})\n"
        )
        print("| seed | precision | best val accuracy | last-epoch val accuracy | ε spent | steps | seconds |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in runs:
            print(
                f"| {r['seed']} | {r['precision']} | {r['best_val']:.3f} | {r['last_val']:.3f} | {r['epsilon']:.3f} "
                f"| {r['steps']} | {r['seconds']:.0f} |"
            )
        for p in ("fp32", "bf16"):
            vals = [r["best_val"] for r in runs if r["precision"] == p]
            print(f"\n{p}: mean best val accuracy {statistics.mean(vals):.3f} over {len(vals)} seed(s)", end="")
        print()


def prep_size(cfg) -> str:
    from dpcam.data.store import load_dataset

    d = load_dataset(cfg.data_dir)
    return f"{len(d.split('train'))} training and {len(d.split('val'))} validation images at {d.image_size} px"


if __name__ == "__main__":
    main()
