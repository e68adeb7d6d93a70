"""Audit cost relative to one plain forward pass over the same members + non-members, in one run.

Rows: the forward pass (the floor: batches fetched from the memory-mapped dataset as the audit
fetches them, no gradient), the signals of the loss attacks alone, loss + input gradient, loss +
Grad-CAM, all five attacks' signals, and the whole ``audit_run`` (signals, metrics, the PLD
trade-off curve of a Gaussian run, roc.png and audit.json; no MLflow). The model has random
weights (the cost does not depend on them); train.json carries the σ, q and steps of a typical
Gaussian grid run so the PLD curve is built.

    python benchmarks/bench_audit.py [--model smallcnn] [--size 64] [--per-group 1000] [--batch 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--per-group", type=int, default=1000, help="members = non-members sampled")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()

    from dpcam.audit import audit_run, compute_signals, sample_groups
    from dpcam.config import AuditConfig, PrepareConfig, TrainConfig
    from dpcam.data.store import ImageDataset, load_dataset
    from dpcam.data.synthetic_stage import prepare_synthetic
    from dpcam.models import create_model
    from dpcam.records import TrainRecord
    from dpcam.saved import resolve_device, save_model

    os.chdir(tempfile.mkdtemp(prefix="bench-audit-"))
    n = 2 * a.per_group + 40  # +40: both splits comfortably hold per-group images of every class
    prepare_synthetic(
        PrepareConfig(dataset="fundus", size=a.size, synthetic={"n": n}, split={"train": 0.5, "val": 0.0, "test": 0.5})
    )
    data = load_dataset("data/prepared/fundus")
    cfg = TrainConfig(dataset="fundus", model=a.model, scheme="gaussian", epsilon=1, name="run")
    model = create_model(a.model, data.num_classes, data.image_size, seed=0)
    save_model(model, cfg, data, Path("models/run"))
    # σ, q, steps of a Gaussian ε = 1 run: batch 256 of 4200 images for 10 epochs (smallcnn quick grid)
    TrainRecord(
        dataset="fundus",
        model=a.model,
        scheme="gaussian",
        epsilon=0.998,
        delta=1e-4,
        noise_multiplier=2.9,
        sample_rate=256 / 4200,
        steps=164,
        accountant="prv",
        epochs=10,
        train_size=4200,
        best_epoch=10,
        val_accuracy=0.0,
        test_accuracy=0.0,
        test_macro_f1=0.0,
        test_qwk=0.0,
        test_pred_histogram=[],
        test_majority_share=0.0,
        train_seconds=0.0,
        device="cpu",
        collapsed=False,
        run_name="run",
    ).write(Path("models/run/train.json"))
    dev = resolve_device("auto")
    model = model.to(dev).eval()
    members, non = sample_groups(data, a.per_group, 0)
    both = ImageDataset(data, np.concatenate([members, non]))

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn, reps=a.reps):
        fn()
        sync()
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t)
        return best

    def forward():
        with torch.no_grad():
            for start in range(0, len(both), a.batch):
                x, _ = both.batch(np.arange(start, min(len(both), start + a.batch)))
                model(x.to(dev))

    def signals(attacks):
        return lambda: compute_signals(model, both, attacks, batch_size=a.batch, device=dev, progress=False)

    import logging

    logging.getLogger("dpcam.audit").setLevel(logging.ERROR)  # "no MLflow run id": expected here
    audit_cfg = AuditConfig(batch_size=a.batch, max_per_group=a.per_group, device=dev.type)
    floor = timed(forward)
    rows = [
        ("forward pass (floor)", floor),
        ("signals: loss attacks", timed(signals(["loss", "loss-calibrated"]))),
        ("signals: + input gradient", timed(signals(["loss", "input-gradient"]))),
        ("signals: + Grad-CAM variance/entropy", timed(signals(["loss", "gradcam-variance"]))),
        ("signals: all five attacks", timed(signals(list(AuditConfig().attacks)))),
        (
            "whole audit_run (signals, metrics, PLD curve, plot, json)",
            timed(lambda: audit_run("run", audit_cfg, progress=False), 1),
        ),
    ]
    print(
        f"\n{a.model} {a.size} px, {len(both)} images ({len(members)} members + {len(non)} non-members), "
        f"batch {a.batch}, {dev.type}, {torch.get_num_threads()} threads\n"
    )
    print("| what | seconds | × forward |")
    print("|---|---:|---:|")
    for name, secs in rows:
        print(f"| {name} | {secs:.3f} | {secs / floor:.1f}× |")


if __name__ == "__main__":
    main()
