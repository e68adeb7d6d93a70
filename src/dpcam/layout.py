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
never leaves a half-written output where a reader would look. Temporary names carry their owner
(``.<name>.tmp-<pid>-<host>…``), and the next writer of the same output removes what a dead owner
left (:func:`remove_stale`). Run, dataset and derivative names are plain names (:func:`check_name`),
never paths, so ``<root>/<name>`` stays inside its root. A full disk (ENOSPC, EDQUOT, or EFBIG under
``ulimit -f``) while writing is one line naming what was being written (:func:`disk_full`,
:func:`writing`); :func:`locked` is the file lock (``filelock``) of what only one process may write at a
time, naming the holder to those who wait too long.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from dpcam import guard
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
MANIFEST = "manifest.json"  # a prepared dataset's description (data/prepared/<dataset>/)
MODEL_PT, PREDICTIONS = "model.pt", "predictions.npz"  # a trained run's weights and test predictions (models/<run>/)
MAPS, MAP_INDICES, PER_IMAGE, CAMS = "maps.npy", "map_indices.npy", "per_image.npz", "cams.png"  # metrics/<run>/
# metrics/<run>/methods/<method>/: the same files for every explain.methods entry after the first (the headline
# method, whose files are metrics/<run>/ itself); metrics/<run>/methods/agreement.npz: the methods' maps compared
METHODS_DIR, METHOD_AGREEMENT = "methods", "agreement.npz"
ROC_PNG = "roc.png"  # audits/<run>/: the attacks' ROC curves
# reports/: the report stage's files and folders
INDEX_HTML, VERDICT_MD, RUNS_CSV, METRICS_JSON = "index.html", "verdict.md", "runs.csv", "metrics.json"
TABLES_DIR, FIGURES_DIR, PLOTS_DIR = "tables", "figures", "plots"
PLOT_ACCURACY, PLOT_EXPLAIN = "accuracy_vs_eps.csv", "explain_vs_eps.csv"  # reports/plots/: what dvc plots draws
# reports/figures/: the report's pictures
FIG_LDP_CAMS, FIG_GAUSSIAN_CAMS, FIG_LAPLACE_CAMS = (
    "fig2_ldp_cams.png",
    "fig5_gaussian_cams.png",
    "fig5_laplace_cams.png",
)
FIG_ACCURACY, FIG_LDP_EXPLANATIONS = "fig3_accuracy_vs_eps.png", "fig4_ldp_explanations.png"
FIG_MASKED_EPS, FIG_MASKED_CLIP = "fig6a_masked_accuracy_vs_eps.png", "fig6b_masked_accuracy_vs_clip.png"
FIG_TRAIN_SIZE, FIG_LEAKAGE = "fig_train_size.png", "fig_leakage_vs_eps.png"
FIG_VERDICT, FIG_COST_SPLIT, FIG_CALIBRATION = "fig_verdict.png", "fig_cost_split.png", "fig_calibration.png"
FIG_METHODS = "fig_methods.png"  # the verdict per explanation method
# reports/search/: what `dpcam search` writes
SEARCH_TRIALS, SEARCH_FRONT, SEARCH_FRONT_MD, SEARCH_COST = "trials.csv", "front.csv", "front.md", "cost.json"


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
    public: bool = False,
    trainable: str | None = None,
    schedule: str | None = None,
    held: bool = False,
) -> str:
    """``<scheme>-eps<ε>[-clip<C>[-held]][-n<N>][-public][-ft-<trainable>][-sched-<schedule>]-<model>-s<seed>``.

    ``eps inf`` when not noised; ``ldp-<derivative>-...`` for local-DP data; ``laplace-paper-nominal<ε>-...``
    for the paper's replica, whose ε is only the nominal one its noise was calibrated from (no guarantee);
    ``-public`` for a run on the public set (:func:`public_dataset`); ``-ft-head`` / ``-ft-last-block`` for a
    fine-tuning run that trains only that part of a pretrained trunk; ``-held`` for a clipping-sweep run whose
    lr·C is held at the main run's; ``-sched-<name>`` for a reference run trained with a DP schedule's recipe.
    """
    if scheme == "ldp":
        head = f"ldp-{ldp}"
    elif scheme == "laplace-paper":
        head = f"{scheme}-nominal" + (format_eps(epsilon) if epsilon is not None else "inf")
    else:
        head = f"{scheme}-eps" + (format_eps(epsilon) if epsilon is not None else "inf")
    if clip is not None:
        head += f"-clip{format_eps(clip)}" + ("-held" if held else "")
    if train_size is not None:
        head += f"-n{train_size}"
    if public:
        head += "-public"
    if trainable not in (None, "all"):
        head += f"-ft-{trainable}"
    if schedule is not None:
        head += f"-sched-{schedule}"
    return f"{head}-{model}-s{seed}"


PUBLIC_SUFFIX = "-public"


