"""Every input file dpcam reads goes through this door: JSON, ``.npy``, ``.npz`` and torch files.

A file that is missing, empty, truncated, not of its format, or of the wrong shape or dtype is one
:class:`~dpcam.errors.UserError` naming the file, what is wrong with it and how to make it again
(``fix``), instead of a ``BadZipFile``, a numpy reshape error or a 100-line traceback::

    models/gaussian/r/train.json: empty (0 bytes); run its stage again (`dvc repro`, ...)
    metrics/gaussian/r/maps.npy: truncated (1200 of the 5128 bytes its header declares); run ...
    metrics/gaussian/r/maps.npy has shape (40, 16, 16), expected (50, 16, 16); run ...
    metrics/gaussian/r/per_image.npz: not a readable .npz archive (truncated or overwritten: BadZipFile); run ...

The functions take ``fix`` (what to do, e.g. "run `dpcam explain r` again") and ``who`` (an optional
prefix such as ``"grid run r: "``), so the caller says how its file is made. A ``.npy`` file's size is
checked against the shape and dtype its header declares before it is read or memory-mapped (a
truncated memory map would fail later, somewhere in the middle of a stage). ``shape`` is a tuple of
ints and ``None`` (any length on that axis).

The ground floor of the package: it imports only :mod:`dpcam.errors` (numpy and torch on use).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from dpcam.errors import UserError

Shape = Sequence[int | None]


def problem(path: Path | str, what: str, fix: str, who: str = "") -> UserError:
    """The one line for an input file that cannot be used: ``<who><path>: <what>; <fix>`` (``<path> is ...`` and
    ``<path> has ...`` without the colon)."""
    sep = " " if what.startswith(("is ", "has ", "holds ")) else ": "
    return UserError(f"{who}{path}{sep}{what}; {fix}")


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__


def _size(path: Path, fix: str, who: str) -> int:
    """The file's size in bytes; UserError when it is missing, not a file, or empty."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{who}missing {path}; {fix}") from None
    except OSError as e:
        raise problem(path, f"cannot be read ({e.strerror or type(e).__name__})", fix, who) from None
    if not path.is_file():
        raise problem(path, "is not a file", fix, who)
    if st.st_size == 0:
        raise problem(path, "empty (0 bytes)", fix, who)
    return st.st_size


# ------------------------------------------------------------------------------------ JSON


def read_json(path: Path | str, *, fix: str, who: str = "", kind: type | None = dict) -> Any:
    """The JSON value of ``path`` (an object unless ``kind`` says otherwise; None accepts any value).

    UserError for a missing, empty, truncated or invalid file, or one that holds another kind of value.
    """
    path = Path(path)
    _size(path, fix, who)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise problem(path, "is not valid JSON (not UTF-8 text)", fix, who) from None
    except OSError as e:
        raise problem(path, f"cannot be read ({e.strerror or type(e).__name__})", fix, who) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        cut = " (truncated?)" if e.pos >= len(text.rstrip()) else ""
        raise problem(
            path, f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}{cut})", fix, who
        ) from None
    if kind is not None and not isinstance(value, kind):
        name = {dict: "a JSON object", list: "a JSON list"}.get(kind, kind.__name__)
        raise problem(path, f"is not {name}", fix, who)
    return value


# ------------------------------------------------------------------------------------ numpy


def _shape_text(shape: Shape) -> str:
    dims = ["any" if d is None else str(d) for d in shape]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def check_array(
    array, path: Path | str, *, fix: str, who: str = "", shape: Shape | None = None, dtype: Any = None
) -> None:
    """UserError unless ``array`` (read from ``path``) has ``shape`` (None: any length on that axis) and a dtype
    of the kind of ``dtype`` (``np.integer``, ``np.floating``, or one dtype)."""
    import numpy as np

    if shape is not None:
        ok = array.ndim == len(shape) and all(want is None or have == want for have, want in zip(array.shape, shape))
        if not ok:
            raise problem(path, f"has shape {tuple(array.shape)}, expected {_shape_text(shape)}", fix, who)
    if dtype is not None:
        abstract = isinstance(dtype, type) and issubclass(dtype, np.generic) and dtype in (np.integer, np.floating)
        ok = np.issubdtype(array.dtype, dtype) if abstract else array.dtype == np.dtype(dtype)
        if not ok:
            want = dtype.__name__ if abstract else str(np.dtype(dtype))
            raise problem(path, f"has dtype {array.dtype}, expected {want}", fix, who)


