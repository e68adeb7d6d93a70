"""Readers for real datasets in their native layouts: each lists the labelled image files of a source.

Layouts (``<source>`` is ``prepare.source``), one reader each in ``FORMATS_READERS``:

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
by the format allow-list of :mod:`dpcam.data.decode` rather than silently ignored); other files
(``Thumbs.db``, ``README``) and hidden files are ignored. Masks are matched to images by file stem.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

from PIL import Image

from dpcam.errors import UserError
from dpcam.registry import Registry

APTOS_CLASSES = ["0 no DR", "1 mild", "2 moderate", "3 severe", "4 proliferative"]
PET_CLASSES = ["cat", "dog"]


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