def public_dataset(dataset: str) -> str:
    """The name of ``dataset``'s public companion set (``data/prepared/<dataset>-public``: public pretraining)."""
    return f"{dataset}{PUBLIC_SUFFIX}"


def reference_name(model: str, seed: int) -> str:
    """The non-private run every private run of the same model and seed is compared with (ε = ∞)."""
    return run_name("none", model, seed)


# ------------------------------------------------------------------------------------ run folders

# A run, dataset or derivative name: one plain path component (no "/", never "." or ".."), so that
# root / name stays inside root. config.sections.DATASET_NAME is this pattern.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"
_NAME = re.compile(NAME_PATTERN)


def is_name(name: str) -> bool:
    """True when ``name`` is a plain name (:data:`NAME_PATTERN`), not a path."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: str, what: str = "run") -> str:
    """``name`` when it is a plain name; a one-line UserError otherwise (a path would leave the project's folders)."""
    if not is_name(name):
        raise UserError(
            f"{what} {name!r} is not a {what} name: give a plain name (letters, digits, '_', '.', '-', starting "
            "with a letter or digit), not a path"
        )
    return name


def grid_dir(root: Path, family: str, name: str) -> Path:
    """``<root>/<family>/<name>/``: a grid run's folder under one of the stage roots."""
    return Path(root) / family / name


def _find(root: Path, name: str, marker: str) -> Path:
    """``root/<name>/`` or ``root/<family>/<name>/``, whichever holds ``marker`` (the former if neither).

    ``name`` must be a plain run name (:func:`check_name`): a path such as ``../models/x`` or
    ``/abs/x`` would point outside ``root``.
    """
    check_name(name)
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
    of an MLflow run id; UserError listing the trained runs otherwise, and for anything that is not a
    plain name (a path: its outputs would land outside metrics/ or audits/, e.g. in another run's folder)."""
    check_name(run)
    if is_trained(run):
        return run
    if name_of_run_id is not None and len(run) == 32 and all(c in "0123456789abcdef" for c in run):
        name = name_of_run_id(run)
        if name and is_name(name) and is_trained(name):
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
    if not path.is_file():
        return None
    try:
        return guard.read_json(path, fix="train the run again").get("mlflow_run_id")
    except UserError:  # a damaged train.json: the stage that reads it says so; here it only has no id
        return None


def search_trial_dir(study: str, number: int) -> Path:
    """``models/search/<study>/trial-<n>/``: a search trial's saved model."""
    return SEARCH_MODELS_ROOT / study / f"trial-{number}"


# ------------------------------------------------------------------------------------ atomic writes


def _host_tag() -> str:
    """This machine's name as a tag of temporary names (letters, digits, '_'; at most 24 characters)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:24] or "host"


def _owner() -> str:
    """``<pid>-<host>``: who owns a temporary file or folder, so a later writer can tell a dead one's leftovers."""
    return f"{os.getpid()}-{_host_tag()}"


def tmp_sibling(path: Path, tag: str = "tmp") -> Path:
    """``.<name>.<tag>-<pid>-<host><suffix>`` next to ``path``: a temporary sibling that :func:`remove_stale` knows."""
    path = Path(path)
    return path.with_name(f".{path.name}.{tag}-{_owner()}{path.suffix}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a number we cannot test): keep its files
    return True


def remove_stale(target: Path) -> list[Path]:
    """Remove the temporary siblings of ``target`` (``.<name>.tmp-<pid>-<host>…``, ``.<name>.old-…``) that a
    process of this machine left when it died (kill -9, power loss); returns what was removed.

    Only leftovers whose owner pid is no longer alive **on this machine** are removed: a live writer's
    folder is never touched, and a folder of another machine sharing the file system (or of another
    container) is left alone, because its pid cannot be checked here. Leftovers named before owners
    were recorded (``.<name>.tmp-XXXXXXXX``) are not recognised and stay.
    """
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)-([A-Za-z0-9_]+)(?:[-.].*)?")
    host, removed = _host_tag(), []
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or m.group(2) != host or _alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


# ------------------------------------------------------------------------------------ locks


def _stamp_owner(fd: int) -> None:
    """Write ``<pid> <host>`` into a lock file just taken (filelock's ``on_acquired``), for those who wait."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)


def lock_holder(lock_path: Path) -> tuple[int, str] | None:
    """``(pid, host)`` written in a lock file by :func:`locked`'s holder; None when it says nothing readable."""
    try:
        words = Path(lock_path).read_text(errors="replace").split()
        return int(words[0]), (words[1] if len(words) > 1 else "?")
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def locked(lock_path: Path, what: str, *, timeout: float, fix: str, optional: bool = False) -> Iterator[bool]:
    """Hold an exclusive lock on ``lock_path`` for the block (``filelock``; the holder's pid and host are written
    in the file); yields True.

    Another holder is waited for up to ``timeout`` seconds, then one line (UserError) names it: ``<what> is
    locked by process <pid> on <host> (<lock_path>) ...; <fix>``. ``optional``: where the lock file cannot be
    made (a read-only folder, where nobody can write what the lock guards either) the block runs unlocked and
    the context yields False.
    """
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path), timeout=timeout, on_acquired=_stamp_owner)
    try:
        lock.acquire()
    except Timeout:
        holder = lock_holder(Path(lock_path))
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        stop = f" (or stop it: kill {holder[0]})" if holder else ""
        raise UserError(f"{what} is locked by {who} ({lock_path}) for more than {timeout:g} s; {fix}{stop}") from None
    except OSError:
        if not optional:
            raise
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


