"""Benchmark `prepare` from real-layout files against the decode-bound limit.

Makes (once; cached under benchmarks/out/, which git ignores) N fundus-like PNGs of SIZE px in the
APTOS layout (train.csv + train_images/) and an ImageFolder view of the same files (symlinks), then
times:

- the limit: a plain single-process loop ``Image.open -> convert("RGB") -> resize(64, LANCZOS,
  reducing_gap=3)`` over the files (what decoding alone costs on one core);
- ``prepare_source`` (imagefolder: centre crop; aptos: fundus border crop too) with ``--workers``
  processes, end to end (listing, pool start, decode, memmap write, split, manifest checksums).

Goal (issue 2): prepare >= 0.8x the limit per core, i.e. >= 1.6x the single loop with 2 workers.

    .venv/bin/python benchmarks/bench_prepare.py [--n 500] [--px 512] [--size 64] [--workers 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dpcam.config import PrepareConfig
from dpcam.data import sources

OUT = Path(__file__).resolve().parent / "out" / "bench_prepare"


def fundus_like(px: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (px, px, 3): smooth warm noise inside a disc on a black border, plus sensor noise."""
    low = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((px, px), Image.Resampling.BICUBIC)
    base = np.asarray(low, dtype=np.float32) * np.array([0.8, 0.45, 0.2], np.float32) + np.array(
        [60, 20, 5], np.float32
    )
    base += rng.normal(0, 6, (px, px, 1)).astype(np.float32)
    yy, xx = np.mgrid[:px, :px]
    r = np.hypot(yy - px / 2, xx - px / 2)
    inside = (r < 0.46 * px)[..., None]
    return np.clip(np.where(inside, base, rng.normal(3, 2, (px, px, 1))), 0, 255).astype(np.uint8)


def make_files(n: int, px: int) -> tuple[Path, Path, list[Path]]:
    root = OUT / f"png-{n}x{px}"
    aptos, folder = root / "aptos", root / "imagefolder"
    if not (root / "done").exists():
        shutil.rmtree(root, ignore_errors=True)
        (aptos / "train_images").mkdir(parents=True)
        rng = np.random.default_rng(0)
        lines = ["id_code,diagnosis"]
        for i in range(n):
            name = f"img{i:05d}"
            Image.fromarray(fundus_like(px, rng)).save(aptos / "train_images" / f"{name}.png")
            lines.append(f"{name},{i % 5}")
            cls = folder / f"grade{i % 5}"
            cls.mkdir(parents=True, exist_ok=True)
            (cls / f"{name}.png").symlink_to(aptos / "train_images" / f"{name}.png")
        (aptos / "train.csv").write_text("\n".join(lines) + "\n")
        (root / "done").write_text("ok\n")
    return aptos, folder, sorted((aptos / "train_images").glob("*.png"))


def plain_loop(files: list[Path], size: int) -> None:
    for p in files:
        with Image.open(p) as im:
            np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0))


def timed(fns: dict[str, callable], repeat: int) -> dict[str, float]:
    """Median wall time per function over ``repeat`` rounds; each round runs every function once
    (interleaved, so a busy neighbour slows all of them alike), after one untimed warm-up round."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeat + 1):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--px", type=int, default=512)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()

    aptos, folder, files = make_files(a.n, a.px)
    work = OUT / "cwd"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # prepare writes data/prepared/<name> under the current folder

    def run(fmt: str, src: Path, workers: int):
        cfg = PrepareConfig(dataset=f"bench-{fmt}-{workers}", format=fmt, source=src, size=a.size, workers=workers)
        return lambda: sources.prepare_source(cfg, progress=False)

    fns = {("plain PIL loop (decode-bound limit)", 1): lambda: plain_loop(files, a.size)}
    for fmt, src in [("imagefolder", folder), ("aptos", aptos)]:
        for w in sorted({1, a.workers}):
            fns[(f"prepare_source, {fmt}", w)] = run(fmt, src, w)
    med = timed(fns, a.repeat)
    base = next(iter(med.values()))
    rows = [(name, w, t) for (name, w), t in med.items()]

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(
        f"\n{a.n} PNGs of {a.px} px -> {a.size} px; {cores} cores; median of {a.repeat} interleaved rounds; "
        f"load average after: {load}\n"
    )
    print("| method | workers | images/s | × single loop | × limit per worker |")
    print("|---|---:|---:|---:|---:|")
    for name, w, t in rows:
        ratio = base / t
        print(f"| {name} | {w} | {a.n / t:,.0f} | {ratio:.2f} | {ratio / w:.2f} |")
    shutil.rmtree(work / "data", ignore_errors=True)


if __name__ == "__main__":
    main()
