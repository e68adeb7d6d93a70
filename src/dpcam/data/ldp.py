"""The ldp stage (`dpcam ldp`): a local-DP derivative of a prepared dataset, noised by one mechanism
at one ε, with a manifest that states its guarantee.

The mechanisms are in :mod:`dpcam.data.mechanisms`, their noise in :mod:`dpcam.data.noise`, the
derivative's ``samples.png`` and the clean-vs-ε grid in :mod:`dpcam.data.ldp_figure`.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from dpcam.config import LdpConfig
from dpcam.data import store
from dpcam.data.ldp_figure import _sample_indices, _samples_png
from dpcam.data.mechanisms import MECHANISMS, Mechanism, _check_epsilon
from dpcam.data.noise import NoiseSource
from dpcam.errors import UserError
from dpcam.layout import LDP_ROOT, format_eps, write_bytes

#: values (H·W·C) noised per batch: bounds the float64 noise buffers to ~8 MiB each
BATCH_VALUES = 1 << 20


def derive(
    dataset_dir: Path,
    mechanism: str,
    epsilon: float,
    cfg: LdpConfig,
    out_root: Path = LDP_ROOT,
    progress: bool = True,
) -> Path:
    """Write the local-DP derivative ``out_root/<dataset>/<mechanism>-eps<ε>/`` of a prepared dataset.

    Every image of ``dataset_dir`` is noised in batches of about ``BATCH_VALUES`` values (bounded
    memory; a progress bar when ``progress``); labels, masks (ground truth, copied unchanged) and
    splits are the source's. The manifest records the source (folder and manifest checksums), the
    mechanism with its parameters, its guarantee for this image size, ``secure`` and ``seed``
    (null when secure). Noise: ``NoiseSource(cfg.seed, stream=(mechanism, ε))``, so the same seed
    gives the same bytes, and each mechanism × ε gets its own independent stream; with
    ``cfg.secure`` it comes from OS entropy. Also writes ``samples.png`` (6 fixed images, clean
    above noised). Written atomically (``store.DatasetWriter``). Returns the output folder.
    """
    mechanism_class = MECHANISMS.lookup(mechanism)
    epsilon = _check_epsilon(epsilon, f"dpcam ldp {mechanism}")
    dataset_dir = Path(dataset_dir)
    src = _clean_source(dataset_dir)
    mech = mechanism_class.from_config(epsilon, cfg)
    name = str(src.manifest.get("dataset") or dataset_dir.name)
    out = Path(out_root) / name / f"{mechanism}-eps{format_eps(epsilon)}"
    noise = _derivative_noise(mechanism, epsilon, cfg)
    picks = _sample_indices(src.labels, 6)
    n, h, w, _ = src.images.shape
    with store.DatasetWriter(out, n, h, w, with_masks=src.masks is not None) as writer:
        desc = f"{name} {mechanism} ε={format_eps(epsilon)}"
        samples = _noise_into(writer, src, mech, noise, picks, desc, progress)
        manifest = _derivative_manifest(name, dataset_dir, src, mechanism, mech, cfg, picks)
        png = _samples_png(
            np.asarray(src.images[picks]),
            samples,
            f"{name}: clean (top) vs {mechanism} eps={format_eps(epsilon)} (bottom)",  # the bitmap font has no ε
        )
        writer.finish(src.labels, {k: v.copy() for k, v in src.splits.items()}, manifest)
    write_bytes(out / "samples.png", png)
    return out


def _clean_source(dataset_dir: Path) -> store.PreparedDataset:
    """The prepared dataset at ``dataset_dir``; UserError when there is none or it is itself a derivative."""
    if not (dataset_dir / "manifest.json").is_file():
        raise UserError(f"{dataset_dir}: no prepared dataset here (no manifest.json); run `dpcam prepare` first")
    src = store.load_dataset(dataset_dir)
    if src.manifest.get("kind") == "ldp":
        raise UserError(
            f"{dataset_dir}: is itself a local-DP derivative; "
            "derive from the prepared dataset in data/prepared/ instead"
        )
    return src


def _derivative_noise(mechanism: str, epsilon: float, cfg: LdpConfig) -> NoiseSource:
    """The noise of one derivative: seeded by ``cfg.seed`` on the stream of (mechanism, ε), or secure."""
    stream = (zlib.crc32(mechanism.encode()), zlib.crc32(format_eps(epsilon).encode()))
    return NoiseSource(None if cfg.secure else cfg.seed, secure=cfg.secure, stream=stream)


def _noise_into(
    writer: store.DatasetWriter,
    src: store.PreparedDataset,
    mech: Mechanism,
    noise: NoiseSource,
    picks: np.ndarray,
    desc: str,
    progress: bool,
) -> np.ndarray:
    """Fill ``writer`` with the noised images of ``src`` (masks copied), batch by batch in order, so the
    bytes do not depend on ``BATCH_VALUES``. Returns the noised images at ``picks``, uint8 (k, H, W, C)."""
    from tqdm import tqdm

    n, h, w, c = src.images.shape
    per_batch = max(1, BATCH_VALUES // (h * w * c))
    samples = np.empty((picks.size, h, w, c), np.uint8)
    with tqdm(total=n, unit="img", desc=desc, disable=None if progress else True) as bar:
        for start in range(0, n, per_batch):
            stop = min(n, start + per_batch)
            noised = mech.apply(np.asarray(src.images[start:stop]), noise)
            writer.images[start:stop] = noised
            if writer.masks is not None:
                writer.masks[start:stop] = src.masks[start:stop]
            inside = (picks >= start) & (picks < stop)
            samples[inside] = noised[picks[inside] - start]
            bar.update(stop - start)
    return samples


def _derivative_manifest(
    name: str,
    dataset_dir: Path,
    src: store.PreparedDataset,
    mechanism: str,
    mech: Mechanism,
    cfg: LdpConfig,
    picks: np.ndarray,
) -> dict[str, Any]:
    """The manifest fields of a derivative (``store.DatasetWriter.finish`` adds counts and checksums)."""
    _, h, w, c = src.images.shape
    return {
        "dataset": name,
        "kind": "ldp",
        "classes": src.classes,
        "image_size": src.manifest.get("image_size", h),
        "seed": None if cfg.secure else int(cfg.seed),
        "secure": bool(cfg.secure),
        "source": {"dataset_dir": str(dataset_dir), "manifest_checksums": src.manifest.get("checksums", {})},
        "mechanism": {"name": mechanism, "epsilon": mech.epsilon, **mech.params((h, w, c))},
        "guarantee": mech.guarantee((h, w, c)),
        "sample_indices": picks.tolist(),
    }