# ------------------------------------------------------------------------------------ a full disk

DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _file_size_limit() -> int | None:
    """This process's file-size limit (``ulimit -f``) in bytes, None when there is none."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def disk_full(e: BaseException, path: Path | str, need: int | None = None) -> UserError | None:
    """The one line for a write to ``path`` that failed because the disk (or the process's file-size limit,
    ``ulimit -f``) is full, with the space it needs where known; None for any other error."""
    if not isinstance(e, OSError) or e.errno not in DISK_FULL:
        return None
    needs = f"; it needs about {_megabytes(need)}" if need else ""
    if e.errno == errno.EFBIG:
        if _file_size_limit() is None:
            return UserError(
                f"{path}: file too large for its file system{needs}; write it to another file system (one without "
                "a file-size limit, such as ext4 or XFS) and run the command again"
            )
        return UserError(
            f"{path}: file too large to write (the file-size limit of this process, `ulimit -f`, stops it{needs}); "
            "raise the limit (`ulimit -f unlimited`) and run the command again"
        )
    folder = next((p for p in (Path(path), *Path(path).parents) if p.is_dir()), Path("."))
    try:
        free = f", {_megabytes(shutil.disk_usage(folder).free)} free"
    except OSError:
        free = ""
    quota = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on the device"
    return UserError(f"{path}: cannot write, {quota}{needs}{free}; free some space and run the command again")


@contextlib.contextmanager
def writing(path: Path | str, need: int | None = None) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT, EFBIG) in the block into one line naming ``path`` (:func:`disk_full`)."""
    try:
        yield
    except OSError as e:
        if (err := disk_full(e, path, need)) is None:
            raise
        raise err from None


def reserve(path: Path) -> None:
    """Allocate the disk blocks of ``path`` (a new memory map's file, which is sparse), so that a full disk fails
    here with ENOSPC, not later with SIGBUS while the map is written; a file system that cannot preallocate
    is left as it is."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then rename it into place; returns ``path``.

    The temporary file is removed when ``write`` fails, so ``path`` is either the old file or the new one;
    those a killed process left (kill -9) are removed by the next write of ``path`` (:func:`remove_stale`).
    A full disk is one line naming ``path`` (:func:`disk_full`).
    """
    path = Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(path)
        tmp = tmp_sibling(path)
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
    """``torch.save(obj)`` to ``path``, atomically (checkpoints, weights).

    Saved through an open file, not a path: given a path, torch names the zip archive inside after the file,
    here the temporary one with its pid, so the same weights would give other bytes in every process.
    """
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            sink = _Sink(f)
            try:
                torch.save(obj, sink)
            except Exception:
                if sink.error is not None:  # torch's zip writer turns a failed write into "unexpected pos"
                    raise sink.error from None
                raise

    return write_atomic(path, write)


class _Sink:
    """A file torch writes through, keeping the OSError of a failed write (a full disk) that torch's C++ zip writer
    would report only as a RuntimeError without its cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = e
            raise


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder ``src`` to ``dst``; an existing ``dst`` is swapped out first and removed after."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{_owner()}")
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
    """A new empty folder ``.<name>.tmp-<pid>-<host>-XXXXXXXX`` next to ``near`` (same file system, so
    renames are atomic), mode as the umask allows.

    First removes the temporary folders of ``near`` that dead processes of this machine left
    (:func:`remove_stale`: a prepare killed with -9 leaves a dataset-sized one). ``tempfile.mkdtemp``
    makes 0700; a dataset or report shared by a team must be readable by it.
    """
    near = Path(near)
    with writing(near):
        near.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(near)
        tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.tmp-{_owner()}-", dir=near.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    return tmp


@contextlib.contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``out`` whole, on failure it is removed.

    A full disk while the block writes is one line naming ``out`` (:func:`disk_full`)."""
    tmp = temp_dir(out)
    try:
        with writing(out):
            yield tmp
            replace_dir(tmp, Path(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def method_dir(metrics_dir: Path, method: str, headline: str) -> Path:
    """Where ``method``'s explain files of a run live: the run's metrics folder for the headline method, else
    ``methods/<method>/`` inside it."""
    return Path(metrics_dir) if method == headline else Path(metrics_dir) / METHODS_DIR / method
