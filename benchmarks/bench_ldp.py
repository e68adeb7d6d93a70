"""Local-DP derivation speed: images/s per mechanism at 64 px through `dpcam.data.ldp.derive`.

Makes a prepared dataset of random uint8 images (noise cost does not depend on content) in a
temporary folder, then times, per mechanism (ε = 1):
- ``derive``: the whole stage (read memmap, noise, write memmap, checksums, samples.png);
- ``apply``: the mechanism alone on the same images in the same batches;
and, for reference, numpy's own ``Generator.laplace`` / ``standard_normal`` added the same way
(the floor for per-value noise). Prints a markdown table.

    .venv/bin/python benchmarks/bench_ldp.py [--n 5000] [--size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from dpcam.config import LdpConfig
from dpcam.data import ldp, store
from dpcam.data.mechanisms import MECHANISMS
from dpcam.data.noise import NoiseSource


def make_source(path: Path, n: int, size: int) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 5
    splits = store.stratified_split(labels, {"train": 0.7, "val": 0.1, "test": 0.2}, seed=0)
    with store.DatasetWriter(path, n, size, size, with_masks=True) as w:
        for s in range(0, n, 1000):
            e = min(n, s + 1000)
            w.images[s:e] = rng.integers(0, 256, (e - s, size, size, 3), dtype=np.uint8)
            w.masks[s:e] = rng.integers(0, 2, (e - s, size, size), dtype=np.uint8)
        w.finish(labels, splits, {"dataset": "bench", "classes": [str(c) for c in range(5)], "image_size": size})
    return path


def timed(fn, repeat: int = 2) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--size", type=int, default=64)
    args = ap.parse_args()
    n, size = args.n, args.size
    with tempfile.TemporaryDirectory() as tmp:
        src = make_source(Path(tmp) / "prepared/bench", n, size)
        images = np.load(src / "images.npy")
        per_batch = max(1, ldp.BATCH_VALUES // (size * size * 3))
        rows = []
        for secure in (False, True):
            cfg = LdpConfig(seed=0, secure=secure)
            for name in sorted(MECHANISMS):
                if secure and name not in ("pixel-laplace", "pixel-gaussian"):
                    continue
                mech = MECHANISMS[name].from_config(1.0, cfg)
                t_derive = timed(
                    lambda name=name, cfg=cfg: ldp.derive(
                        src, name, 1.0, cfg, out_root=Path(tmp) / "ldp", progress=False
                    )
                )

                def apply_all(secure=secure, mech=mech):
                    noise = NoiseSource(None, secure=True) if secure else NoiseSource(0)
                    for s in range(0, n, per_batch):
                        mech.apply(images[s : s + per_batch], noise)

                t_apply = timed(apply_all)
                rows.append((name + (" (secure)" if secure else ""), n / t_derive, n / t_apply))

        def numpy_ref(kind):
            rng = np.random.default_rng(0)
            for s in range(0, n, per_batch):
                x = images[s : s + per_batch]
                z = rng.laplace(0, 255.0, x.shape) if kind == "laplace" else rng.standard_normal(x.shape) * 951.3
                np.clip(np.rint(x + z), 0, 255).astype(np.uint8)

        ref = {k: n / timed(lambda k=k: numpy_ref(k)) for k in ("laplace", "gaussian")}

    print(f"\nLocal-DP derivation, {n} images at {size}×{size}×3, ε = 1 (best of 2)\n")
    print("| mechanism | derive images/s | apply images/s | apply vs numpy rng reference |")
    print("|---|---:|---:|---:|")
    for name, d, a in rows:
        key = "laplace" if "laplace" in name else "gaussian" if "gaussian" in name else None
        ratio = f"{a / ref[key]:.2f}×" if key else "–"
        print(f"| {name} | {d:,.0f} | {a:,.0f} | {ratio} |")
    print(f"| numpy Generator.laplace (reference) | – | {ref['laplace']:,.0f} | 1.00× |")
    print(f"| numpy Generator.standard_normal (reference) | – | {ref['gaussian']:,.0f} | 1.00× |")


if __name__ == "__main__":
    main()