def _npy_header(path: Path, fix: str, who: str) -> tuple[tuple[int, ...], Any, int]:
    """``(shape, dtype, data offset)`` from a ``.npy`` file's header; UserError for one that is not an .npy file."""
    import numpy as np

    fmt = np.lib.format
    try:
        with open(path, "rb") as f:
            version = fmt.read_magic(f)
            read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}.get(version)
            if read is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, _, dtype = read(f, max_header_size=1 << 20)
            return tuple(shape), dtype, f.tell()
    except OSError as e:
        raise problem(path, f"cannot be read ({e.strerror or type(e).__name__})", fix, who) from None
    except Exception as e:  # numpy raises ValueError, EOFError, SyntaxError for a bad header
        raise problem(path, f"not a .npy file (truncated or overwritten: {_reason(e)})", fix, who) from None


def read_npy(
    path: Path | str,
    *,
    fix: str,
    who: str = "",
    mmap: bool = False,
    shape: Shape | None = None,
    dtype: Any = None,
):
    """The array of a ``.npy`` file (memory-mapped read-only when ``mmap``), after checking that the file holds
    every byte its header declares and, when given, the ``shape`` and ``dtype`` (see :func:`check_array`)."""
    import numpy as np

    path = Path(path)
    size = _size(path, fix, who)
    header_shape, header_dtype, offset = _npy_header(path, fix, who)
    if not header_dtype.hasobject:
        need = offset + int(np.prod(header_shape, dtype=np.int64)) * header_dtype.itemsize
        if size < need:
            raise problem(path, f"truncated ({size} of the {need} bytes its header declares)", fix, who)
    try:
        array = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as e:
        raise problem(path, f"not a readable .npy file ({_reason(e)})", fix, who) from None
    check_array(array, path, fix=fix, who=who, shape=shape, dtype=dtype)
    return array


def read_npz(
    path: Path | str,
    *,
    fix: str,
    who: str = "",
    keys: Iterable[str] = (),
    shapes: dict[str, Shape] | None = None,
) -> dict[str, Any]:
    """Every array of a ``.npz`` archive, read now (a truncated member fails here, not when it is used);
    UserError for a missing, empty or damaged archive, one without an array of ``keys``, or an array
    of another shape than ``shapes`` gives."""
    import numpy as np

    path = Path(path)
    _size(path, fix, who)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # BadZipFile, zlib.error, EOFError, ValueError, OSError ...
        raise problem(path, f"not a readable .npz archive (truncated or overwritten: {_reason(e)})", fix, who) from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        have = ", ".join(sorted(arrays)) or "none"
        raise problem(path, f"has no array {missing[0]!r} (it has: {have})", fix, who)
    for key, shape in (shapes or {}).items():
        if key in arrays:
            check_array(arrays[key], f"{path}[{key}]", fix=fix, who=who, shape=shape)
    return arrays


# ------------------------------------------------------------------------------------ torch


def read_pt(path: Path | str, *, fix: str, who: str = "", kind: type | None = dict) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU (no pickled code runs); UserError for a missing, empty,
    truncated or foreign file, or one that does not hold a ``kind`` (a dict: a state dict or checkpoint)."""
    import torch

    path = Path(path)
    _size(path, fix, who)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a damaged file; its text suggests weights_only=False
        raise problem(path, f"not a readable torch file (truncated or not one: {type(e).__name__})", fix, who) from None
    if kind is not None and not isinstance(obj, kind):
        raise problem(path, f"holds a {type(obj).__name__}, not a {kind.__name__}", fix, who)
    return obj
