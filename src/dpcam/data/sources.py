"""Readers for real datasets in their native layouts, and ``prepare`` from them.

Layouts (``<source>`` is ``prepare.source``):

- ``aptos``: APTOS 2019 Kaggle: ``<source>/train.csv`` (columns ``id_code,diagnosis``, UTF-8 with or
  without BOM) and ``<source>/train_images/<id_code>.png`` (another allowed extension is accepted
  when no ``.png`` exists). Classes are grades 0-4.
- ``catsdogs``: Kaggle Dogs vs Cats: ``<source>/train/cat.123.jpg``, ``dog.45.jpg`` (or those files
  directly in ``<source>``). Classes ``cat``, ``dog``.
- ``petimages``: Microsoft PetImages: ``<source>/Cat/*``, ``<source>/Dog/*`` (or
  ``<source>/PetImages/Cat`` ...). Classes ``cat``, ``dog``.
- ``imagefolder``: one subfolder per class; sorted folder names become labels 0..K-1; images are
  found recursively inside each class folder.

A file counts as an image when Pillow knows its extension (so a ``.gif`` is listed and then refused
by the format allow-list rather than silently ignored); other files (``Thumbs.db``, ``README``) and
hidden files are ignored. Images are decoded with Pillow only after their *decoded* format is
checked against ``ALLOWED_FORMATS``; truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES``
is never set) and so are images above ``Image.MAX_IMAGE_PIXELS``.

``prepare_source`` decodes every image once, in a process pool, into the memory-mapped arrays of
``dpcam.data.store``; reading a split later never decodes an image file.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import multiprocessing
import os
import re
import struct
import sys
import threading
import warnings
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from dpcam.data import store
from dpcam.errors import UserError
from dpcam.registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    from dpcam.config import PrepareConfig

log = logging.getLogger(__name__)

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
APTOS_CLASSES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
PET_CLASSES = ["cat", "dog"]
FUNDUS_THRESHOLD = 10  # grey level (0-255) above which a pixel belongs to the retina
FUNDUS_MIN_SHARE = 0.01  # a row/column is retina when this share of its pixels is above the threshold
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # Pillow first box-reduces by an integer factor, then resamples the last ≤ 3x


class Item(NamedTuple):
    """One listed image: its file and its integer label."""

    path: Path
    label: int


class Listing(NamedTuple):
    """What a reader found.

    ``context`` maps an image path to where it was named (e.g. ``train.csv row 7 (id_code 'x')``) for
    error messages; ``missing`` lists ``(path, message)`` for listed images whose file does not exist.
    """

    items: list[Item]
    classes: list[str]
    context: dict[Path, str]
    missing: list[tuple[Path, str]]


class BadImage(UserError):
    """An image file that cannot be used: unreadable, truncated, disallowed format, too large."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):
        return (BadImage, (self.path, self.reason))


# ----------------------------------------------------------------------------------------------
# listing


def _image_exts() -> frozenset[str]:
    Image.init()
    return frozenset(Image.registered_extensions())


IMAGE_EXTS = _image_exts()


def _natural_key(name: str) -> tuple:
    """Sort key putting ``cat.2`` before ``cat.10``; ties broken by the plain name."""
    parts = re.split(r"(\d+)", name.lower())
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), name


def _is_image_name(p: Path) -> bool:
    return not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTS


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (see module docstring), in natural order of their relative path."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    files = [
        p
        for p in found
        if _is_image_name(p) and p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    ]
    return sorted(files, key=lambda p: _natural_key(p.relative_to(folder).as_posix()))


def _check_source(source: Path) -> Path:
    source = Path(source)
    if not source.exists():
        raise UserError(f"source {str(source)!r} does not exist; point prepare.source (--source) at the dataset folder")
    if not source.is_dir():
        raise UserError(
            f"source {str(source)!r} is not a folder; point prepare.source (--source) at the dataset folder"
        )
    return source


FORMATS_READERS: Registry[Callable[[Path], Listing]] = Registry("source format")  # @FORMATS_READERS.register(fmt)


