"""``prepare`` from a real source: every listed image decoded once, in a process pool, into the
memory-mapped arrays of ``dpcam.data.store``; reading a split later never decodes an image file.

Bad images abort the run or, with ``skip_bad``, are left out and recorded; ``prepare.groups``
(patients) keep each patient's images in one split. The layouts are read by
:mod:`dpcam.data.readers`, each image decoded by :mod:`dpcam.data.decode`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from dpcam.data import store
from dpcam.data.decode import FUNDUS_MIN_SHARE, FUNDUS_THRESHOLD, REDUCING_GAP, BadImage, _decode, _one_line
from dpcam.data.readers import Item, Listing, _listing, _match_masks
from dpcam.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from dpcam.config import PrepareConfig

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# the decoding pool


def _work(task: tuple) -> tuple:
    """Pool task: ``(path, mask_path, size, fundus)`` -> ``("ok", image, mask)`` or ``("bad", file, reason)``."""
    path, mask_path, size, fundus = task
    try:
        image, mask = _decode(path, size, fundus, mask_path)
    except BadImage as e:
        return ("bad", e.path, e.reason)
    return ("ok", image, mask)


def _init_worker(max_pixels: int | None) -> None:
    Image.MAX_IMAGE_PIXELS = max_pixels  # the parent's limit, whatever the start method


def _mp_context():
    """``fork`` when this process runs no other Python thread (workers start in milliseconds and
    inherit everything), else ``forkserver`` with this module preloaded (a fork of a multi-threaded
    parent can deadlock), else ``spawn``. Workers get the parent's ``Image.MAX_IMAGE_PIXELS`` from
    ``_init_worker`` either way."""
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    if "forkserver" in methods:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["__main__", __name__])  # takes effect when the server first starts
        return ctx
    return multiprocessing.get_context("spawn")


@contextlib.contextmanager
def _decoded(tasks: list[tuple], workers: int, chunksize: int) -> Iterator[Iterator[tuple]]:
    """``_work`` over ``tasks``, results in task order; in-process for one worker, else a process pool.

    ``ProcessPoolExecutor`` reports a dead worker as ``BrokenProcessPool`` instead of hanging; on
    exit the queued chunks are cancelled and the running ones finish, so no process outlives it.
    """
    if workers <= 1:
        yield map(_work, tasks)
        return
    ex = ProcessPoolExecutor(
        workers, mp_context=_mp_context(), initializer=_init_worker, initargs=(Image.MAX_IMAGE_PIXELS,)
    )
    try:
        yield ex.map(_work, tasks, chunksize=chunksize)
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _n_workers(requested: int, n: int) -> int:
    if requested <= 0:
        requested = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(requested, n))


# ----------------------------------------------------------------------------------------------
# prepare


class _Progress(tqdm):
    """tqdm without its monitor thread, so a later pool in this process may still start by fork."""

    monitor_interval = 0


def _preprocessing_words(fundus: bool, size: int) -> str:
    geometry = (
        f"fundus: black border cropped (rows/columns with >= {FUNDUS_MIN_SHARE:.0%} of pixels above grey "
        f"{FUNDUS_THRESHOLD}), retina padded with black to a centred square"
        if fundus
        else "centre square crop"
    )
    return (
        f"EXIF orientation applied; converted to RGB; {geometry}; resized to {size}x{size} px with Pillow "
        f"LANCZOS (reducing_gap {REDUCING_GAP:g}); masks: same box, NEAREST, stored 0/1"
    )


def prepare_source(
    cfg: PrepareConfig,
    progress: bool = True,
    manifest_extra: dict[str, Any] | None = None,
    check: Callable[[np.ndarray], dict[str, Any]] | None = None,
) -> Path:
    """Decode a real source into ``data/prepared/<cfg.dataset>/`` and return that folder.

    Arrays: images uint8 (N, size, size, 3); labels int64 (N,) of the kept items in listing order;
    masks uint8 (N, size, size) in {0, 1} when ``cfg.masks`` is set (all zero for an image without a
    mask). Decoding runs in ``cfg.workers`` processes (0 = one per core) and streams in listing
    order into the writer's memory map. A bad image aborts with one ``UserError`` line (nothing is
    written) unless ``cfg.skip_bad``, which leaves it out and records it under ``skipped``; then the
    kept images are compacted into a second writer of the kept count (only when something was
    skipped). Structural problems (missing CSV, duplicate id_code, bad label, empty class folder)
    always abort. ``manifest_extra`` joins the manifest; ``check`` is called with the kept images before the
    folder is put in place (its dict joins the manifest; raising leaves nothing written).
    """
    from dpcam.layout import PREPARED_ROOT

    listing, skipped = _usable_listing(cfg)
    grouping = _groups_of(listing.items, cfg.groups) if cfg.groups is not None else None
    masks = _match_masks(listing.items, cfg.masks) if cfg.masks is not None else None
    fundus = cfg.format == "aptos"
    size = int(cfg.size)
    n = len(listing.items)
    tasks = [(it.path, masks[i] if masks else None, size, fundus) for i, it in enumerate(listing.items)]
    out_dir = PREPARED_ROOT / cfg.dataset
    with store.DatasetWriter(out_dir, n, size, size, with_masks=masks is not None) as writer:
        kept, n_masked = _decode_into(writer, tasks, listing, cfg, skipped, progress)
        labels = _kept_labels(
            [listing.items[i].label for i in kept], skipped, cfg.source, n + len(listing.missing), out_dir
        )
        groups = grouping[0][kept] if grouping is not None else None
        splits = (
            store.grouped_split(groups, cfg.split.model_dump(), cfg.seed)
            if groups is not None
            else store.stratified_split(labels, cfg.split.model_dump(), cfg.seed)
        )
        manifest = {
            "dataset": cfg.dataset,
            "kind": "prepared",
            "source": {"format": cfg.format, "path": str(cfg.source), "files": n + len(listing.missing)},
            "classes": listing.classes,
            "image_size": size,
            "seed": cfg.seed,
            "split_fractions": cfg.split.model_dump(),
            "preprocessing": _preprocessing_words(fundus, size),
            "skipped": skipped,
            "masks": n_masked if masks is not None else None,
            **({"groups": _group_manifest(cfg.groups, grouping[1], groups)} if groups is not None else {}),
            **(manifest_extra or {}),
        }
        if labels.size == n:
            if check is not None:
                manifest.update(check(writer.images))
            return writer.finish(labels, splits, manifest, groups)
        return _compacted(writer, out_dir, labels, splits, manifest, check, groups)


def _read_groups(path: Path) -> dict[str, str]:
    """``prepare.groups``: a CSV with columns ``image`` (the file name without extension; APTOS: id_code) and
    ``group`` (the patient); one line naming the row for a missing column, an empty id or an image listed twice."""
    import csv

    where = f"prepare.groups {path}"
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(
            f"{where}: cannot be read ({_one_line(e)}); give a UTF-8 CSV with columns image,group"
        ) from None
    if not {"image", "group"} <= set(header):
        raise UserError(f"{where}: needs the columns image and group (has {', '.join(header) or 'none'})")
    table: dict[str, str] = {}
    for r, row in enumerate(rows, start=2):
        image, group = (row.get("image") or "").strip(), (row.get("group") or "").strip()
        if not image or not group:
            raise UserError(
                f"{where}: row {r} has an empty {'image' if not image else 'group'}; give every image its patient id"
            )
        if image in table:
            raise UserError(f"{where}: row {r} lists image {image!r} again; one row per image")
        table[image] = group
    return table


def _groups_of(items: list[Item], path: Path) -> tuple[np.ndarray, list[str]]:
    """The group index of every listed item and the group names (UserError naming an image without a group)."""
    table = _read_groups(path)
    names = sorted(set(table.values()))
    code = {g: i for i, g in enumerate(names)}
    out = np.empty(len(items), dtype=np.int64)
    for i, it in enumerate(items):
        key = it.path.stem
        if key not in table:
            raise UserError(
                f"prepare.groups {path}: no group for image {key} ({it.path}); add a row {key},<patient id>"
            )
        out[i] = code[table[key]]
    return out, names


def _group_manifest(path: Path, names: list[str], groups: np.ndarray) -> dict[str, Any]:
    counts = np.bincount(groups, minlength=len(names))
    return {
        "file": str(path),
        "sha256": store.file_sha256(path),
        "count": int(np.count_nonzero(counts)),
        "largest": int(counts.max()),
        "names": names,
    }


def _usable_listing(cfg: PrepareConfig) -> tuple[Listing, list[dict[str, str]]]:
    """The listing of ``cfg.source`` and its missing images as ``skipped`` records ({file, reason}).

    UserError when there is no source, when an image is missing and ``cfg.skip_bad`` is off, and when
    every image is missing.
    """
    if cfg.source is None:
        raise UserError(f"prepare.source is required for format {cfg.format!r}: set it to the dataset folder")
    listing = _listing(cfg.format, cfg.source)
    if listing.missing and not cfg.skip_bad:
        raise UserError(
            store.printable(f"{listing.missing[0][1]}; add the image or delete the row, or rerun with --skip-bad")
        )
    skipped = [{"file": store.printable(str(p)), "reason": store.printable(msg)} for p, msg in listing.missing]
    if not listing.items:
        raise UserError(f"{cfg.source}: every listed image is missing ({len(skipped)}); check prepare.source")
    return listing, skipped


def _decode_into(
    writer: store.DatasetWriter,
    tasks: list[tuple],
    listing: Listing,
    cfg: PrepareConfig,
    skipped: list[dict[str, str]],
    progress: bool,
) -> tuple[list[int], int]:
    """Decode ``tasks`` (one per listed item, see ``_work``) into ``writer``'s first rows, in order.

    A bad image raises (``_skip_or_raise``) or is appended to ``skipped``. Returns the listing positions of
    the kept images and how many of them got a mask. A dead worker process is one UserError line.
    """
    items, n = listing.items, len(tasks)
    workers = _n_workers(cfg.workers, n)
    chunksize = max(1, min(32, n // (workers * 8)))
    kept: list[int] = []
    n_masked = done = 0
    with (
        _decoded(tasks, workers, chunksize) as results,
        _Progress(
            total=n,
            desc=f"prepare {cfg.dataset}",
            unit="img",
            file=sys.stderr,
            disable=None if progress else True,
            dynamic_ncols=True,
        ) as bar,
    ):
        try:
            for i, res in enumerate(results):
                done = i + 1
                bar.update()
                if res[0] == "bad":
                    skipped.append(_skip_or_raise(res[1], res[2], cfg.skip_bad, listing.context.get(items[i].path)))
                    continue
                n_masked += _store_decoded(writer, len(kept), res[1], res[2])
                kept.append(i)
        except BrokenProcessPool:
            raise UserError(
                f"a decoding process died (an image decoder crashed, or memory ran out) after {done} of {n} "
                f"images, near {items[min(done, n - 1)].path}; rerun with --workers 1 to find the file"
            ) from None
    return kept, n_masked


def _skip_or_raise(bad_file: Path, reason: str, skip_bad: bool, where: str | None) -> dict[str, str]:
    """The ``skipped`` record of a bad image, or (without ``skip_bad``) its UserError, prefixed by ``where``.

    A file name that is not valid UTF-8 is recorded and shown with ``\\xNN`` escapes (:func:`store.printable`).
    """
    if not skip_bad:
        prefix = f"{where}: " if where else ""
        raise UserError(
            store.printable(f"{prefix}{bad_file}: {reason}; replace or remove the file, or rerun with --skip-bad")
        )
    return {"file": store.printable(str(bad_file)), "reason": store.printable(reason)}


def _store_decoded(writer: store.DatasetWriter, k: int, image: np.ndarray, mask: np.ndarray | None) -> int:
    """Write a decoded image (and its mask, zeros without one) to row ``k``; 1 when a mask was stored, else 0."""
    writer.images[k] = image
    if writer.masks is None:
        return 0
    writer.masks[k] = 0 if mask is None else mask
    return int(mask is not None)


def _kept_labels(
    kept_labels: list[int], skipped: list[dict[str, str]], source: Path, files: int, out_dir: Path
) -> np.ndarray:
    """The kept labels as int64; UserError when nothing was kept; a warning when something was skipped."""
    if not kept_labels:
        raise UserError(
            f"{source}: all {len(skipped)} images are bad (first: {skipped[0]['file']}: {skipped[0]['reason']}); "
            "nothing to prepare"
        )
    if skipped:
        log.warning(
            "skipped %d of %d images (bad or missing); see 'skipped' in %s/manifest.json", len(skipped), files, out_dir
        )
    return np.asarray(kept_labels, dtype=np.int64)


def _compacted(
    full: store.DatasetWriter, out_dir: Path, labels: np.ndarray, splits, manifest, check=None, groups=None
) -> Path:
    """Copy the first ``len(labels)`` rows of ``full`` into a writer of that size and finish it (the
    dataset of a run that skipped images); ``full`` is left to be discarded."""
    kept, size = labels.size, full.images.shape[1]
    with store.DatasetWriter(out_dir, kept, size, size, with_masks=full.masks is not None) as compact:
        step = max(1, (64 << 20) // (size * size * 3))  # copy ~64 MiB at a time
        for s in range(0, kept, step):
            e = min(kept, s + step)
            compact.images[s:e] = full.images[s:e]
            if compact.masks is not None:
                compact.masks[s:e] = full.masks[s:e]
        if check is not None:
            manifest.update(check(compact.images))
        return compact.finish(labels, splits, manifest, groups)
