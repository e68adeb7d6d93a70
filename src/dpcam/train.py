"""The train stage: fit one model under one privacy scheme, checkpoint, resume, evaluate.

``fit`` is the pure-ish core (data and config in, model and a :class:`~dpcam.records.TrainRecord`
out; search calls it); ``run`` is the stage shell that adds MLflow and writes ``models/<run>/``
(weights, how to rebuild them, ``train.json``); ``run_family`` trains every run of one family of
the grid in one process.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpcam import layout
from dpcam.config import GridConfig, TrainConfig
from dpcam.data.store import PreparedDataset, load_dataset
from dpcam.errors import UserError
from dpcam.families import check_flags, family_runs, fresh, run_config
from dpcam.names import CLIPPED_SCHEMES
from dpcam.records import TrainRecord

log = logging.getLogger("dpcam.train")

COLLAPSE_SHARE = 0.9  # a model predicting one class for ≥ 90% of the test set is collapsed
# settings that may differ between a checkpoint and the run resuming it
_RESUMABLE = {"device", "eval_batch_size", "keep_best", "name"}


@dataclass
class FitResult:
    model: nn.Module  # the plain module (no Opacus hooks), best-validation weights when keep_best
    metrics: TrainRecord
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
            hint = (
                f"derivatives of {cfg.dataset}: {', '.join(have)}" if have else f"no derivatives of {cfg.dataset} yet"
            )
            raise UserError(f"unknown LDP dataset {cfg.ldp!r} ({path} does not exist; {hint}); run `dpcam ldp` first")
        raise UserError(
            f"unknown dataset {cfg.dataset!r} ({path} does not exist); "
            f"run `dpcam prepare --dataset {cfg.dataset}` first"
        )
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


def load_checkpoint(path: Path, cfg: TrainConfig) -> dict[str, Any]:
    """Load a checkpoint for resuming ``cfg``; refuse one from another config or without its ledger."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(
            f"{path}: not a readable dpcam checkpoint ({type(e).__name__}); delete it and train without --resume"
        ) from None
    theirs, ours = ckpt.get("config", {}), _fingerprint(cfg)
    diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
    if diff:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {ours.get(k)!r}" for k in diff[:4])
        raise UserError(
            f"{path}: checkpoint is from another config ({shown}); "
            "resume with the same settings or use another run name"
        )
    if cfg.scheme in CLIPPED_SCHEMES and not ckpt.get("ledger"):
        raise UserError(
            f"{path}: DP checkpoint has no privacy ledger; refusing to resume (it would reset ε); retrain from scratch"
        )
    return ckpt


# ------------------------------------------------------------------------------------ fit, step by step


@dataclass
class _Training:
    """Everything one fit carries from epoch to epoch (and into its checkpoint)."""

    cfg: TrainConfig
    device: torch.device
    data: PreparedDataset
    splits: tuple[Any, Any, Any]  # train, val, test
    setup: Any  # privacy.engine.PrivateSetup
    schedule: Any
    sampler_gen: torch.Generator
    noise_gen: torch.Generator
    start_epoch: int = 0
    steps: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=lambda: {"val_accuracy": -1.0, "epoch": -1, "state": None})


def _splits(cfg: TrainConfig, data: PreparedDataset):
    train, val, test = data.split("train"), data.split("val"), data.split("test")
    if cfg.train_size is not None:
        train = train.subset(cfg.train_size)  # same images for every seed: the dataset is the variable
    if len(train) == 0 or len(val) == 0 or len(test) == 0:
        raise UserError(
            f"{data.path}: train/val/test splits must all be non-empty (sizes {len(train)}/{len(val)}/{len(test)})"
        )
    return train, val, test


def _start(cfg: TrainConfig) -> _Training:
    """Data, model, optimizer and the private setup of a fresh run (the noise calibrated for its plan)."""
    from dpcam.models import create_model
    from dpcam.privacy.engine import make_private

    device = resolve_device(cfg.device)
    data = open_data(cfg)
    train, val, test = _splits(cfg, data)
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
    return _Training(
        cfg, device, data, (train, val, test), setup, _make_schedule(cfg, setup.optimizer), sampler_gen, noise_gen
    )


