"""Training throughput and peak memory: none vs gaussian (each grad_sample_mode) vs laplace.

Each configuration runs in its own process (so peak RSS / peak CUDA memory is its own) on the same
random 64 px data; the table reports samples/s of one epoch after a warm-up epoch, and each
configuration's ratio to the non-private run of the same model measured in the same invocation.

    python benchmarks/bench_train.py [--models smallcnn resnet18] [--n 2048] [--batch 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = [
    ("none", "hooks"),
    ("gaussian", "hooks"),
    ("gaussian", "ew"),
    ("gaussian", "functorch"),
    ("gaussian", "ghost"),
    ("laplace", "hooks"),
]


def one(model_name: str, scheme: str, mode: str, n: int, batch: int, size: int, device: str) -> dict:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from dpcam.models import create_model
    from dpcam.privacy.engine import make_private

    torch.manual_seed(0)
    dev = torch.device(device)
    x = torch.rand(n, 3, size, size)
    y = torch.randint(0, 5, (n,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = create_model(model_name, 5, size, seed=0).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    setup = make_private(
        model,
        opt,
        loader,
        scheme=scheme,
        target_epsilon=5.0,
        delta=1e-5,
        max_grad_norm=1.0,
        epochs=2,
        accountant="prv",
        grad_sample_mode=mode,
        noise_generator=torch.Generator(device=dev).manual_seed(1),
    )
    loss_fn = setup.criterion

    def epoch() -> tuple[int, float]:
        seen, t0 = 0, time.perf_counter()
        for xb, yb in setup.data_loader:
            setup.optimizer.zero_grad(set_to_none=True)
            loss_fn(setup.module(xb.to(dev)), yb.to(dev)).backward()
            setup.optimizer.step()
            seen += len(yb)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return seen, time.perf_counter() - t0

    epoch()  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seen, secs = epoch()
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if dev.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {"samples_per_s": seen / secs, "peak_mib": peak}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smallcnn", "resnet18"])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(*a.child, a.n, a.batch, a.size, a.device)))
        return
    rows = []
    for model in a.models:
        base = None
        for scheme, mode in CONFIGS:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                model,
                scheme,
                mode,
                "--n",
                str(a.n),
                "--batch",
                str(a.batch),
                "--size",
                str(a.size),
                "--device",
                a.device,
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                rows.append(
                    f"| {model} | {scheme} | {mode} | failed: {out.stderr.strip().splitlines()[-1][:60]} | | | |"
                )
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            base = base or r
            rows.append(
                f"| {model} | {scheme} | {mode} | {r['samples_per_s']:.0f} "
                f"| {r['samples_per_s'] / base['samples_per_s']:.2f}× "
                f"| {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f}× |"
            )
    mem = "peak CUDA MiB" if a.device == "cuda" else "peak RSS MiB"
    print(f"\n{a.n} images {a.size} px, expected batch {a.batch}, device {a.device}\n")
    print(f"| model | scheme | grad_sample_mode | samples/s | vs none | {mem} | vs none |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
