"""The train stage: fit one model under one privacy scheme, checkpoint, resume, evaluate.

``fit`` is the pure-ish core (data and config in, model and metrics out; search calls it);
``run`` is the stage shell that adds MLflow and writes ``models/<run>/`` (weights, how to rebuild
them, ``train.json``); ``run_family`` trains every run of one family of the grid in one process.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from dpcam.config import DP_SCHEMES, GridConfig, RunSpec, TrainConfig, family_runs
from dpcam.data.store import PreparedDataset, load_dataset
from dpcam.errors import UserError

log = logging.getLogger("dpcam.train")

MODELS_ROOT = Path("models")
CHECKPOINT = "checkpoint.pt"
COLLAPSE_SHARE = 0.9  # a model predicting one class for ≥ 90% of the test set is collapsed
# settings that may differ between a checkpoint and the run resuming it
_RESUMABLE = {"device", "eval_batch_size", "keep_best", "name"}


@dataclass
class FitResult:
    model: nn.Module  # the plain module (no Opacus hooks), best-validation weights when keep_best
    metrics: dict[str, Any]
    history: list[dict[str, float]]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
    return torch.device(device)


def open_data(cfg: TrainConfig) -> PreparedDataset:
    path = cfg.data_dir
    if not (path / "manifest.json").is_file():
        if cfg.ldp:
            have = sorted(p.name for p in path.parent.glob("*") if (p / "manifest.json").is_file())
            hint = f"derivatives of {cfg.dataset}: {', '.join(have)}" if have else f"no derivatives of {cfg.dataset} yet"
            raise UserError(f"unknown LDP dataset {cfg.ldp!r} ({path} does not exist; {hint}); run `dpcam ldp` first")
        raise UserError(f"unknown dataset {cfg.dataset!r} ({path} does not exist); run `dpcam prepare --dataset {cfg.dataset}` first")
    return load_dataset(path)


def _fingerprint(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in _RESUMABLE}


@torch.no_grad()
def predict(model: nn.Module, split, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and true label for every image of ``split`` (plain module, eval mode)."""
    was_training = model.training
    model.eval()
    preds, labels = [], []
    for x, y in split.loader(batch_size):
        preds.append(model(x.to(device)).argmax(1).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(preds).numpy(), torch.cat(labels).numpy()


def classification_metrics(pred: np.ndarray, true: np.ndarray, num_classes: int, prefix: str) -> dict[str, Any]:
    """Accuracy, macro-F1, quadratic weighted kappa and the prediction histogram of one split."""
    from sklearn.metrics import cohen_kappa_score, f1_score

    labels = list(range(num_classes))
    hist = np.bincount(pred, minlength=num_classes)
    out = {
        f"{prefix}_accuracy": float((pred == true).mean()),
        f"{prefix}_macro_f1": float(f1_score(true, pred, labels=labels, average="macro", zero_division=0)),
        f"{prefix}_qwk": float(cohen_kappa_score(true, pred, labels=labels, weights="quadratic"))
        if len(np.unique(np.concatenate([true, pred]))) > 1
        else 0.0,
        f"{prefix}_pred_histogram": hist.tolist(),
        f"{prefix}_majority_share": float(hist.max() / max(1, hist.sum())),
    }
    if math.isnan(out[f"{prefix}_qwk"]):
        out[f"{prefix}_qwk"] = 0.0
    return out


def _make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _make_schedule(cfg: TrainConfig, optimizer):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Load a checkpoint for resuming ``cfg``; refuse one from another config or without its ledger."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - anything unreadable is the user's file to replace
        raise UserError(f"{path}: not a readable dpcam checkpoint ({type(e).__name__}); delete it and train without --resume") from None
    theirs, ours = ckpt.get("config", {}), _fingerprint(cfg)
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:4])
        raise UserError(f"{path}: checkpoint is from another config ({shown}); resume with the same settings or use another run name")
    if cfg.scheme in DP_SCHEMES + ("clip-only",) and not ckpt.get("ledger"):
        raise UserError(f"{path}: DP checkpoint has no privacy ledger; refusing to resume (it would reset ε); retrain from scratch")
    return ckpt


