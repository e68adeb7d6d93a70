"""Helpers of the real-source tests: small image files in each source layout, and prepare run on them."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from dpcam.config import PrepareConfig
from dpcam.data import sources

OUT = Path("data/prepared")


def smooth(h=30, w=40, seed=0):
    """Smooth random RGB uint8 (h, w, 3): resized noise, so JPEG and resampling behave like photos."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(30, 256, (4, 4, 3), dtype=np.uint8))
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


def save(path, arr=None, seed=0, fmt=None, **kw):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(smooth(seed=seed) if arr is None else arr).save(path, fmt, **kw)
    return path


def fundus(h=30, w=40, seed=0):
    """Bright retina-like content on a black border of 5 px left/right and 3 px top/bottom."""
    a = np.zeros((h, w, 3), np.uint8)
    a[3 : h - 3, 5 : w - 5] = smooth(h - 6, w - 10, seed)
    return a


def make_aptos(root, labels=(0, 1, 2, 3, 4, 0, 1, 2, 3, 4), bom=False):
    root = Path(root)
    lines = ["id_code,diagnosis"]
    for i, y in enumerate(labels):
        save(root / "train_images" / f"id{i:02d}.png", fundus(seed=i))
        lines.append(f"id{i:02d},{y}")
    (root / "train.csv").write_text("\n".join(lines) + "\n", encoding="utf-8-sig" if bom else "utf-8")
    return root


def make_folder(root, classes=("a", "b"), per_class=4, ext="png"):
    root = Path(root)
    for c, name in enumerate(classes):
        for i in range(per_class):
            save(root / name / f"{name}{i}.{ext}", seed=10 * c + i)
    return root


def cfg(fmt, source, **kw):
    kw.setdefault("dataset", "d")
    kw.setdefault("workers", 1)
    return PrepareConfig(format=fmt, source=source, **kw)


def prep(fmt, source, **kw):
    return sources.prepare_source(cfg(fmt, source, **kw), progress=False)


def manifest(name="d"):
    return json.loads((OUT / name / "manifest.json").read_text())