@FORMATS_READERS.register("aptos")
def list_aptos(source: Path) -> Listing:
    """APTOS 2019: ``train.csv`` (``id_code,diagnosis``) + ``train_images/<id_code>.png``.

    CSV errors (missing file or columns, no rows, a grade outside 0-4, a duplicate id_code) raise
    ``UserError`` naming the CSV row (spreadsheet numbering: the header is row 1). A row whose image
    is missing goes to ``missing``.
    """
    csv_path, img_dir = _aptos_layout(_check_source(source))
    by_stem = _aptos_images(img_dir)
    items: list[Item] = []
    context: dict[Path, str] = {}
    missing: list[tuple[Path, str]] = []
    seen: dict[str, int] = {}
    for r, id_code, value in _aptos_rows(csv_path):
        where = _check_aptos_row(csv_path, r, id_code, value, seen)
        path = by_stem.get(id_code, img_dir / f"{id_code}.png")
        context[path] = where
        if path.stem in by_stem:
            items.append(Item(path, int(value)))
        else:
            missing.append((path, f"{where}: image {path} not found"))
    if not seen:
        raise UserError(f"{csv_path}: has no data rows; it needs one row per image (id_code,diagnosis)")
    return Listing(items, list(APTOS_CLASSES), context, missing)


def _aptos_layout(source: Path) -> tuple[Path, Path]:
    """``source/train.csv`` and ``source/train_images/``; UserError when either is absent."""
    csv_path = source / "train.csv"
    img_dir = source / "train_images"
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: not found; the APTOS layout is <source>/train.csv + <source>/train_images/")
    if not img_dir.is_dir():
        raise UserError(f"{img_dir}: not found; the APTOS layout is <source>/train.csv + <source>/train_images/")
    return csv_path, img_dir


def _aptos_images(img_dir: Path) -> dict[str, Path]:
    """The images of ``img_dir`` by stem; for a stem with several files a ``.png`` is preferred, else the first."""
    by_stem: dict[str, Path] = {}
    for p in _images_in(img_dir, recursive=False):
        if p.stem not in by_stem or p.suffix.lower() == ".png":
            by_stem[p.stem] = p
    return by_stem


