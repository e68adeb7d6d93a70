"""Prepared-dataset format: atomic write, memory-mapped read, torch Dataset.

A prepared dataset is a folder::

    images.npy     uint8  (N, H, W, 3)   pixel values, memory-mappable (np.load(mmap_mode="r"))
    labels.npy     int64  (N,)
    masks.npy      uint8  (N, H, W)      binary lesion masks (0/1), only when the source has them
    splits.npz     int64 index arrays "train", "val", "test"
    groups.npy     int64  (N,)           the group (patient) of each image, only with prepare.groups; its
                                         names in manifest["groups"]["names"]
    manifest.json  source, counts, sizes, checksums, generator or mechanism parameters, guarantee

Everything is written into a temporary sibling folder and renamed into place at the end, so an
interrupted writer never leaves a half dataset where a reader would look.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dpcam import guard
from dpcam.errors import UserError
from dpcam.layout import replace_dir, reserve, temp_dir, writing

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name as ``\\xNN`` escapes: writable as UTF-8.

    Python decodes a file name that is not valid UTF-8 with lone surrogates (PEP 383: ``b'bad\\xff.png'``
    becomes ``'bad\\udcff.png'``), which no UTF-8 file or terminal accepts; this gives ``bad\\xff.png``,
    what ``ls -b`` shows. Valid text is returned unchanged.
    """
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def printable_json(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings, numbers) with every string made :func:`printable`."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable_json(k): printable_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [printable_json(v) for v in obj]
    return obj


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


class DatasetWriter:
    """Write a prepared dataset atomically.

    Use as a context manager; fill ``writer.images[i]`` (and ``writer.masks[i]``) in place, then
    call ``finish(labels, splits, manifest)``. If the block raises, the temporary folder is
    removed and the destination is left untouched.
    """

    def __init__(self, out_dir: str | Path, n: int, height: int, width: int, with_masks: bool):
        self.out_dir = Path(out_dir)
        self.images = self.masks = None
        self._done = False
        self._tmp = temp_dir(self.out_dir)
        # the memory maps take their whole size now: a full disk fails here, and the folder must not stay behind
        self.need = n * height * width * (4 if with_masks else 3)
        try:
            with writing(self.out_dir, self.need):
                self.images = np.lib.format.open_memmap(
                    self._tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, height, width, 3)
                )
                reserve(self._tmp / "images.npy")
                if with_masks:
                    self.masks = np.lib.format.open_memmap(
                        self._tmp / "masks.npy", mode="w+", dtype=np.uint8, shape=(n, height, width)
                    )
                    reserve(self._tmp / "masks.npy")
        except BaseException:
            self.abort()
            raise

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def abort(self) -> None:
        self.images = self.masks = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def finish(
        self,
        labels: np.ndarray,
        splits: dict[str, np.ndarray],
        manifest: dict[str, Any],
        groups: np.ndarray | None = None,
    ) -> Path:
        with writing(self.out_dir, self.need):
            return self._finish(labels, splits, manifest, groups)

    def _finish(
        self, labels: np.ndarray, splits: dict[str, np.ndarray], manifest: dict[str, Any], groups: np.ndarray | None
    ) -> Path:
        n = self.images.shape[0]
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (n,):
            raise ValueError(f"labels has shape {labels.shape}, expected ({n},)")
        if groups is not None:
            groups = np.asarray(groups, dtype=np.int64)
            if groups.shape != (n,):
                raise ValueError(f"groups has shape {groups.shape}, expected ({n},)")
            np.save(self._tmp / "groups.npy", groups)
        for name in SPLITS:
            idx = np.asarray(splits.get(name, np.empty(0, np.int64)), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= n):
                raise ValueError(f"split {name!r} indexes outside 0..{n - 1}")
            splits[name] = idx
        self.images.flush()
        if self.masks is not None:
            self.masks.flush()
        self.images = self.masks = None  # close the memmaps before hashing and renaming
        np.save(self._tmp / "labels.npy", labels)
        np.savez(self._tmp / "splits.npz", **{k: splits[k] for k in SPLITS})
        files = ["images.npy", "labels.npy", "splits.npz"] + [
            f for f in ("masks.npy", "groups.npy") if (self._tmp / f).exists()
        ]
        manifest = printable_json(dict(manifest))  # file and class names that are not UTF-8 (skip-bad records)
        manifest.setdefault("format_version", FORMAT_VERSION)
        manifest["count"] = int(n)
        manifest["splits"] = {
            name: {"count": int(splits[name].size), "per_class": _per_class(labels[splits[name]], manifest)}
            for name in SPLITS
        }
        manifest["checksums"] = {f: file_sha256(self._tmp / f) for f in files}
        with open(self._tmp / "manifest.json", "w") as f:
            json.dump(manifest, f, indent=2, ensure_ascii=False)
            f.write("\n")
        replace_dir(self._tmp, self.out_dir)
        self._done = True
        return self.out_dir


def _per_class(labels: np.ndarray, manifest: dict[str, Any]) -> dict[str, int]:
    classes = manifest.get("classes") or [str(c) for c in range(int(labels.max(initial=-1)) + 1)]
    counts = np.bincount(labels, minlength=len(classes))
    return {str(c): int(k) for c, k in zip(classes, counts)}