def _restore(t: _Training, ckpt: dict[str, Any]) -> None:
    """Continue an interrupted run: weights, optimizer, schedule, the privacy ledger and every RNG state."""
    t.setup.plain_module.load_state_dict(ckpt["model"])
    t.setup.optimizer.load_state_dict(ckpt["optimizer"])
    t.schedule.load_state_dict(ckpt["schedule"])
    if ckpt.get("ledger"):
        t.setup.load_state_dict(ckpt["ledger"])
    t.sampler_gen.set_state(ckpt["sampler_rng"])
    t.noise_gen.set_state(ckpt["noise_rng"])  # a CPU ByteTensor, also for a CUDA generator
    torch.set_rng_state(ckpt["torch_rng"])
    t.start_epoch, t.history, t.steps = ckpt["epoch"], list(ckpt["history"]), int(ckpt["steps"])
    t.best = {"val_accuracy": ckpt["best_val_accuracy"], "epoch": ckpt["best_epoch"], "state": ckpt["best_state"]}
    log.info("resuming %s at epoch %d (ε spent so far %.4g)", t.cfg.run_name, t.start_epoch, t.setup.epsilon())


def _train_epoch(t: _Training, epoch: int, progress: bool) -> float:
    """One pass over the (Poisson) loader; returns the mean training loss."""
    from tqdm.auto import tqdm

    setup, cfg = t.setup, t.cfg
    setup.module.train()
    total, count = 0.0, 0
    bar = tqdm(
        setup.data_loader,
        desc=f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        disable=None if progress else True,
    )
    for x, y in bar:
        setup.optimizer.zero_grad(set_to_none=True)
        x = x.to(t.device).contiguous()  # Opacus's per-example conv gradients assume contiguous NCHW
        out = setup.module(x)
        # an empty Poisson batch is still a step: noise only
        loss = out.sum() * 0.0 if len(y) == 0 else setup.criterion(out, y.to(t.device))
        with warnings.catch_warnings():
            # Opacus's hooks on the first layer: the images need no gradient, and that is fine
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        setup.optimizer.step()
        t.steps += 1
        total += float(loss.detach()) * len(y)
        count += len(y)
    t.schedule.step()
    return total / max(count, 1)


def _validate(t: _Training, epoch: int, train_loss: float) -> dict[str, float]:
    """The epoch's row of the history; keeps the best-validation weights."""
    val_pred, val_true = predict(t.setup.plain_module, t.splits[1], t.cfg.eval_batch_size, t.device)
    row = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_accuracy": float((val_pred == val_true).mean()),
        "epsilon_spent": t.setup.epsilon(),
        "lr": t.schedule.get_last_lr()[0],
    }
    t.history.append(row)
    if row["val_accuracy"] > t.best["val_accuracy"]:
        t.best = {
            "val_accuracy": row["val_accuracy"],
            "epoch": epoch + 1,
            "state": copy.deepcopy(t.setup.plain_module.state_dict()),
        }
    return row


def _save_checkpoint(t: _Training, epoch: int, path: Path, extra_state: dict[str, Any] | None) -> None:
    layout.save_torch(
        {
            "config": _fingerprint(t.cfg),
            "epoch": epoch + 1,
            "steps": t.steps,
            "model": t.setup.plain_module.state_dict(),
            "optimizer": t.setup.optimizer.state_dict(),
            "schedule": t.schedule.state_dict(),
            "ledger": t.setup.state_dict(),
            "sampler_rng": t.sampler_gen.get_state(),
            "noise_rng": t.noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "history": t.history,
            "best_val_accuracy": t.best["val_accuracy"],
            "best_epoch": t.best["epoch"],
            "best_state": t.best["state"],
            **(extra_state or {}),
        },
        path,
    )


