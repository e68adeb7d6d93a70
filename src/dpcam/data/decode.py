"""Decoding one image file (and its mask) as ``prepare`` stores it: checked, oriented, cropped, resized.

Images are decoded with Pillow only after their *decoded* format is checked against
``ALLOWED_FORMATS``; truncated files are errors (``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set)
and so are images above ``Image.MAX_IMAGE_PIXELS``. A file that cannot be used raises ``BadImage``.
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dpcam.errors import UserError

ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
FUNDUS_THRESHOLD = 10  # grey level (0-255) above which a pixel belongs to the retina
FUNDUS_MIN_SHARE = 0.01  # a row/column is retina when this share of its pixels is above the threshold
RESAMPLE = Image.Resampling.LANCZOS
REDUCING_GAP = 3.0  # Pillow first box-reduces by an integer factor, then resamples the last ≤ 3x


class BadImage(UserError):
    """An image file that cannot be used: unreadable, truncated, disallowed format, too large."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):
        return (BadImage, (self.path, self.reason))


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