def grouped_split(groups: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split indices so that every group (patient) falls in one split, deterministically by seed: the groups in a
    seeded random order fill train, then val, then test, each up to its rounded cumulative share of the images
    (class balance is not kept: a patient's images cannot be divided)."""
    rng = np.random.default_rng(seed)
    ids = np.unique(groups)
    rng.shuffle(ids)
    sizes = np.bincount(groups)[ids]
    cuts = np.round(np.cumsum([fractions[name] for name in SPLITS]) * groups.size)
    ends = np.cumsum(sizes)
    at = np.minimum(np.searchsorted(cuts, ends - sizes / 2), len(SPLITS) - 1)  # a group goes where its middle falls
    return {name: np.sort(np.flatnonzero(np.isin(groups, ids[at == k]))) for k, name in enumerate(SPLITS)}


def stratified_split(labels: np.ndarray, fractions: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """Split indices per class in the given fractions (train/val/test), deterministically by seed.

    Each class is shuffled and cut at rounded cumulative fractions, so every split keeps the class
    balance of the whole set (up to one image per class).
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        cuts = np.round(np.cumsum([fractions[name] for name in SPLITS]) * idx.size).astype(int)
        start = 0
        for name, stop in zip(SPLITS, cuts):
            out[name].append(idx[start:stop])
            start = stop
    return {name: np.sort(np.concatenate(parts)) for name, parts in out.items()}


@dataclass
class PreparedDataset:
    """A prepared dataset opened for reading; ``images`` and ``masks`` are memory-mapped."""

    path: Path
    images: np.ndarray
    labels: np.ndarray
    masks: np.ndarray | None
    splits: dict[str, np.ndarray]
    manifest: dict[str, Any] = field(repr=False)
    groups: np.ndarray | None = None  # the group (patient) index of each image (prepare.groups), else None

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[1])

    def split(self, name: str, with_masks: bool = False) -> ImageDataset:
        if name not in self.splits:
            raise UserError(f"{self.path}: no split {name!r}; splits are {', '.join(self.splits)}")
        return ImageDataset(self, self.splits[name], with_masks=with_masks)


def load_dataset(path: str | Path) -> PreparedDataset:
    """Open a prepared dataset folder (no image decoding: arrays are memory-mapped)."""
    path = Path(path)
    manifest_path = path / "manifest.json"
    if not manifest_path.is_file():
        raise UserError(
            f"{path}: not a prepared dataset (no manifest.json); run `dpcam prepare` (or `dpcam ldp`) first"
        )
    fix = "prepare it again (`dpcam prepare`, or `dpcam ldp` for a local-DP derivative)"
    manifest = guard.read_json(manifest_path, fix=fix)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UserError(
            f"{manifest_path}: format_version {manifest.get('format_version')!r} is not {FORMAT_VERSION}; "
            "re-run `dpcam prepare` with this dpcam"
        )
    images = guard.read_npy(path / "images.npy", fix=fix, mmap=True, shape=(None, None, None, 3), dtype=np.uint8)
    n, h, w, _ = images.shape
    labels = guard.read_npy(path / "labels.npy", fix=fix, shape=(n,), dtype=np.integer)
    masks = (
        guard.read_npy(path / "masks.npy", fix=fix, mmap=True, shape=(n, h, w), dtype=np.uint8)
        if (path / "masks.npy").exists()
        else None
    )
    splits = guard.read_npz(path / "splits.npz", fix=fix, keys=SPLITS, shapes={k: (None,) for k in SPLITS})
    for name in SPLITS:
        idx = splits[name]
        if not np.issubdtype(idx.dtype, np.integer) or (idx.size and (idx.min() < 0 or idx.max() >= n)):
            raise guard.problem(path / "splits.npz", f"split {name!r} is not indices into the {n} images", fix)
    groups = (
        guard.read_npy(path / "groups.npy", fix=fix, shape=(n,), dtype=np.integer)
        if (path / "groups.npy").exists()
        else None
    )
    return PreparedDataset(path, images, labels, masks, splits, manifest, groups)


# ------------------------------------------------------------------------------------ a run and its data


def fingerprint(data: PreparedDataset) -> dict[str, Any]:
    """What a run records of the data it trained on (train.json's ``data_fingerprint``), to know it again: the
    SHA-256 of ``manifest.json`` (which holds every file's checksum), the image size, the manifest's seed (the split
    and generator seed of a prepared set; the noise seed of a local-DP derivative) and the image count."""
    return {
        "manifest_sha256": file_sha256(data.path / "manifest.json"),
        "image_size": data.image_size,
        "seed": data.manifest.get("seed"),
        "images": int(data.images.shape[0]),
    }


def _described(fp: dict[str, Any]) -> str:
    seed = fp.get("seed")
    return (
        f"manifest sha256 {str(fp.get('manifest_sha256'))[:12]}, {fp.get('image_size')} px, "
        f"{fp.get('images')} images, seed {'none' if seed is None else seed}"
    )


def data_change(run: str, recorded: dict[str, Any] | None, data: PreparedDataset, *, allow: bool) -> str | None:
    """Check that ``data`` is still the data run ``run`` was trained on (``recorded``: train.json's
    ``data_fingerprint``; None for a run trained before dpcam recorded it, which is not checked).

    The same data: None. Other data: a UserError naming both (a model scored on images of another size, or an
    audit whose "non-members" include the model's training images, would be silently wrong), unless ``allow``
    (``--allow-data-change``): then the sentence to note in the stage's record.
    """
    if not recorded:
        return None
    now = fingerprint(data)
    if all(recorded.get(k) == now[k] for k in now if k in recorded):
        return None
    what = (
        f"run {run} was trained on {data.path} as it was then ({_described(recorded)}); it now holds other data "
        f"({_described(now)})"
    )
    if allow:
        return f"data changed since training (--allow-data-change): {what}"
    raise UserError(
        f"{what}: the test split may include training images and the model may not fit the images; train the run "
        "again (`dpcam train`, or `dvc repro`), restore the data it was trained on, or pass --allow-data-change "
        "to go on anyway (the record notes it)"
    )


def check_run_data(run: str, data: PreparedDataset, *, allow: bool, image_size: int | None = None) -> str | None:
    """That ``data`` is the data trained run ``run`` was trained on, by its train.json's ``data_fingerprint``
    (:func:`data_change`); a run recorded before fingerprints is checked by its model's ``image_size`` only.
    None when it is; else UserError naming both, or with ``allow`` the note for the stage's record."""
    from dpcam import records
    from dpcam.layout import TRAIN_JSON, run_dir

    train_json = run_dir(run) / TRAIN_JSON
    recorded = (
        records.read(records.TrainRecord, train_json, f"run {run}").data_fingerprint if train_json.is_file() else None
    )
    if recorded is None and image_size not in (None, data.image_size):
        recorded = {**fingerprint(data), "image_size": image_size}
    return data_change(run, recorded, data, allow=allow)


class ImageDataset:
    """torch ``Dataset`` over one split: items are ``(x, y)`` (or ``(x, y, mask)``).

    ``x`` is float32 (3, H, W) in pixel space [0, 1] (models normalise internally, so Grad-CAM
    masking happens in pixel space as docs/metrics.md defines); ``y`` is an int64 scalar; ``mask`` is
    float32 (H, W) in {0, 1}. ``__getitems__`` fetches a whole batch with one fancy index, so a
    DataLoader never decodes or loops per image.
    """

    def __init__(self, ds: PreparedDataset, indices: np.ndarray, with_masks: bool = False):
        if with_masks and ds.masks is None:
            raise UserError(f"{ds.path}: this dataset has no lesion masks")
        self.ds = ds
        self.indices = np.asarray(indices, dtype=np.int64)
        self.with_masks = with_masks

    def __len__(self) -> int:
        return int(self.indices.size)

    @property
    def labels(self) -> np.ndarray:
        return self.ds.labels[self.indices]

    def batch(self, positions) -> tuple:
        """Tensors for the given positions within the split: x (B,3,H,W), y (B,), [mask (B,H,W)]."""
        import torch

        pos = np.asarray(positions, dtype=np.int64)
        idx = self.indices[pos]
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to the page cache
        sorted_idx = idx[order]
        inv = np.empty_like(order)
        inv[order] = np.arange(order.size)
        x = torch.from_numpy(np.ascontiguousarray(self.ds.images[sorted_idx][inv]))
        # contiguous NCHW, not a channels-last view: Opacus's hooks (unfold2d) read conv inputs as
        # contiguous and compute wrong per-example conv gradients from a permuted view
        x = x.permute(0, 3, 1, 2).contiguous().float().div_(255.0)
        y = torch.from_numpy(self.ds.labels[idx])
        if not self.with_masks:
            return x, y
        m = torch.from_numpy(np.ascontiguousarray(self.ds.masks[sorted_idx][inv])).float()
        return x, y, m

    def subset(self, n: int, seed: int = 0) -> ImageDataset:
        """``n`` images of this split drawn without replacement by ``seed`` (kept in file order)."""
        if not 1 <= n <= len(self):
            raise UserError(
                f"{self.ds.path}: cannot take {n} images from a split of {len(self)}; choose 1..{len(self)}"
            )
        pick = np.random.default_rng(seed).choice(len(self), size=n, replace=False)
        return ImageDataset(self.ds, np.sort(self.indices[pick]), with_masks=self.with_masks)

    def __getitem__(self, i: int):
        return tuple(t[0] for t in self.batch([i]))

    def __getitems__(self, positions: list[int]) -> tuple:
        """The whole batch as stacked tensors; pair with ``collate`` (``loader`` does)."""
        return self.batch(positions)

    def loader(self, batch_size: int, shuffle: bool = False, generator=None):
        """A DataLoader that fetches each batch with one memmap index (no per-image work)."""
        from torch.utils.data import DataLoader

        return DataLoader(self, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate)


def collate(batch):
    """Collate for ``ImageDataset``: batches from ``__getitems__`` arrive stacked already."""
    if isinstance(batch, tuple):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)