def _aptos_rows(csv_path: Path) -> Iterator[tuple[int, str, str]]:
    """``(row number, id_code, diagnosis)`` of each non-blank data row, cells stripped ("" when absent).

    UserError for a header without ``id_code`` or ``diagnosis``, a file that is not UTF-8 (a BOM is
    allowed) and a malformed CSV.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [h.strip() for h in next(reader, [])]
            absent = [c for c in ("id_code", "diagnosis") if c not in header]
            if absent:
                raise UserError(
                    f"{csv_path}: missing column(s) {', '.join(absent)} (header is {','.join(header) or 'empty'}); "
                    "the APTOS CSV needs id_code,diagnosis"
                )
            i_id, i_dx = header.index("id_code"), header.index("diagnosis")
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                id_code = row[i_id].strip() if i_id < len(row) else ""
                value = row[i_dx].strip() if i_dx < len(row) else ""
                yield reader.line_num, id_code, value
    except UnicodeDecodeError as e:
        raise UserError(f"{csv_path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except csv.Error as e:
        raise UserError(f"{csv_path}: not a valid CSV ({e}); fix the file") from None


def _check_aptos_row(csv_path: Path, r: int, id_code: str, value: str, seen: dict[str, int]) -> str:
    """Where row ``r`` is (for messages), after checking its id_code (not empty, not in ``seen``, which
    it joins) and its grade (0-4); UserError otherwise."""
    where = f"{csv_path} row {r} (id_code {id_code!r})"
    if not id_code:
        raise UserError(f"{csv_path} row {r}: empty id_code; fill it in or delete the row")
    if id_code in seen:
        raise UserError(f"{where}: duplicate id_code, first seen in row {seen[id_code]}; keep one row per image")
    seen[id_code] = r
    if not re.fullmatch(r"[0-4]", value):
        raise UserError(f"{where}: diagnosis {value!r} is not a grade 0-4; fix the label")
    return where


@FORMATS_READERS.register("catsdogs")
def list_catsdogs(source: Path) -> Listing:
    """Kaggle Dogs vs Cats: ``train/cat.<n>.jpg`` / ``dog.<n>.jpg`` (or the files directly in source)."""
    source = _check_source(source)
    folder = source / "train" if (source / "train").is_dir() else source
    items: list[Item] = []
    for p in _images_in(folder, recursive=False):
        kind = p.name.split(".", 1)[0].lower()
        if kind not in PET_CLASSES:
            raise UserError(
                f"{p}: cannot tell cat from dog (Kaggle names are cat.<n>.jpg / dog.<n>.jpg); "
                "rename or move the file, or use --format imagefolder"
            )
        items.append(Item(p, PET_CLASSES.index(kind)))
    for c, name in enumerate(PET_CLASSES):
        if not any(it.label == c for it in items):
            raise UserError(
                f"{folder}: no {name}.*.jpg images; the Kaggle layout is <source>/train/cat.<n>.jpg, dog.<n>.jpg"
            )
    return Listing(items, list(PET_CLASSES), {}, [])


def _class_folder_items(folders: list[Path]) -> list[Item]:
    items: list[Item] = []
    for label, folder in enumerate(folders):
        files = _images_in(folder, recursive=True)
        if not files:
            raise UserError(f"{folder}: class folder has no images; add images or remove the folder")
        items.extend(Item(p, label) for p in files)
    return items


@FORMATS_READERS.register("petimages")
def list_petimages(source: Path) -> Listing:
    """Microsoft PetImages: ``Cat/*.jpg`` and ``Dog/*.jpg`` in source or in ``source/PetImages``."""
    source = _check_source(source)
    root = source / "PetImages" if (source / "PetImages").is_dir() else source
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    folders = []
    for name in PET_CLASSES:
        if name not in subdirs:
            raise UserError(
                f"{root}: no {name.capitalize()}/ folder; "
                "the PetImages layout is <source>/Cat/*.jpg, <source>/Dog/*.jpg"
            )
        folders.append(subdirs[name])
    return Listing(_class_folder_items(folders), list(PET_CLASSES), {}, [])


@FORMATS_READERS.register("imagefolder")
def list_imagefolder(source: Path) -> Listing:
    """Generic ImageFolder: one subfolder per class; sorted folder names are labels 0..K-1."""
    source = _check_source(source)
    folders = sorted((p for p in source.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if len(folders) < 2:
        raise UserError(
            f"{source}: found {len(folders)} class folder(s); "
            "an ImageFolder source needs one subfolder per class (at least 2)"
        )
    return Listing(_class_folder_items(folders), [p.name for p in folders], {}, [])


def _listing(fmt: str, source: Path) -> Listing:
    return FORMATS_READERS.lookup(fmt)(Path(source))


def list_items(fmt: str, source: Path) -> tuple[list[Item], list[str]]:
    """The labelled images of ``source`` in layout ``fmt`` and the class names (label i = classes[i]).

    Raises ``UserError`` for a structural problem and for the first listed image that does not exist.
    """
    listing = _listing(fmt, source)
    if listing.missing:
        _, message = listing.missing[0]
        raise UserError(f"{message}; add the image or delete the row, or rerun with --skip-bad")
    return listing.items, listing.classes


def _mask_index(folder: Path) -> dict[str, Path]:
    """Mask files of ``folder`` (flat) by stem; two masks with one stem are an error."""
    index: dict[str, Path] = {}
    for p in _images_in(folder, recursive=False):
        if p.stem in index:
            raise UserError(f"{folder}: masks {index[p.stem].name} and {p.name} share the name {p.stem!r}; keep one")
        index[p.stem] = p
    return index


def _match_masks(items: list[Item], folder: Path) -> list[Path | None]:
    index = _mask_index(folder)
    owner: dict[str, Path] = {}
    out: list[Path | None] = []
    for it in items:
        m = index.get(it.path.stem)
        if m is not None:
            if it.path.stem in owner and owner[it.path.stem] != it.path:
                raise UserError(
                    f"mask {m} matches both {owner[it.path.stem]} and {it.path}; masks are matched by file stem, "
                    "so give those images unique names"
                )
            owner[it.path.stem] = it.path
        out.append(m)
    if not any(m is not None for m in out):
        raise UserError(
            f"masks folder {folder}: no mask is named like any image (mask <stem>.png for image <stem>.jpg)"
        )
    return out


# ----------------------------------------------------------------------------------------------
# decoding


# what Pillow raises for a corrupt file (Image.open lets a plugin's OSError through, e.g. a cut PNG chunk)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError, TypeError)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _identify(path: Path) -> str:
    """Why a file that is not one of ALLOWED_FORMATS was refused (opens the header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as im:
                fmt = im.format
    except Exception:
        return f"not an image Pillow can read (not {', '.join(ALLOWED_FORMATS)})"
    return f"image format {fmt} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})"


def _open(path: Path) -> Image.Image:
    """Open with the format allow-list and the decompression-bomb limit as hard errors."""
    try:
        im = Image.open(path, formats=ALLOWED_FORMATS)
    except FileNotFoundError:
        raise BadImage(path, "file not found") from None
    except UnidentifiedImageError:
        raise BadImage(path, _identify(path)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(path, f"larger than Pillow's decompression-bomb limit ({_one_line(e)})") from None
    except _DECODE_ERRORS as e:  # a plugin that recognised the header may still fail on what follows
        raise BadImage(path, f"cannot decode ({_one_line(e)})") from None
    if im.format not in ALLOWED_FORMATS:  # defensive: formats= already restricts the plugins tried
        im.close()
        raise BadImage(path, f"image format {im.format} is not allowed (allowed: {', '.join(ALLOWED_FORMATS)})")
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.width * im.height > limit:
        im.close()
        raise BadImage(
            path, f"{im.width}x{im.height} pixels is larger than Pillow's decompression-bomb limit ({limit} pixels)"
        )
    return im


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB. 16-bit grey (modes I;16*, or I with values above 255) keeps its top 8 bits instead
    of being clipped to white as a plain ``convert("RGB")`` would."""
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I"):
        a = np.asarray(im)
        if im.mode.startswith("I;16") or int(a.max(initial=0)) > 255:
            a = a.astype(np.int64) >> 8
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def _fundus_bbox(im: Image.Image) -> tuple[int, int, int, int]:
    """Bounding box (left, top, right, bottom) of the retina in an RGB image.

    A row (column) belongs to the retina when at least FUNDUS_MIN_SHARE of its pixels have grey
    level > FUNDUS_THRESHOLD, judged on every k-th row and column (k keeps about 256 samples on the
    short side; the box is exact to k pixels). A black image keeps its full box.
    """
    k = max(1, min(im.size) // 256)
    bright = np.asarray(im.convert("L"))[::k, ::k] > FUNDUS_THRESHOLD  # bool (ceil(h/k), ceil(w/k))
    rows = np.flatnonzero(bright.sum(axis=1) >= max(1.0, FUNDUS_MIN_SHARE * bright.shape[1]))
    cols = np.flatnonzero(bright.sum(axis=0) >= max(1.0, FUNDUS_MIN_SHARE * bright.shape[0]))
    if rows.size == 0 or cols.size == 0:
        return 0, 0, im.width, im.height
    return (
        int(cols[0]) * k,
        int(rows[0]) * k,
        min(im.width, int(cols[-1]) * k + 1),
        min(im.height, int(rows[-1]) * k + 1),
    )


def _square_box(w: int, h: int, bbox: tuple[int, int, int, int] | None) -> tuple[float, float, float, float]:
    """Square box: padded around ``bbox`` when given (may leave the image), else the centre crop."""
    if bbox is None:
        side = min(w, h)
        cx, cy = w / 2, h / 2
    else:
        left, t, r, b = bbox
        side = max(r - left, b - t)
        cx, cy = (left + r) / 2, (t + b) / 2
    return cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2


def _resize_box(im: Image.Image, box, size: int, resample, reducing_gap: float | None) -> Image.Image:
    """``im`` cut to ``box`` (black outside the image) and resized to (size, size)."""
    if box[0] >= 0 and box[1] >= 0 and box[2] <= im.width and box[3] <= im.height:
        return im.resize((size, size), resample, box=box, reducing_gap=reducing_gap)
    cut = im.crop(tuple(int(round(v)) for v in box))  # Pillow fills outside the image with 0
    return cut.resize((size, size), resample, reducing_gap=reducing_gap)


def _decode(path: Path, size: int, fundus: bool, mask_path: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode one image (and its mask) to uint8 (size, size, 3) (and uint8 (size, size) in {0, 1}).

    Geometry: EXIF orientation applied; with ``fundus`` the black border is cropped (``_fundus_bbox``)
    and the retina's box is padded with black to a centred square; otherwise the centre square is
    cut. The square is resized with LANCZOS (reducing_gap 3). JPEGs are decoded at a reduced scale
    (``Image.draft``) when that still leaves at least ``size`` (fundus: 2·size) pixels on the short
    side. The mask gets the same box, resized with NEAREST.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with _open(path) as im:
            try:
                ow, oh = im.size
                scale = 1.0
                if im.format == "JPEG":
                    need = size * (2 if fundus else 1)
                    if min(ow, oh) >= 2 * need:
                        drafted = im.draft(
                            "RGB", (math.ceil(ow * need / min(ow, oh)), math.ceil(oh * need / min(ow, oh)))
                        )
                        if drafted is not None:
                            scale = ow / drafted[1][2]
                im.load()
                pre = im.size
                ImageOps.exif_transpose(im, in_place=True)
                if im.size != pre:  # rotated by 90 degrees
                    ow, oh = oh, ow
                rgb = _to_rgb(im)
                box = _square_box(rgb.width, rgb.height, _fundus_bbox(rgb) if fundus else None)
                out = np.asarray(_resize_box(rgb, box, size, RESAMPLE, REDUCING_GAP), dtype=np.uint8)
            except BadImage:
                raise
            except _DECODE_ERRORS as e:
                raise BadImage(path, f"cannot decode ({_one_line(e)})") from None
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise BadImage(path, f"larger than Pillow's decompression-bomb limit ({_one_line(e)})") from None
        if mask_path is None:
            return out, None
        with _open(mask_path) as m:
            try:
                m.load()
                ImageOps.exif_transpose(m, in_place=True)
                if m.size != (ow, oh):
                    raise BadImage(mask_path, f"mask is {m.width}x{m.height} but its image {path.name} is {ow}x{oh}")
                grey = np.asarray(m.convert("L"))
            except BadImage:
                raise
            except _DECODE_ERRORS as e:
                raise BadImage(mask_path, f"cannot decode mask ({_one_line(e)})") from None
        on = grey > 0 if int(grey.max(initial=0)) <= 1 else grey >= 128
        binary = Image.fromarray(on.astype(np.uint8) * 255)
        full_box = tuple(v * scale for v in box)
        mask = np.asarray(_resize_box(binary, full_box, size, Image.Resampling.NEAREST, None)) > 0
        return out, mask.astype(np.uint8)


def load_image(path: Path, size: int, fundus: bool = False) -> np.ndarray:
    """Decode ``path`` to uint8 (size, size, 3) RGB as ``prepare`` stores it.

    ``fundus``: crop the black border, pad the retina to a centred black square, resize; otherwise
    centre square crop and resize (see ``_decode``). Raises ``BadImage(path, reason)`` for a
    missing, unreadable, truncated, disallowed-format or over-limit (``Image.MAX_IMAGE_PIXELS``) file.
    """
    return _decode(Path(path), int(size), bool(fundus), None)[0]


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
