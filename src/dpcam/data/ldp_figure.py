"""Figures of local-DP derivatives: a derivative's ``samples.png`` (clean above noised) and the
clean-vs-ε grid of every derivative of a dataset (`dpcam figure ldp`).

Pillow and matplotlib are imported where used.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dpcam import guard
from dpcam.data import store
from dpcam.errors import UserError
from dpcam.layout import LDP_ROOT, PREPARED_ROOT, format_eps, write_atomic


def _sample_indices(labels: np.ndarray, k: int) -> np.ndarray:
    """k fixed image indices, round-robin over the classes (first image of each class, then the second, ...)."""
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    out: list[int] = []
    for rank in range(max((p.size for p in per_class), default=0)):
        for p in per_class:
            if rank < p.size and len(out) < k:
                out.append(int(p[rank]))
    return np.array(sorted(out), dtype=np.int64)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _samples_png(clean: np.ndarray, noised: np.ndarray, title: str) -> bytes:
    """PNG bytes: a title line, the clean images (top row) and their noised versions (bottom row).

    ``clean``, ``noised``: uint8 (k, H, W, 3). Small images are enlarged (nearest) to ≥ 96 px.
    """
    import io

    from PIL import Image, ImageDraw

    k, h, w, _ = clean.shape
    f = max(1, math.ceil(96 / max(h, w)))
    gap, top = 4, 22
    canvas = Image.new("RGB", (k * (w * f + gap) + gap, top + 2 * (h * f + gap)), "white")
    for row, imgs in enumerate((clean, noised)):
        for i in range(k):
            tile = Image.fromarray(imgs[i]).resize((w * f, h * f), Image.NEAREST)
            canvas.paste(tile, (gap + i * (w * f + gap), top + row * (h * f + gap)))
    ImageDraw.Draw(canvas).text((gap, 4), title, fill="black", font=_font(13))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def figure_ldp(dataset: str, out: Path, root: Path = LDP_ROOT, prepared: Path = PREPARED_ROOT) -> Path:
    """Clean-vs-ε grid PNG of every local-DP derivative of ``dataset`` found under ``root/<dataset>/``.

    One block of 4 rows per mechanism (the same 4 fixed images in every block): the clean image,
    then one column per ε in increasing order, labelled. Raises ``UserError`` when nothing has
    been derived, the prepared dataset is missing, or a derivative was made from other clean data.
    """
    found = _find_derivatives(Path(root) / dataset, dataset)
    clean_dir = Path(prepared) / dataset
    if not (clean_dir / "manifest.json").is_file():
        raise UserError(f"{clean_dir}: no prepared dataset {dataset!r}; run `dpcam prepare --dataset {dataset}` first")
    clean = store.load_dataset(clean_dir)
    picks = _sample_indices(clean.labels, 4)
    blocks = _derivative_blocks(found, clean, clean_dir, picks, dataset)
    fig = _grid_figure(dataset, clean, picks, blocks)
    return write_atomic(Path(out), lambda tmp: fig.savefig(tmp, format="png"))


def _find_derivatives(base: Path, dataset: str) -> dict[str, list[tuple[float, Path]]]:
    """Mechanism name -> [(ε, folder)] of the derivatives under ``base``; UserError when there is none."""
    found: dict[str, list[tuple[float, Path]]] = {}
    for mpath in sorted(base.glob("*/manifest.json")):
        man = guard.read_json(mpath, fix=f"derive it again (`dpcam ldp --dataset {dataset}`)")
        if man.get("kind") != "ldp":
            continue
        found.setdefault(man["mechanism"]["name"], []).append((float(man["mechanism"]["epsilon"]), mpath.parent))
    if not found:
        raise UserError(f"{base}: no local-DP derivatives of {dataset!r}; run `dpcam ldp --dataset {dataset}` first")
    return found


def _derivative_blocks(found, clean: store.PreparedDataset, clean_dir: Path, picks: np.ndarray, dataset: str) -> list:
    """[(mechanism, [(ε, images at picks)])], mechanisms by name and ε increasing; UserError for a
    derivative whose source images are not ``clean``'s (by the checksum of images.npy)."""
    clean_sum = clean.manifest.get("checksums", {}).get("images.npy")
    blocks = []
    for mech in sorted(found):
        cols = []
        for eps, path in sorted(found[mech]):
            d = store.load_dataset(path)
            if d.manifest["source"]["manifest_checksums"].get("images.npy") != clean_sum:
                raise UserError(
                    f"{path}: was derived from other images than {clean_dir}; rerun `dpcam ldp --dataset {dataset}`"
                )
            cols.append((eps, np.asarray(d.images[picks])))
        blocks.append((mech, cols))
    return blocks


def _grid_figure(dataset: str, clean: store.PreparedDataset, picks: np.ndarray, blocks: list):
    """The matplotlib Figure of ``figure_ldp``: per block one row per pick, clean image then each ε."""
    from matplotlib.figure import Figure

    k = picks.size
    ncol = 1 + max(len(cols) for _, cols in blocks)
    nrow = k * len(blocks)
    fig = Figure(figsize=(1.25 * ncol + 0.6, 1.25 * nrow + 0.5), dpi=100, layout="constrained")
    axes = fig.subplots(nrow, ncol, squeeze=False)
    clean_imgs = np.asarray(clean.images[picks])
    for bi, (mech, cols) in enumerate(blocks):
        for r in range(k):
            row = bi * k + r
            panels = [("clean", clean_imgs[r])] + [(f"ε = {format_eps(e)}", imgs[r]) for e, imgs in cols]
            _grid_row(axes[row], panels, titled=r == 0)
            cls = clean.classes[int(clean.labels[picks[r]])]
            axes[row, 0].set_ylabel(f"{mech}\n{cls}" if r == 0 else cls, fontsize=8)
    fig.suptitle(f"{dataset}: clean vs local-DP derivatives", fontsize=10)
    return fig


def _grid_row(axes, panels: list[tuple[str, np.ndarray]], titled: bool) -> None:
    """Draw (label, image) ``panels`` into a row of ``axes``, titled when ``titled``; spare axes are hidden."""
    for ci, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if ci >= len(panels):
            ax.axis("off")
            continue
        label, img = panels[ci]
        ax.imshow(img, interpolation="nearest")
        if titled:
            ax.set_title(label, fontsize=8)
