"""Explanation cost relative to one plain forward pass over the same images, in one run.

Rows: forward (the floor), Grad-CAM maps, maps + Average Drop + Increase + masked score, maps +
deletion/insertion (K = 16), and the same two metric sets called per image (the way popular CAM
libraries' examples call their metrics). ``--methods``: instead, the maps of every explanation method
(explain.methods' choices, with params.yaml's settings: IG steps, occlusion window and stride), in
seconds per image and × forward.

    python benchmarks/bench_explain.py [--model smallcnn] [--size 64] [--n 512] [--batch 64] [--methods]
"""

from __future__ import annotations

import argparse
import time

import torch

from dpcam import names
from dpcam.config import ExplainConfig
from dpcam.explain.confidence import confidence_drop
from dpcam.explain.faithfulness import deletion_insertion
from dpcam.explain.gradcam import gradcam
from dpcam.explain.methods import options_of
from dpcam.explain.streaming import RunningMean
from dpcam.models import create_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--loop-n", type=int, default=64, help="images for the per-image loops (scaled to --n)")
    ap.add_argument("--methods", action="store_true", help="time every explanation method's maps instead")
    a = ap.parse_args()
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = create_model(a.model, 5, a.size, seed=0).to(dev).eval()
    x_all = torch.rand(a.n, 3, a.size, a.size, device=dev)
    labels = torch.randint(0, 5, (a.n,), device=dev)
    batches = [(x_all[i : i + a.batch], labels[i : i + a.batch]) for i in range(0, a.n, a.batch)]

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def timed(fn, reps=3):
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
            for x, _ in batches:
                model(x)

    def maps():
        for x, _ in batches:
            gradcam(model, x)

    def paper():
        r = RunningMean()
        for x, y in batches:
            m, t, p = gradcam(model, x)
            r.add(confidence_drop(model, x, m, t, y, probs=p))

    def delins():
        for x, _ in batches:
            m, t, p = gradcam(model, x)
            deletion_insertion(model, x, m, t, steps=16, probs=p)

    def loop(metric):
        def run():
            for i in range(a.loop_n):
                x, y = x_all[i : i + 1], labels[i : i + 1]
                m, t, _ = gradcam(model, x)
                if metric == "paper":
                    confidence_drop(model, x, m, t, y)
                else:
                    deletion_insertion(model, x, m, t, steps=16, max_batch=1)

        return run

    def method(name):
        options = options_of(name, ExplainConfig())

        def run():
            for x, _ in batches:
                gradcam(model, x, method=name, options=options)

        return run

    floor = timed(forward)
    scale = a.n / a.loop_n
    if a.methods:
        _table(a, dev, floor, [(f"maps: {m}", timed(method(m), 1)) for m in names.EXPLAIN_METHODS])
        return
    rows = [
        ("Grad-CAM maps", timed(maps)),
        ("maps + Average Drop + Increase + masked score", timed(paper)),
        ("maps + deletion + insertion (K = 16)", timed(delins, 1)),
        ("per-image loop: maps + the three paper metrics", timed(loop("paper"), 1) * scale),
        ("per-image loop: maps + deletion + insertion", timed(loop("delins"), 1) * scale),
    ]
    _table(a, dev, floor, rows)


def _table(a, dev, floor, rows) -> None:
    print(f"\n{a.model} {a.size} px, {a.n} images, batch {a.batch}, {dev}, {torch.get_num_threads()} threads\n")
    print("| what | seconds | ms per image | × forward |")
    print("|---|---:|---:|---:|")
    for name, secs in [("forward pass (floor)", floor), *rows]:
        print(f"| {name} | {secs:.3f} | {1000 * secs / a.n:.2f} | {secs / floor:.1f}× |")


if __name__ == "__main__":
    main()