def fit(
    cfg: TrainConfig,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``cfg`` and return the plain model, its final metrics and the per-epoch history.

    Data: train split (Poisson-sampled for every DP scheme, expected batch ``cfg.batch_size``),
    validation each epoch on the plain module, test at the end with the best-validation weights
    (validation data is not training data, so choosing the epoch spends no training privacy).
    ``checkpoint``: written atomically after every epoch; with ``resume`` training continues from
    it with the same privacy ledger and RNG states, so the result equals an uninterrupted run.
    ``extra_state`` is stored in the checkpoint verbatim (the MLflow run id).
    """
    from tqdm.auto import tqdm

    from dpcam.models import create_model
    from dpcam.privacy.engine import make_private

    device = resolve_device(cfg.device)
    data = open_data(cfg)
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    if cfg.train_size is not None:
        train = train.subset(cfg.train_size)  # same images for every seed: the dataset is the variable
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise UserError(f"{data.path}: train/val/test splits must all be non-empty (sizes {len(train)}/{len(val)}/{len(test)})")

    ckpt = load_checkpoint(checkpoint, cfg) if resume and checkpoint is not None and checkpoint.exists() else None
    if resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint at {checkpoint}; train without --resume to start the run")

    torch.manual_seed(cfg.seed)
    model = create_model(
        cfg.model, data.num_classes, data.image_size, weights=cfg.weights, small_input=cfg.small_input, seed=cfg.seed
    ).to(device)
    optimizer = _make_optimizer(cfg, model.parameters())
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    loader = train.loader(batch_size=min(cfg.batch_size, len(train)), shuffle=True, generator=sampler_gen)
    setup = make_private(
        model,
        optimizer,
        loader,
        scheme=cfg.scheme,
        target_epsilon=cfg.target_epsilon,
        delta=cfg.delta,
        max_grad_norm=cfg.clip,
        epochs=cfg.epochs,
        accountant=cfg.accountant,
        grad_sample_mode=cfg.grad_sample_mode,
        noise_generator=noise_gen,
    )
    plain = setup.plain_module
    schedule = _make_schedule(cfg, setup.optimizer)
    loss_fn = setup.criterion  # cross-entropy; Opacus's wrapper of it for grad_sample_mode "ghost"

    start_epoch, history, best = 0, [], {"val_accuracy": -1.0, "epoch": -1, "state": None}
    if ckpt is not None:
        plain.load_state_dict(ckpt["model"])
        setup.optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("ledger"):
            setup.load_state_dict(ckpt["ledger"])
        sampler_gen.set_state(ckpt["sampler_rng"])
        noise_gen.set_state(ckpt["noise_rng"])  # a CPU ByteTensor, also for a CUDA generator
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch, history = ckpt["epoch"], list(ckpt["history"])
        best = {"val_accuracy": ckpt["best_val_accuracy"], "epoch": ckpt["best_epoch"], "state": ckpt["best_state"]}
        log.info("resuming %s at epoch %d (ε spent so far %.4g)", cfg.run_name, start_epoch, setup.epsilon())

    steps = int(ckpt["steps"]) if ckpt else 0
    started = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        setup.module.train()
        total, count = 0.0, 0
        bar = tqdm(setup.data_loader, desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None if progress else True)
        for x, y in bar:
            setup.optimizer.zero_grad(set_to_none=True)
            x = x.to(device).contiguous()  # Opacus's per-example conv gradients assume contiguous NCHW
            out = setup.module(x)
            # an empty Poisson batch is still a step: noise only
            loss = out.sum() * 0.0 if len(y) == 0 else loss_fn(out, y.to(device))
            with warnings.catch_warnings():
                # Opacus's hooks on the first layer: the images need no gradient, and that is fine
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            setup.optimizer.step()
            steps += 1
            total += float(loss.detach()) * len(y)
            count += len(y)
        schedule.step()
        val_pred, val_true = predict(plain, val, cfg.eval_batch_size, device)
        row = {
            "epoch": epoch + 1,
            "train_loss": total / max(count, 1),
            "val_accuracy": float((val_pred == val_true).mean()),
            "epsilon_spent": setup.epsilon(),
            "lr": schedule.get_last_lr()[0],
        }
        history.append(row)
        if row["val_accuracy"] > best["val_accuracy"]:
            best = {"val_accuracy": row["val_accuracy"], "epoch": epoch + 1, "state": copy.deepcopy(plain.state_dict())}
        if checkpoint is not None:
            _atomic_save(
                {
                    "config": _fingerprint(cfg),
                    "epoch": epoch + 1,
                    "steps": steps,
                    "model": plain.state_dict(),
                    "optimizer": setup.optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "ledger": setup.state_dict(),
                    "sampler_rng": sampler_gen.get_state(),
                    "noise_rng": noise_gen.get_state(),
                    "torch_rng": torch.get_rng_state(),
                    "history": history,
                    "best_val_accuracy": best["val_accuracy"],
                    "best_epoch": best["epoch"],
                    "best_state": best["state"],
                    **(extra_state or {}),
                },
                checkpoint,
            )
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if progress:
            tqdm.write(
                f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                f"val_acc {row['val_accuracy']:.3f} ε {row['epsilon_spent']:.4g}"
            )

    if cfg.keep_best and best["state"] is not None:
        plain.load_state_dict(best["state"])
    report = setup.report()
    test_pred, test_true = predict(plain, test, cfg.eval_batch_size, device)
    metrics: dict[str, Any] = {
        "dataset": cfg.dataset,
        "ldp": cfg.ldp,
        "ldp_guarantee": data.manifest.get("guarantee") if cfg.ldp else None,
        "model": cfg.model,
        "scheme": cfg.scheme,
        **report,
        "steps": steps,
        "epochs": cfg.epochs,
        "train_size": len(train),
        "best_epoch": best["epoch"] if cfg.keep_best else cfg.epochs,
        "val_accuracy": best["val_accuracy"] if cfg.keep_best else history[-1]["val_accuracy"],
        **classification_metrics(test_pred, test_true, data.num_classes, "test"),
        "train_seconds": time.perf_counter() - started,
        "device": device.type,
    }
    metrics["collapsed"] = metrics["test_majority_share"] >= COLLAPSE_SHARE
    if metrics["collapsed"]:
        warnings.warn(
            f"{cfg.run_name}: collapsed model: predicts class {int(np.argmax(metrics['test_pred_histogram']))} "
            f"for {metrics['test_majority_share']:.0%} of the test set"
        )
    return FitResult(setup.release(), metrics, history)  # no Opacus hooks left on the returned model


def run_dir(name: str) -> Path:
    """``models/<name>/`` (a single run) or ``models/<family>/<name>/`` (a grid run); the former if neither exists."""
    for path in (MODELS_ROOT / name, *sorted(MODELS_ROOT.glob(f"*/{name}"))):
        if (path / "model.json").is_file():
            return path
    return MODELS_ROOT / name


def save_model(model: nn.Module, cfg: TrainConfig, data: PreparedDataset, out: Path) -> None:
    """models/<run>/model.pt (weights) + model.json (how to rebuild it), written atomically."""
    spec = {
        "model": cfg.model,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
        "small_input": cfg.small_input,
        "classes": data.classes,
        "dataset": cfg.dataset,
        "data_dir": str(cfg.data_dir),
        "config": cfg.model_dump(mode="json"),
    }
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    tmp = out / ".model.json.tmp"
    tmp.write_text(json.dumps(spec, indent=2) + "\n")
    os.replace(tmp, out / "model.json")


def training_run_id(name: str) -> str | None:
    """The MLflow run id recorded in the run's train.json (None, with a warning, when there is none)."""
    train_json = run_dir(name) / "train.json"
    run_id = json.loads(train_json.read_text()).get("mlflow_run_id") if train_json.is_file() else None
    if not run_id:
        log.warning("%s: no MLflow run id in %s; results are in files only", name, train_json)
    return run_id


def load_model(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained run's plain model (eval mode) from models/<run>/."""
    from dpcam.models import create_model

    path = Path(run) if Path(run).is_dir() else run_dir(str(run))
    if not (path / "model.pt").is_file() or not (path / "model.json").is_file():
        raise UserError(f"run {str(run)!r}: no trained model at {path}/model.pt; run `dpcam train` for it first")
    spec = json.loads((path / "model.json").read_text())
    model = create_model(spec["model"], spec["num_classes"], spec["image_size"], small_input=spec["small_input"])
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec


def run(
    cfg: TrainConfig, *, resume: bool = False, progress: bool = True, grid: str | None = None, out: Path | None = None
) -> dict[str, Any]:
    """The train stage: fit with MLflow tracking; write ``out`` (default ``models/<run>/``).

    ``out`` gets model.pt, model.json and train.json. ``grid`` tags the MLflow run (``dpcam.grid``)
    so the runs of one study filter together in the UI.
    """
    from dpcam import tracking

    name = cfg.run_name
    out = Path(out) if out is not None else MODELS_ROOT / name
    checkpoint = out / CHECKPOINT
    run_id = None
    if resume:
        if not checkpoint.exists():
            raise UserError(f"--resume: no checkpoint at {checkpoint}; train without --resume to start the run")
        run_id = load_checkpoint(checkpoint, cfg).get("mlflow_run_id")
    elif checkpoint.exists():
        raise UserError(
            f"{checkpoint} exists: run {name} was interrupted; pass --resume to continue it with its privacy ledger, "
            f"or delete {out} to start over"
        )
    data = open_data(cfg)
    tags = {"dpcam.scheme": cfg.scheme, "dpcam.dataset": cfg.dataset, "dpcam.model": cfg.model,
            "dataset.images_sha256": data.manifest.get("checksums", {}).get("images.npy", "")}
    if grid:
        tags["dpcam.grid"] = grid
    with tracking.run(cfg.dataset, name, run_id=run_id, tags=tags) as mlflow_id:
        if run_id is None:
            tracking.log_params(cfg.model_dump(mode="json"))

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

        result = fit(cfg, checkpoint=checkpoint, resume=resume, on_epoch=on_epoch,
                     extra_state={"mlflow_run_id": mlflow_id}, progress=progress)
        metrics = {**result.metrics, "run_name": name, "mlflow_run_id": mlflow_id}
        save_model(result.model, cfg, data, out)
        tracking.log_metrics(metrics)
        tracking.set_tags({"dpcam.collapsed": metrics["collapsed"], "dpcam.accountant": metrics.get("accountant")})
        example = data.split("test").batch([0, 1])[0].numpy()
        clean, _ = load_model(out)  # rebuilt from the saved files: no Opacus hooks, proves the save reloads
        metrics["mlflow_model_uri"] = tracking.log_model(clean, input_example=example)
        path = out / "train.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(_json_safe(metrics), indent=2) + "\n")
        os.replace(tmp, path)
        tracking.log_artifact(path)
    checkpoint.unlink()  # finished: the model and metrics are the run's outputs now
    return metrics


def _json_safe(obj):
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # ε = ∞ (not private) is null, as DESIGN.md §5 says
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    return obj


def grid_config(spec: RunSpec, grid: GridConfig, base: TrainConfig) -> TrainConfig:
    """The TrainConfig of one grid run: the train section with what the run varies."""
    over: dict[str, Any] = {"scheme": spec.scheme, "model": spec.model, "seed": spec.seed, "name": spec.name,
                            "ldp": spec.ldp, "train_size": spec.train_size}
    if spec.scheme in ("gaussian", "laplace"):
        over["epsilon"] = spec.epsilon
    if spec.scheme == "laplace":
        over["lr"] = grid.laplace_lr
    if spec.clip is not None:
        over["clip"] = spec.clip
    if spec.scheme in ("none", "ldp"):  # no clipping: DP-SGD's large learning rate would diverge
        over.update(grid.nonprivate.model_dump())
    return TrainConfig.model_validate({**base.model_dump(), **over})


def run_family(family: str, grid: GridConfig, base: TrainConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train every run of ``family`` in the grid into ``models/<family>/`` (one process for all of them).

    The folder is rebuilt from scratch (DVC removed it before running the stage, or the user asked
    for the family again): a run left half-way by an interrupted stage is trained again from the start,
    never resumed from a checkpoint of another configuration.
    """
    specs = family_runs(grid, family, MODELS_ROOT)
    cfgs = [grid_config(s, grid, base) for s in specs]  # every config is validated before anything is trained
    results = []
    for spec, cfg in zip(specs, cfgs):
        if spec.model_dir.exists():
            import shutil

            shutil.rmtree(spec.model_dir)
        results.append(run(cfg, progress=progress, grid=grid.name, out=spec.model_dir))
    return results
