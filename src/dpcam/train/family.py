"""Every run of one family of the grid, in one process (or the executor's workers); finished runs kept by stamp."""

from __future__ import annotations

import functools
import shutil
import warnings
from pathlib import Path
from typing import Any

from dpcam import layout, records
from dpcam.config import GridConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.families import check_flags, family_runs, run_config, schedule_of_run
from dpcam.records import TrainRecord
from dpcam.train.fit import _splits, open_data
from dpcam.train.lock import _empty_folder, run_lock
from dpcam.train.stage import _run_locked, end_abandoned

STAMP = ".stamp"  # in a finished grid run's folder: what its outputs were made from (run_stamp)


def run_family(
    family: str,
    grid: GridConfig,
    base: TrainConfig,
    *,
    progress: bool = True,
    profile: str | None = None,
    flags: dict[str, Any] | None = None,
) -> list[TrainRecord]:
    """Train every run of ``family`` in the grid into ``models/<family>/`` (one process for all of them).

    ``flags``: the CLI flags already folded into ``base``; one the grid sets for some run is refused.
    A run whose folder holds a finished run of the same configuration, code, data and weights is kept
    (DVC keeps the folder: the stage's output is ``persist``); any other run is trained again from the
    start, never resumed from a checkpoint of another configuration; folders of runs no longer in the
    grid are removed.
    """
    from dpcam import tracking
    from dpcam.executor import run_jobs

    check_flags(family, grid, flags or {})
    specs = family_runs(grid, family, layout.MODELS_ROOT)
    cfgs = [run_config(s, grid, base) for s in specs]  # every config is validated before anything is changed
    _check_reachable(specs, cfgs, grid)
    tracking.open_store()  # a store fault stops the stage here, before any run folder is changed
    _remove_stale_runs(family, {s.name for s in specs})
    parallel = grid.executor != "serial" and len(specs) > 1
    if parallel:
        tracking.ensure_experiment(base.dataset)
    jobs = [(cfg, s.model_dir, progress and not parallel, grid.name, profile) for s, cfg in zip(specs, cfgs)]
    names = [s.name for s in specs]
    return run_jobs(_train_fresh, jobs, names, stage=f"train-{family}", describe=_trained, **grid.run_options())


def _trained(record: TrainRecord) -> str:
    """A trained run in a few words (the stage's progress line)."""
    eps = record.value("epsilon")
    privacy = "no ε" if record.guarantee == "none" else "ε = ∞" if eps is None else f"ε = {eps:.3g}"
    return f"test accuracy {record.test_accuracy:.3f}, {privacy}"


def _check_reachable(specs: list, cfgs: list[TrainConfig], grid: GridConfig) -> None:
    """Refuse, before any run trains, a DP run whose target ε no noise ≤ 10⁶ reaches in the steps its recipe takes."""
    from dpcam.names import CALIBRATED_SCHEMES
    from dpcam.privacy.accounting import reachable
    from dpcam.privacy.plan import training_plan

    sizes: dict[tuple, int] = {}
    for s, cfg in zip(specs, cfgs):
        if cfg.scheme not in CALIBRATED_SCHEMES:
            continue
        key = (str(cfg.data_dir), cfg.train_size)
        if key not in sizes:
            sizes[key] = len(_splits(cfg, open_data(cfg))[0])
        q, steps = training_plan(sizes[key], cfg.batch_size, cfg.epochs)
        accountant = "laplace" if cfg.scheme == "laplace" else cfg.accountant
        if not reachable(cfg.scheme, cfg.epsilon, cfg.delta, q, steps, accountant):
            name = schedule_of_run(s, grid)
            where = f"grid.schedules.{name}" if name is not None else "the train section"
            raise UserError(
                f"grid run {s.name}: target ε = {cfg.epsilon:g} at δ = {cfg.delta:g} cannot be reached in {steps} "
                f"steps at sample rate {q:.4g} with any noise ≤ 1e6 ({where}: epochs {cfg.epochs}, batch size "
                f"{cfg.batch_size}); train fewer steps or choose a larger ε"
            )


def _remove_stale_runs(family: str, keep: set[str]) -> list[str]:
    """Remove what ``models/<family>/`` holds besides the runs of ``keep`` (runs the grid no longer has); say how
    many trained runs that removes (a warning line), all of them when the grid drops the family.

    Only an empty family's own grid list can drop it: ``grid.models`` and ``grid.seeds``, which every family
    needs, are refused when empty (:class:`~dpcam.config.GridConfig`), so an emptied family never deletes runs
    by accident. A folder a live process is training is locked and refused (:func:`run_lock`)."""
    here = layout.MODELS_ROOT / family
    stale = sorted(d for d in (here.iterdir() if here.is_dir() else ()) if d.name not in keep)
    trained = [d.name for d in stale if (d / layout.MODEL_JSON).is_file() or (d / layout.TRAIN_JSON).is_file()]
    for d in stale:
        if d.is_dir() and not d.is_symlink():
            with run_lock(d, d.name):
                _empty_folder(d)
            shutil.rmtree(d, ignore_errors=True)
        else:
            d.unlink()
    if trained:
        why = "the grid drops the family" if not keep else "they are no longer in the grid"
        shown = ", ".join(trained[:3]) + (", ..." if len(trained) > 3 else "")
        warnings.warn(
            f"family {family}: removed {len(trained)} trained run{'s' if len(trained) != 1 else ''} from {here} "
            f"({shown}): {why}",
            UserWarning,
            stacklevel=3,
        )
    return trained


def _train_fresh(cfg: TrainConfig, out: Path, progress: bool, grid: str, profile: str | None) -> TrainRecord:
    """One grid run into an emptied ``out`` (locked before it is emptied: a live run's folder is left alone).

    A folder whose run finished (train.json written) from the same configuration, code, data and starting
    weights (its stamp, :func:`run_stamp`) is kept: rerunning a stage that failed part-way (a run that
    raised, a killed worker) redoes only the runs without complete outputs.
    """
    stamp = run_stamp(cfg)
    with run_lock(out, cfg.run_name):
        if (out / layout.TRAIN_JSON).is_file() and _read_stamp(out) == stamp:
            return records.read(TrainRecord, out / layout.TRAIN_JSON, cfg.run_name)
        end_abandoned(out)
        _empty_folder(out)
        record = _run_locked(cfg, out, resume=False, progress=progress, grid=grid, profile=profile)
        layout.write_text(out / STAMP, stamp + "\n")  # last: a folder without it is trained again
        return record


def run_stamp(cfg: TrainConfig) -> str:
    """What a grid run's outputs are made from: its configuration, the code the train stage runs, its data (the
    manifest, which holds the files' checksums) and its starting weights; SHA-256 hex."""
    import hashlib

    h = hashlib.sha256(cfg.model_dump_json().encode())
    h.update(_code_digest())
    for f in (cfg.data_dir / layout.MANIFEST, Path(cfg.weights) if cfg.weights else None):
        if f is not None and f.is_file():
            h.update(f.read_bytes())
    return h.hexdigest()


@functools.cache
def _code_digest() -> bytes:
    """SHA-256 of the source files the train stage runs (names and bytes; its import closure, the files dvc.yaml
    lists as its deps), read once per process: an edit elsewhere (a report module) keeps finished runs."""
    import hashlib

    from dpcam.codegraph import SRC, closure_files

    h = hashlib.sha256()
    for f in closure_files(__name__):
        h.update(f.relative_to(SRC).as_posix().encode() + b"\0" + f.read_bytes())
    return h.digest()


def _read_stamp(out: Path) -> str | None:
    try:
        return (out / STAMP).read_text().strip()
    except OSError:
        return None
