"""Where everything lives: output roots, run names and folders, atomic writes and folder swaps.

The one module that knows the project's file layout::

    params.yaml                      the study's values (profiles/*.yaml: overlays for `make paper`)
    data/prepared/<dataset>/         a prepared dataset (data.store format)
    data/ldp/<dataset>/<mech>-eps<ε>/ a local-DP derivative
    models/<run>/ or models/<family>/<run>/      model.pt, model.json, train.json (a grid run in its family)
    metrics/<run>/ or metrics/<family>/<run>/    explain.json, maps.npy, map_indices.npy, cams.png
    audits/<run>/ or audits/<family>/<run>/      audit.json, roc.png
    models/search/<study>/trial-<n>/             a search trial's model (while it may be on the front)
    reports/                         the report stage's page, tables and figures; reports/search/

Every file a stage writes goes through :func:`write_atomic` (a temporary sibling renamed into
place) and every folder through :func:`staged_dir` / :func:`replace_dir`, so an interrupted stage
never leaves a half-written output where a reader would look.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpcam.errors import UserError

PARAMS_FILE = Path("params.yaml")
PROFILES_DIR = Path("profiles")
PREPARED_ROOT = Path("data/prepared")
LDP_ROOT = Path("data/ldp")
MODELS_ROOT = Path("models")
METRICS_ROOT = Path("metrics")
AUDITS_ROOT = Path("audits")
REPORTS_ROOT = Path("reports")
SEARCH_MODELS_ROOT = MODELS_ROOT / "search"
SEARCH_REPORT = REPORTS_ROOT / "search"

CHECKPOINT = "checkpoint.pt"
TRAIN_JSON, EXPLAIN_JSON, AUDIT_JSON, MODEL_JSON = "train.json", "explain.json", "audit.json", "model.json"


# ------------------------------------------------------------------------------------ run names


def format_eps(eps: float) -> str:
    """ε as it appears in folder and run names: ``0.25``, ``1``, ``10`` (no trailing ``.0``)."""
    return f"{eps:g}"


def run_name(
    scheme: str,
    model: str,
    seed: int,
    *,
    epsilon: float | None = None,
    ldp: str | None = None,
    clip: float | None = None,
    train_size: int | None = None,
) -> str:
    """``<scheme>-eps<ε>[-clip<C>][-n<N>]-<model>-s<seed>`` (``eps inf`` when not noised; ``ldp-<derivative>-...``)."""
    if scheme == "ldp":
        head = f"ldp-{ldp}"
    else:
        head = f"{scheme}-eps" + (format_eps(epsilon) if epsilon is not None else "inf")
    if clip is not None:
        head += f"-clip{format_eps(clip)}"
    if train_size is not None:
        head += f"-n{train_size}"
    return f"{head}-{model}-s{seed}"


def reference_name(model: str, seed: int) -> str:
    """The non-private run every private run of the same model and seed is compared with (ε = ∞)."""
    return run_name("none", model, seed)


# ------------------------------------------------------------------------------------ run folders


def grid_dir(root: Path, family: str, name: str) -> Path:
    """``<root>/<family>/<name>/``: a grid run's folder under one of the stage roots."""
    return Path(root) / family / name


def _find(root: Path, name: str, marker: str) -> Path:
    """``root/<name>/`` or ``root/<family>/<name>/``, whichever holds ``marker`` (the former if neither)."""
    for path in (root / name, *sorted(root.glob(f"*/{name}"))):
        if (path / marker).is_file():
            return path
    return root / name


def run_dir(name: str) -> Path:
    """A trained run's folder (``models/<name>/`` or ``models/<family>/<name>/``)."""
    return _find(MODELS_ROOT, name, MODEL_JSON)


def metrics_dir(name: str) -> Path:
    """A scored run's folder (``metrics/<name>/`` or ``metrics/<family>/<name>/``)."""
    return _find(METRICS_ROOT, name, EXPLAIN_JSON)


def audit_dir(name: str) -> Path:
    """An audited run's folder (``audits/<name>/`` or ``audits/<family>/<name>/``)."""
    return _find(AUDITS_ROOT, name, AUDIT_JSON)


def is_trained(name: str) -> bool:
    return (run_dir(name) / MODEL_JSON).is_file()


def resolve_run(run: str, name_of_run_id: Callable[[str], str | None] | None = None) -> str:
    """A run name under models/, or (with ``name_of_run_id``, e.g. ``tracking.run_name_of``) the run name
    of an MLflow run id; UserError listing the trained runs otherwise."""
    if is_trained(run):
        return run
    if name_of_run_id is not None and len(run) == 32 and all(c in "0123456789abcdef" for c in run):
        name = name_of_run_id(run)
        if name and is_trained(name):
            return name
    have = sorted(p.parent.name for p in MODELS_ROOT.glob(f"**/{MODEL_JSON}"))
    hint = f"trained runs: {', '.join(have[:8])}" if have else "no run is trained yet"
    raise UserError(
        f"unknown run {run!r} (no models/{run}/{MODEL_JSON} and no MLflow run of that id; {hint}); "
        "run `dpcam train` first"
    )


def training_run_id(name: str) -> str | None:
    """The MLflow run id recorded in a trained run's train.json (None when there is none)."""
    path = run_dir(name) / TRAIN_JSON
    try:
        return json.loads(path.read_text()).get("mlflow_run_id") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def search_trial_dir(study: str, number: int) -> Path:
    """``models/search/<study>/trial-<n>/``: a search trial's saved model."""
    return SEARCH_MODELS_ROOT / study / f"trial-{number}"


# ------------------------------------------------------------------------------------ atomic writes


def _tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}{path.suffix}")


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place; returns ``path``.

    The temporary file is removed when ``write`` fails, so ``path`` is either the old file or the new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def write_bytes(path: Path, data: bytes) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: Path, obj: Any) -> Path:
    """JSON with an indent of 2, UTF-8 kept as is, and a final newline, written atomically."""
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def save_torch(obj: Any, path: Path) -> Path:
    """``torch.save(obj)`` to ``path``, atomically (checkpoints, weights)."""
    import torch

    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is swapped out first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def swap_in(src: Path, dst: Path) -> None:
    """Put ``src`` (a file or a folder) at ``dst``, replacing what is there."""
    if src.is_dir():
        replace_dir(src, dst)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def temp_dir(near: Path) -> Path:
    """A new empty folder next to ``near`` (same file system, so renames are atomic), mode as the umask allows.

    ``tempfile.mkdtemp`` makes 0700; a dataset or report shared by a team must be readable by it.
    """
    near = Path(near)
    near.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.tmp-", dir=near.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``out`` whole, on failure it is removed."""
    tmp = temp_dir(out)
    try:
        yield tmp
        replace_dir(tmp, Path(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