def _finish(t: _Training, seconds: float) -> TrainRecord:
    """Best-validation weights back in, test metrics, privacy report: the run's record."""
    cfg, plain = t.cfg, t.setup.plain_module
    if cfg.keep_best and t.best["state"] is not None:
        plain.load_state_dict(t.best["state"])
    test_pred, test_true = predict(plain, t.splits[2], cfg.eval_batch_size, t.device)
    privacy = {**t.setup.report(), "steps": t.steps}  # steps taken (the ledger's count is the same for DP runs)
    record = TrainRecord(
        dataset=cfg.dataset,
        ldp=cfg.ldp,
        ldp_guarantee=t.data.manifest.get("guarantee") if cfg.ldp else None,
        model=cfg.model,
        **privacy,
        epochs=cfg.epochs,
        train_size=len(t.splits[0]),
        best_epoch=t.best["epoch"] if cfg.keep_best else cfg.epochs,
        val_accuracy=t.best["val_accuracy"] if cfg.keep_best else t.history[-1]["val_accuracy"],
        **classification_metrics(test_pred, test_true, t.data.num_classes, "test"),
        train_seconds=seconds,
        device=t.device.type,
        collapsed=False,
    )
    record.collapsed = record.test_majority_share >= COLLAPSE_SHARE
    if record.collapsed:
        warnings.warn(
            f"{cfg.run_name}: collapsed model: predicts class {int(np.argmax(record.test_pred_histogram))} "
            f"for {record.test_majority_share:.0%} of the test set",
            stacklevel=3,
        )
    return record


