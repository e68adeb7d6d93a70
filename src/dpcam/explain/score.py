"""The explain stage: Grad-CAM maps of a trained run's test split, scored and saved.

Streams the test split in batches (running sums out, maps straight to a float16 memory-mapped
file), so memory stays bounded for any test-set size. Writes, atomically:

- ``explain.json`` (:class:`~dpcam.records.ExplainRecord`): the metric means, the model's
  degeneracy check beside them, what was skipped and why;
- ``maps.npy`` float16 ``(N, H, W)`` and ``map_indices.npy`` int64 ``(N,)`` (indices into the run's
  dataset), for re-analysis without recomputing. The maps are rounded to float16 *before* any
  metric is computed (the maps of the reference and the randomised model too), so every number of
  explain.json is recomputable exactly from the saved maps, the model and the dataset;
- ``cams.png``: input, map and overlay of the first test images;

into ``metrics/<run>/`` (a single run) or ``metrics/<family>/<run>/`` (a grid run, ``score_family``),
and logs the metrics and pictures to the training's MLflow run. Definitions: docs/metrics.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpcam import guard, layout, names, records
from dpcam.config import ExplainConfig, GridConfig
from dpcam.data.store import check_run_data, load_dataset
from dpcam.errors import UserError
from dpcam.records import Degeneracy, ExplainRecord, TrainRecord

log = logging.getLogger("dpcam.explain")


def reference_run(spec: dict[str, Any]) -> str | None:
    """The non-private run of the same dataset, model and seed (None for the non-private run itself)."""
    cfg = spec["config"]
    name = layout.reference_name(cfg["model"], cfg["seed"])
    if cfg["scheme"] == "none" and cfg.get("name") in (None, name):
        return None
    return name


@dataclass
class _Scoring:
    """What scoring one run needs: its model, data, the metrics to compute and the models to compare with."""

    name: str
    cfg: ExplainConfig
    model: torch.nn.Module
    spec: dict[str, Any]
    data: Any
    test: Any
    n: int
    metrics: list
    reference: torch.nn.Module | None = None
    reference_name: str | None = None
    randomised: torch.nn.Module | None = None
    notes: list[str] = field(default_factory=list)
    data_change: str | None = None


def _prepare(run: str, cfg: ExplainConfig, reference: str | None = None, allow_data_change: bool = False) -> _Scoring:
    """Load the run and check everything a user can get wrong before any output is started: the method and layer,
    the device, the tracking store (when the run has an MLflow run), and that its data is still the data it was
    trained on (``allow_data_change``: go on, noting it)."""
    from dpcam import tracking
    from dpcam.explain.gradcam import random_init_copy, resolve_layer
    from dpcam.explain.methods import METHODS
    from dpcam.explain.metrics import get_metrics
    from dpcam.saved import load_model, resolve_device

    name = layout.resolve_run(run, tracking.run_name_of)
    metrics = get_metrics(cfg.metrics)
    for method in cfg.methods:
        METHODS.lookup(method)
    size = guard.read_json(layout.run_dir(name) / layout.MODEL_JSON, fix="train the run again").get("image_size")
    if size:
        cfg.check_image(int(size), f"run {name}")  # before any model is loaded
    model, spec = load_model(name)
    resolve_layer(model, cfg.layer)  # an unknown layer fails here, before any output is started
    device = resolve_device(cfg.device)
    if layout.training_run_id(name):
        tracking.open_store()  # a store fault stops here, before metrics/ is touched
    data = load_dataset(spec["data_dir"])
    change = check_run_data(name, data, allow=allow_data_change, image_size=spec.get("image_size"))
    model.to(device)
    notes: list[str] = [change] if change else []
    want_masks = any("masks" in m.needs for m in metrics)
    if want_masks and data.masks is None:
        notes.append(f"{data.path} has no lesion masks: pointing-game metrics skipped")
        metrics = [m for m in metrics if "masks" not in m.needs]
    test = data.split("test", with_masks=want_masks and data.masks is not None)
    n = len(test) if cfg.max_images is None else min(cfg.max_images, len(test))
    if n == 0:
        raise UserError(f"{data.path}: the test split is empty; prepare the dataset with a test split")
    s = _Scoring(name, cfg, model, spec, data, test, n, metrics, notes=notes, data_change=change)
    if any("reference_maps" in m.needs for m in metrics):
        s.reference = _reference(s, load_model, device, reference)
    if any("random_maps" in m.needs for m in s.metrics):
        s.randomised = random_init_copy(model, cfg.seed)
    return s


def _reference(s: _Scoring, load_model, device, name: str | None = None) -> torch.nn.Module | None:
    """The model map agreement compares with, or None with a note (and the metric dropped): ``name``
    when given (the non-private run of another seed, for the non-private run itself), else the
    non-private run of the same seed."""
    ref_name = name or reference_run(s.spec)
    s.reference_name = ref_name
    reference = None
    if ref_name is None:
        s.notes.append("map agreement skipped: this is the non-private run")
    elif not layout.is_trained(ref_name):
        s.notes.append(f"map agreement skipped: the non-private run {ref_name} is not trained")
    else:
        reference = load_model(ref_name)[0].to(device)
    if reference is None:
        s.metrics = [m for m in s.metrics if "reference_maps" not in m.needs]
    return reference


def _stream(s: _Scoring, method: str, maps_file: np.ndarray, progress: bool):
    """Score ``method``'s maps of the test images batch by batch; maps go to ``maps_file``.

    Returns (RunningMean, DegeneracyStats, per-image values: key -> float64 (n,), NaN where not valid).
    """
    from tqdm.auto import tqdm

    from dpcam.explain.degeneracy import DegeneracyStats
    from dpcam.explain.gradcam import gradcam
    from dpcam.explain.inputs import SAVED_MAP_DTYPE, as_saved
    from dpcam.explain.methods import options_of
    from dpcam.explain.metrics import ExplainBatch
    from dpcam.explain.streaming import RunningMean

    cfg, device = s.cfg, next(s.model.parameters()).device
    sums, degeneracy = RunningMean(), DegeneracyStats(s.data.num_classes)
    per_image: dict[str, list[np.ndarray]] = {}
    options = {"deletion-insertion": {"steps": cfg.steps}, "pointing-game": {"tolerance": cfg.tolerance}}
    options |= {"masking-baselines": {"seed": cfg.seed}, "road": {"seed": cfg.seed}}
    how = {"layer": cfg.layer, "method": method, "options": options_of(method, cfg)}
    bar = tqdm(total=s.n, desc=f"explain {s.name} ({method})", disable=None if progress else True, leave=False)
    for start in range(0, s.n, cfg.batch_size):
        pos = np.arange(start, min(s.n, start + cfg.batch_size))
        batch = s.test.batch(pos)
        x, y = batch[0].to(device), batch[1].to(device)
        masks = batch[2].to(device) if len(batch) > 2 else None
        target = y if cfg.target == "label" else None
        maps, target, probs = gradcam(s.model, x, target=target, **how)
        saved = maps.to(SAVED_MAP_DTYPE)  # what maps.npy holds; every metric sees exactly these maps
        other = {
            k: as_saved(gradcam(m, x, target=target, **how)[0]) if m is not None else None
            for k, m in (("reference_maps", s.reference), ("random_maps", s.randomised))
        }
        indices = torch.as_tensor(s.test.indices[pos])  # dataset indices: they seed each image's random numbers
        eb = ExplainBatch(
            s.model, x, saved.float(), target, probs=probs, labels=y, masks=masks, indices=indices, **other
        )
        for metric in s.metrics:
            values, valid = metric(eb, **{k: v for k, v in options.get(metric.name, {}).items() if v is not None})
            sums.add(values, valid)
            for key, v in values.items():
                ok = valid.get(key) if isinstance(valid, dict) else valid
                v = v.detach().double().cpu().numpy()
                per_image.setdefault(key, []).append(np.where(ok.cpu().numpy(), v, np.nan) if ok is not None else v)
        degeneracy.add(probs, y)
        maps_file[pos] = saved.cpu().numpy()
        bar.update(len(pos))
    bar.close()
    return sums, degeneracy, {k: np.concatenate(v) for k, v in per_image.items()}


def _write_maps(s: _Scoring, method: str, out: Path, progress: bool):
    """Stream into a temporary ``maps.npy`` renamed into place at the end; also ``map_indices.npy``."""
    size = s.data.image_size
    layout.remove_stale(out / layout.MAPS)  # what a killed explain left (kill -9): one map file's worth
    tmp = layout.tmp_sibling(out / layout.MAPS)
    try:
        with layout.writing(out / layout.MAPS, need=2 * s.n * size * size):
            maps_file = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(s.n, size, size))
            layout.reserve(tmp)
        sums, degeneracy, per_image = _stream(s, method, maps_file, progress)
        maps_file.flush()
        del maps_file
        os.replace(tmp, out / layout.MAPS)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    layout.write_atomic(out / layout.MAP_INDICES, lambda p: np.save(p, s.test.indices[: s.n]))  # p ends in .npy
    # every metric per image (NaN: not valid), for paired differences between runs (report.verdict)
    layout.write_atomic(out / layout.PER_IMAGE, lambda p: np.savez(p, index=s.test.indices[: s.n], **per_image))
    return sums, degeneracy


def score(
    run: str,
    cfg: ExplainConfig,
    *,
    progress: bool = True,
    out: Path | None = None,
    reference: str | None = None,
    allow_data_change: bool = False,
) -> ExplainRecord:
    """Score ``run``'s explanations on its test split; write them to ``out`` (default ``metrics/<run>/``).

    ``reference``: the run map agreement compares with (default: the non-private run of the same
    model and seed, none for the non-private run itself). ``allow_data_change``: score a run whose data has
    changed since it was trained (refused otherwise), noted in explain.json's ``data_change`` and ``notes``.
    """
    s = _prepare(run, cfg, reference, allow_data_change)
    out = Path(out) if out is not None else layout.METRICS_ROOT / s.name
    for note in s.notes:
        log.warning("%s: %s", s.name, note)
    records = [
        _score_method(s, method, layout.method_dir(out, method, cfg.headline), progress) for method in cfg.methods
    ]
    if len(cfg.methods) > 1:
        _write_agreement(s, out)
    if records[0].degenerate:
        log.warning(
            "%s: degenerate model (%s): its explanation metrics are not meaningful",
            s.name,
            "; ".join(records[0].degeneracy.reasons),
        )
    return records[0]


def _score_method(s: _Scoring, method: str, out: Path, progress: bool) -> ExplainRecord:
    """One method's maps, metrics, picture and explain.json in ``out``; logged to the run's MLflow run."""
    out.mkdir(parents=True, exist_ok=True)
    sums, degeneracy = _write_maps(s, method, out, progress)
    deg = Degeneracy(**degeneracy.result())
    record = ExplainRecord(
        run_name=s.name,
        dataset=s.spec["dataset"],
        data_dir=s.spec["data_dir"],
        data_change=s.data_change,
        method=method,
        target=s.cfg.target,
        images=s.n,
        reference_run=s.reference_name if s.reference is not None else None,
        methods=list(s.cfg.methods) if method == s.cfg.headline and len(s.cfg.methods) > 1 else None,
        **sums.result(),
        degeneracy=deg,
        notes=s.notes,
        degenerate=deg.degenerate,
        accuracy=deg.accuracy,
    )
    grid = out / layout.CAMS
    save_cams_grid(
        grid,
        s.test.batch(np.arange(min(s.cfg.grid_images, s.n)))[0],
        guard.read_npy(out / layout.MAPS, fix=f"run `dpcam explain {s.name}` again", mmap=True),
        title=f"{s.name}: {method} on test images" + ("  [DEGENERATE MODEL]" if record.degenerate else ""),
    )
    record.write(out / layout.EXPLAIN_JSON)
    _log_to_mlflow(record, [grid, out / layout.EXPLAIN_JSON], None if method == s.cfg.headline else method)
    return record


def _write_agreement(s: _Scoring, out: Path) -> None:
    """``methods/agreement.npz``: per image, Spearman's rank correlation of every pair of methods' saved maps
    (keys ``<a>|<b>`` in explain.methods order; NaN where a map is constant), and ``index`` (dataset indices)."""
    from dpcam.explain.agreement import map_agreement

    fix = f"run `dpcam explain {s.name}` again"
    maps = {
        m: torch.from_numpy(
            np.asarray(guard.read_npy(layout.method_dir(out, m, s.cfg.headline) / layout.MAPS, fix=fix))
        )
        for m in s.cfg.methods
    }
    pairs = {
        f"{a}|{b}": map_agreement(maps[a].float(), maps[b].float()).double().numpy()
        for i, a in enumerate(s.cfg.methods)
        for b in s.cfg.methods[i + 1 :]
    }
    path = out / layout.METHODS_DIR / layout.METHOD_AGREEMENT
    layout.write_atomic(path, lambda p: np.savez(p, index=s.test.indices[: s.n], **pairs))


def _log_to_mlflow(record: ExplainRecord, artifacts: list[Path], prefix: str | None = None) -> None:
    """The record's numbers and pictures on the training's MLflow run; another method than the headline one
    logs its numbers as ``<method>.<metric>`` and its files under ``explain/<method>/``."""
    from dpcam import tracking

    run_id = layout.training_run_id(record.run_name)
    if not run_id:
        log.warning("%s: no MLflow run id in its train.json; results are in files only", record.run_name)
        return
    numbers = {
        k: v
        for k, v in record.to_json().items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "schema"
    }
    numbers.update(
        degenerate=float(record.degenerate),
        majority_share=record.degeneracy.majority_share,
        input_sensitivity=record.degeneracy.input_sensitivity,
    )
    if prefix is None:
        tracking.log_to_run(
            run_id, record.dataset, numbers, {"dpcam.degenerate": record.degenerate}, artifacts, "explain"
        )
    else:
        numbers = {f"{prefix}.{k}": v for k, v in numbers.items()}
        tracking.log_to_run(run_id, record.dataset, numbers, {}, artifacts, f"explain/{prefix}")


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """(H, W, 3) float image in [0, 1] blended with a jet-coloured (H, W) map in [0, 1]."""
    from matplotlib import colormaps

    heat = colormaps["jet"](np.asarray(cam, dtype=np.float32))[..., :3]
    return np.clip((1 - alpha) * image + alpha * heat, 0, 1)


def save_cams_grid(path: Path, x: torch.Tensor, maps: np.ndarray, title: str) -> Path:
    """Rows = images; columns = input, map, overlay. ``x`` (N, 3, H, W) pixel space; ``maps`` (≥N, H, W)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = x.shape[0]
    fig, axes = plt.subplots(n, 3, figsize=(6, 2 * n + 0.4), squeeze=False)
    for i in range(n):
        img = x[i].permute(1, 2, 0).cpu().numpy()
        cam = np.asarray(maps[i], dtype=np.float32)
        for j, (pic, label) in enumerate(((img, "input"), (cam, "map"), (overlay(img, cam), "overlay"))):
            ax = axes[i][j]
            ax.imshow(pic, cmap="jet" if j == 1 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    layout.write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return path


def figure_cams(runs: list[str], out: Path, images: int = 6) -> Path:
    """The same test images across runs of increasing ε (paper Fig. 2/5): input, then one overlay per run.

    Uses each run's saved maps (``dpcam explain`` first); runs are ordered by achieved ε (∞ last).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpcam import tracking

    cols = sorted((_cams_column(layout.resolve_run(r, tracking.run_name_of)) for r in runs), key=lambda c: c["eps"])
    common = cols[0]["idx"]
    for c in cols[1:]:
        common = common[np.isin(common, c["idx"])]
    chosen = common[:images]
    if chosen.size == 0:
        raise UserError("the runs share no scored test image; explain them on the same dataset split")
    fig, axes = plt.subplots(
        len(chosen), len(cols) + 1, figsize=(1.9 * (len(cols) + 1), 1.9 * len(chosen) + 0.5), squeeze=False
    )
    for i, idx in enumerate(chosen):
        axes[i][0].imshow(np.asarray(cols[0]["data"].images[idx], dtype=np.float32) / 255)
        for j, c in enumerate(cols, start=1):
            k = int(np.flatnonzero(c["idx"] == idx)[0])
            img = np.asarray(c["data"].images[idx], dtype=np.float32) / 255
            axes[i][j].imshow(overlay(img, np.asarray(c["maps"][k], dtype=np.float32)))
            if i == 0:
                eps = "ε = ∞" if c["eps"] == float("inf") else f"ε = {c['eps']:.3g}"
                flag = "\nDEGENERATE" if c["info"].degenerate else ""
                axes[i][j].set_title(f"{c['name']}\n{eps}{flag}", fontsize=7)
        if i == 0:
            axes[i][0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    layout.write_atomic(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return out


def _cams_column(name: str) -> dict[str, Any]:
    folder = layout.metrics_dir(name)
    if not (folder / layout.MAPS).is_file():
        raise UserError(f"run {name!r} has no saved maps ({folder}/maps.npy); run `dpcam explain {name}` first")
    fix = f"run `dpcam explain {name}` again"
    idx = guard.read_npy(folder / layout.MAP_INDICES, fix=fix, shape=(None,), dtype=np.integer)
    maps = guard.read_npy(folder / layout.MAPS, fix=fix, mmap=True, shape=(idx.size, None, None))
    info = records.read(ExplainRecord, folder / layout.EXPLAIN_JSON, f"run {name}")
    train_json = layout.run_dir(name) / layout.TRAIN_JSON
    eps = records.read(TrainRecord, train_json, f"run {name}").epsilon if train_json.is_file() else None
    return {
        "name": name,
        "eps": float("inf") if eps is None else float(eps),
        "info": info,
        "maps": maps,
        "idx": idx,
        "data": load_dataset(info.data_dir),
    }


def score_family(
    family: str, grid: GridConfig, cfg: ExplainConfig, *, progress: bool = True, allow_data_change: bool = False
) -> list[ExplainRecord]:
    """Score every run of ``family`` in the grid into ``metrics/<family>/<run>/`` (one process for all): every
    explain.methods entry in the headline families (baseline, gaussian), the headline method alone elsewhere.

    The tracking store is opened and every run's data checked before any run's folder is emptied."""
    from dpcam import tracking
    from dpcam.executor import run_jobs
    from dpcam.families import family_runs

    if family not in names.HEADLINE_FAMILIES and len(cfg.methods) > 1:
        cfg = cfg.model_copy(update={"methods": [cfg.headline]})  # the other methods answer the headline question
    runs = family_runs(grid, family, layout.METRICS_ROOT, trained=True)
    if runs:
        tracking.open_store()
    if not allow_data_change:
        for s in runs:
            spec = guard.read_json(s.model_dir / layout.MODEL_JSON, fix="train the run again (`dvc repro`)")
            check_run_data(s.name, load_dataset(spec["data_dir"]), allow=False, image_size=spec.get("image_size"))
    quiet = progress and grid.executor == "serial"
    jobs = [(s.name, cfg, s.metrics_dir, _other_seed(s, grid), quiet, allow_data_change) for s in runs]
    labels = [s.name for s in runs]
    return run_jobs(_score_fresh, jobs, labels, stage=f"explain-{family}", describe=_scored, **grid.run_options())


def _scored(record: ExplainRecord) -> str:
    """An explained run in a few words (the stage's progress line)."""
    score, drop = record.value("masked_score_pct"), record.value("avg_drop_pct")
    return f"masked score {score:.1f} %, Average Drop {drop:.1f} %" if None not in (score, drop) else "scored"


def _score_fresh(
    name: str, cfg: ExplainConfig, out: Path, reference: str | None, progress: bool, allow_data_change: bool = False
) -> ExplainRecord:
    from dpcam.families import fresh

    return score(name, cfg, progress=progress, out=fresh(out), reference=reference, allow_data_change=allow_data_change)


def _other_seed(s, grid: GridConfig) -> str | None:
    """For a non-private baseline run: the non-private run of the next seed, so that its map agreement says how
    much two non-private models agree (the yardstick of every private model's agreement); else None."""
    seeds = grid.seeds_of(s.family)
    if s.family != "baseline" or s.scheme != "none" or len(seeds) < 2:
        return None
    return layout.reference_name(s.model, seeds[(seeds.index(s.seed) + 1) % len(seeds)])
