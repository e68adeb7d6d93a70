"""The explain stage: Grad-CAM maps of a trained run's test split, scored and saved.

Streams the test split in batches (running sums out, maps straight to a float16 memory-mapped
file), so memory stays bounded for any test-set size. Writes, atomically:

- ``explain.json``: the metric means, the model's degeneracy dict beside them, what was skipped
  and why;
- ``maps.npy`` float16 ``(N, H, W)`` and ``map_indices.npy`` int64 ``(N,)`` (indices into the run's
  dataset), for re-analysis without recomputing;
- ``cams.png``: input, map and overlay of the first test images;

into ``metrics/<run>/`` (a single run) or ``metrics/<family>/<run>/`` (a grid run, ``score_family``),

and logs the metrics and pictures to the training's MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpcam.config import ExplainConfig
from dpcam.data.store import load_dataset
from dpcam.errors import UserError

log = logging.getLogger("dpcam.explain")
METRICS_ROOT = Path("metrics")


def resolve_run(run: str) -> str:
    """A run name under models/, or the run name of an MLflow run id."""
    from dpcam.train import run_dir

    if (run_dir(run) / "model.json").is_file():
        return run
    if len(run) == 32 and all(c in "0123456789abcdef" for c in run):
        from dpcam import tracking

        try:
            name = tracking.get_run(run).info.run_name
        except Exception:  # noqa: BLE001 - any lookup failure is "no such run"
            name = None
        if name and (run_dir(name) / "model.json").is_file():
            return name
    have = sorted(p.parent.name for p in Path("models").glob("**/model.json"))
    hint = f"trained runs: {', '.join(have[:8])}" if have else "no run is trained yet"
    raise UserError(f"unknown run {run!r} (no models/{run}/model.json and no MLflow run of that id; {hint}); run `dpcam train` first")


def reference_run(spec: dict[str, Any]) -> str | None:
    """The non-private run of the same dataset, model and seed (None for the non-private run itself)."""
    cfg = spec["config"]
    name = f"none-epsinf-{cfg['model']}-s{cfg['seed']}"
    if cfg["scheme"] == "none" and cfg.get("name") in (None, name):
        return None
    return name


def metrics_dir(name: str) -> Path:
    """``metrics/<name>/`` or ``metrics/<family>/<name>/``, whichever holds explain.json (the former if neither)."""
    for path in (METRICS_ROOT / name, *sorted(METRICS_ROOT.glob(f"*/{name}"))):
        if (path / "explain.json").is_file():
            return path
    return METRICS_ROOT / name


def score(run: str, cfg: ExplainConfig, *, progress: bool = True, out: Path | None = None) -> dict[str, Any]:
    """Score ``run``'s explanations on its test split; write them to ``out`` (default ``metrics/<run>/``)."""
    from tqdm.auto import tqdm

    from dpcam.explain.gradcam import METHODS, gradcam, random_init_copy, resolve_layer
    from dpcam.explain.metrics import DegeneracyStats, ExplainBatch, RunningMean, get_metrics
    from dpcam.train import load_model, resolve_device, run_dir

    name = resolve_run(run)
    metrics = get_metrics(cfg.metrics)
    if cfg.method.lower() not in METHODS:
        raise UserError(f"unknown explanation method {cfg.method!r}; known methods: {', '.join(sorted(METHODS))}")
    model, spec = load_model(name)
    resolve_layer(model, cfg.layer)  # an unknown layer fails here, before any output is started
    device = resolve_device(cfg.device)
    model.to(device)
    data = load_dataset(spec["data_dir"])
    want_masks = any("masks" in m.needs for m in metrics)
    notes: list[str] = []
    if want_masks and data.masks is None:
        notes.append(f"{data.path} has no lesion masks: pointing-game metrics skipped")
        metrics = [m for m in metrics if "masks" not in m.needs]
    test = data.split("test", with_masks=want_masks and data.masks is not None)
    n = len(test) if cfg.max_images is None else min(cfg.max_images, len(test))
    if n == 0:
        raise UserError(f"{data.path}: the test split is empty; prepare the dataset with a test split")

    reference = None
    if any("reference_maps" in m.needs for m in metrics):
        ref_name = reference_run(spec)
        if ref_name is None:
            notes.append("map agreement skipped: this is the non-private run")
        elif not (run_dir(ref_name) / "model.json").is_file():
            notes.append(f"map agreement skipped: the non-private run {ref_name} is not trained")
        else:
            reference = load_model(ref_name)[0].to(device)
        if reference is None:
            metrics = [m for m in metrics if "reference_maps" not in m.needs]
    randomised = random_init_copy(model, cfg.seed) if any("random_maps" in m.needs for m in metrics) else None

    out = Path(out) if out is not None else METRICS_ROOT / name
    out.mkdir(parents=True, exist_ok=True)
    tmp_maps = out / f".maps.npy.tmp-{os.getpid()}"
    size = data.image_size
    maps_file = np.lib.format.open_memmap(tmp_maps, mode="w+", dtype=np.float16, shape=(n, size, size))
    sums, degeneracy = RunningMean(), DegeneracyStats(data.num_classes)
    options = {"deletion-insertion": {"steps": cfg.steps}, "pointing-game": {"tolerance": cfg.tolerance}}
    done = 0
    try:
        bar = tqdm(total=n, desc=f"explain {name}", disable=None if progress else True, leave=False)
        for start in range(0, n, cfg.batch_size):
            pos = np.arange(start, min(n, start + cfg.batch_size))
            batch = test.batch(pos)
            x, y = batch[0].to(device), batch[1].to(device)
            masks = batch[2].to(device) if len(batch) > 2 else None
            target = y if cfg.target == "label" else None
            maps, target, probs = gradcam(model, x, target=target, layer=cfg.layer, method=cfg.method)
            ref_maps = gradcam(reference, x, target=target, layer=cfg.layer, method=cfg.method)[0] if reference is not None else None
            rnd_maps = gradcam(randomised, x, target=target, layer=cfg.layer, method=cfg.method)[0] if randomised is not None else None
            eb = ExplainBatch(model, x, maps, target, probs=probs, labels=y, masks=masks,
                              reference_maps=ref_maps, random_maps=rnd_maps)
            for metric in metrics:
                values, valid = metric(eb, **{k: v for k, v in options.get(metric.name, {}).items() if v is not None})
                sums.add(values, valid)
            degeneracy.add(probs, y)
            maps_file[pos] = maps.cpu().numpy().astype(np.float16)
            done += len(pos)
            bar.update(len(pos))
        bar.close()
        maps_file.flush()
        del maps_file
        os.replace(tmp_maps, out / "maps.npy")
    except BaseException:
        tmp_maps.unlink(missing_ok=True)
        raise
    np.save(out / "map_indices.npy", test.indices[:n])

    result: dict[str, Any] = {
        "run_name": name,
        "dataset": spec["dataset"],
        "data_dir": spec["data_dir"],
        "method": cfg.method,
        "target": cfg.target,
        "images": n,
        **{k: v for k, v in sums.result().items()},
        "degeneracy": degeneracy.result(),
        "notes": notes,
    }
    result["degenerate"] = result["degeneracy"]["degenerate"]
    result["accuracy"] = result["degeneracy"]["accuracy"]
    for note in notes:
        log.warning("%s: %s", name, note)
    if result["degenerate"]:
        log.warning("%s: degenerate model (%s): its explanation metrics are not meaningful",
                    name, "; ".join(result["degeneracy"]["reasons"]))

    grid = out / "cams.png"
    save_cams_grid(grid, test.batch(np.arange(min(cfg.grid_images, n)))[0], np.load(out / "maps.npy", mmap_mode="r"),
                   title=f"{name}: Grad-CAM on test images" + ("  [DEGENERATE MODEL]" if result["degenerate"] else ""))
    _write_json(out / "explain.json", result)
    _log_to_mlflow(name, result, [grid, out / "explain.json"])
    return result


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _log_to_mlflow(name: str, result: dict[str, Any], artifacts: list[Path]) -> None:
    from dpcam import tracking

    from dpcam.train import training_run_id

    run_id = training_run_id(name)
    if not run_id:
        return
    numbers = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    numbers["degenerate"] = float(result["degenerate"])
    numbers["majority_share"] = result["degeneracy"]["majority_share"]
    numbers["input_sensitivity"] = result["degeneracy"]["input_sensitivity"]
    with tracking.run(result["dataset"], name, run_id=run_id):
        tracking.log_metrics(numbers)
        tracking.set_tags({"dpcam.degenerate": result["degenerate"]})
        for path in artifacts:
            tracking.log_artifact(path, artifact_path="explain")


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
        for j, (pic, label) in enumerate(((img, "input"), (cam, "Grad-CAM"), (overlay(img, cam), "overlay"))):
            ax = axes[i][j]
            ax.imshow(pic, cmap="jet" if j == 1 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def figure_cams(runs: list[str], out: Path, images: int = 6) -> Path:
    """The same test images across runs of increasing ε (paper Fig. 2/5): input, then one overlay per run.

    Uses each run's saved maps (``dpcam explain`` first); runs are ordered by achieved ε (∞ last).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpcam.train import run_dir

    names = [resolve_run(r) for r in runs]
    cols = []
    for name in names:
        folder = metrics_dir(name)
        if not (folder / "maps.npy").is_file():
            raise UserError(f"run {name!r} has no saved maps ({folder}/maps.npy); run `dpcam explain {name}` first")
        info = json.loads((folder / "explain.json").read_text())
        train_json = run_dir(name) / "train.json"
        train = json.loads(train_json.read_text()) if train_json.is_file() else {}
        eps = train.get("epsilon")
        cols.append({"name": name, "eps": float("inf") if eps is None else float(eps), "info": info,
                     "maps": np.load(folder / "maps.npy", mmap_mode="r"), "idx": np.load(folder / "map_indices.npy"),
                     "data": load_dataset(info["data_dir"])})
    cols.sort(key=lambda c: c["eps"])
    common = cols[0]["idx"]
    for c in cols[1:]:
        common = common[np.isin(common, c["idx"])]
    chosen = common[:images]
    if chosen.size == 0:
        raise UserError("the runs share no scored test image; explain them on the same dataset split")
    fig, axes = plt.subplots(len(chosen), len(cols) + 1, figsize=(1.9 * (len(cols) + 1), 1.9 * len(chosen) + 0.5), squeeze=False)
    for i, idx in enumerate(chosen):
        base = np.asarray(cols[0]["data"].images[idx], dtype=np.float32) / 255
        axes[i][0].imshow(base)
        for j, c in enumerate(cols, start=1):
            k = int(np.flatnonzero(c["idx"] == idx)[0])
            img = np.asarray(c["data"].images[idx], dtype=np.float32) / 255
            axes[i][j].imshow(overlay(img, np.asarray(c["maps"][k], dtype=np.float32)))
            if i == 0:
                eps = "ε = ∞" if c["eps"] == float("inf") else f"ε = {c['eps']:.3g}"
                flag = "\nDEGENERATE" if c["info"]["degenerate"] else ""
                axes[i][j].set_title(f"{c['name']}\n{eps}{flag}", fontsize=7)
        if i == 0:
            axes[i][0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out


def score_family(family: str, grid, cfg: ExplainConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Score every run of ``family`` in the grid into ``metrics/<family>/<run>/`` (one process for all)."""
    import shutil

    from dpcam.config import family_runs

    results = []
    for spec in family_runs(grid, family, METRICS_ROOT, trained=True):
        if spec.metrics_dir.exists():
            shutil.rmtree(spec.metrics_dir)
        results.append(score(spec.name, cfg, progress=progress, out=spec.metrics_dir))
    return results