def fit(
    cfg: TrainConfig,
    *,
    checkpoint: Path | None = None,
    resume: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    extra_state: dict[str, Any] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``cfg`` and return the plain model, its record and the per-epoch history.

    Data: train split (Poisson-sampled for every DP scheme, expected batch ``cfg.batch_size``),
    validation each epoch on the plain module, test at the end with the best-validation weights
    (validation data is not training data, so choosing the epoch spends no training privacy).
    ``checkpoint``: written atomically after every epoch; with ``resume`` training continues from
    it with the same privacy ledger and RNG states, so the result equals an uninterrupted run.
    ``extra_state`` is stored in the checkpoint verbatim (the MLflow run id).
    """
    from tqdm.auto import tqdm

    ckpt = load_checkpoint(checkpoint, cfg) if resume and checkpoint is not None and checkpoint.exists() else None
    if resume and ckpt is None:
        raise UserError(f"--resume: no checkpoint at {checkpoint}; train without --resume to start the run")
    t = _start(cfg)
    if ckpt is not None:
        _restore(t, ckpt)
    started = time.perf_counter()
    for epoch in range(t.start_epoch, cfg.epochs):
        row = _validate(t, epoch, _train_epoch(t, epoch, progress))
        if checkpoint is not None:
            _save_checkpoint(t, epoch, checkpoint, extra_state)
        if on_epoch is not None:
            on_epoch(epoch + 1, row)
        if progress:
            tqdm.write(
                f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                f"val_acc {row['val_accuracy']:.3f} ε {row['epsilon_spent']:.4g}"
            )
    record = _finish(t, time.perf_counter() - started)
    return FitResult(t.setup.release(), record, t.history)  # no Opacus hooks left on the returned model


# ------------------------------------------------------------------------------------ saved models


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
    layout.save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    layout.write_text(out / layout.MODEL_JSON, json.dumps(spec, indent=2) + "\n")


def load_model(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained run's plain model (eval mode) from models/<run>/."""
    from dpcam.models import create_model

    path = Path(run) if Path(run).is_dir() else layout.run_dir(str(run))
    if not (path / "model.pt").is_file() or not (path / layout.MODEL_JSON).is_file():
        raise UserError(f"run {str(run)!r}: no trained model at {path}/model.pt; run `dpcam train` for it first")
    spec = json.loads((path / layout.MODEL_JSON).read_text())
    model = create_model(spec["model"], spec["num_classes"], spec["image_size"], small_input=spec["small_input"])
    model.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
    return model.eval(), spec


# ------------------------------------------------------------------------------------ the stage


def run(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    grid: str | None = None,
    out: Path | None = None,
    profile: str | None = None,
) -> TrainRecord:
    """The train stage: fit with MLflow tracking; write ``out`` (default ``models/<run>/``).

    ``out`` gets model.pt, model.json and train.json. ``grid`` tags the MLflow run (``dpcam.grid``)
    so the runs of one study filter together in the UI; ``profile`` (params.yaml's ``profile``) is
    recorded in train.json and tagged ``dpcam.profile``.
    """
    from dpcam import tracking

    name = cfg.run_name
    out = Path(out) if out is not None else layout.MODELS_ROOT / name
    checkpoint = out / layout.CHECKPOINT
    run_id = _resumed_run_id(checkpoint, cfg, name, out, resume)
    data = open_data(cfg)
    tags = {
        "dpcam.scheme": cfg.scheme,
        "dpcam.dataset": cfg.dataset,
        "dpcam.model": cfg.model,
        "dataset.images_sha256": data.manifest.get("checksums", {}).get("images.npy", ""),
    }
    tags.update({k: v for k, v in (("dpcam.grid", grid), ("dpcam.profile", profile)) if v})
    with tracking.run(cfg.dataset, name, run_id=run_id, tags=tags) as mlflow_id:
        if run_id is None:
            tracking.log_params(cfg.model_dump(mode="json"))

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            tracking.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)

        result = fit(
            cfg,
            checkpoint=checkpoint,
            resume=resume,
            on_epoch=on_epoch,
            extra_state={"mlflow_run_id": mlflow_id},
            progress=progress,
        )
        record = result.metrics.model_copy(update={"run_name": name, "mlflow_run_id": mlflow_id, "profile": profile})
        save_model(result.model, cfg, data, out)
        tracking.log_metrics({k: v for k, v in record.to_json().items() if k != "schema"})
        tracking.set_tags({"dpcam.collapsed": record.collapsed, "dpcam.accountant": record.accountant})
        example = data.split("test").batch([0, 1])[0].numpy()
        clean, _ = load_model(out)  # rebuilt from the saved files: no Opacus hooks, proves the save reloads
        record.mlflow_model_uri = tracking.log_model(clean, input_example=example)
        record.write(out / layout.TRAIN_JSON)
        tracking.log_artifact(out / layout.TRAIN_JSON)
    checkpoint.unlink()  # finished: the model and metrics are the run's outputs now
    return record


def _resumed_run_id(checkpoint: Path, cfg: TrainConfig, name: str, out: Path, resume: bool) -> str | None:
    """The MLflow run id to continue (``--resume``), None for a fresh run; refuses to overwrite an interrupted one."""
    if resume:
        if not checkpoint.exists():
            raise UserError(f"--resume: no checkpoint at {checkpoint}; train without --resume to start the run")
        return load_checkpoint(checkpoint, cfg).get("mlflow_run_id")
    if checkpoint.exists():
        raise UserError(
            f"{checkpoint} exists: run {name} was interrupted; pass --resume to continue it with its privacy ledger, "
            f"or delete {out} to start over"
        )
    return None


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
    The folder is rebuilt from scratch (DVC removed it before running the stage, or the user asked
    for the family again): a run left half-way by an interrupted stage is trained again from the start,
    never resumed from a checkpoint of another configuration.
    """
    check_flags(family, grid, flags or {})
    specs = family_runs(grid, family, layout.MODELS_ROOT)
    cfgs = [run_config(s, grid, base) for s in specs]  # every config is validated before anything is trained
    return [
        run(cfg, progress=progress, grid=grid.name, out=fresh(s.model_dir), profile=profile)
        for s, cfg in zip(specs, cfgs)
    ]
