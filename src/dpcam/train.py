"""The train stage: fit one model under one privacy scheme, checkpoint, resume, evaluate.

``fit`` is the pure-ish core (data and config in, model and a :class:`~dpcam.records.TrainRecord`
out; search calls it); ``run`` is the stage shell that adds MLflow and writes ``models/<run>/``
(weights, how to rebuild them, ``train.json``); ``run_family`` trains every run of one family of
the grid in one process.

A run holds a lock on its folder (``models/<run>/.train.lock``, ``flock``) from before its first
check to its last write: a second process training the same run name is refused with one line
naming the live one, instead of both writing into one folder (and one MLflow run with --resume).

What MLflow gets (:func:`mlflow_params`, :func:`mlflow_metrics`): the settings that applied to the
run (ε = ``inf`` for the non-private schemes, the clipping bound only for clipped ones, the data's
ε for LDP runs under ``ldp_epsilon``), train.json's numbers as metrics with the same values, and
the per-epoch curves under their own keys (``val_accuracy_epoch`` at steps 1..E, so the
``val_accuracy`` MLflow shows is the selected epoch's, as in train.json).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import os
import shutil
import socket
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpcam import guard, layout, records
from dpcam.config import GridConfig, TrainConfig
from dpcam.data.augment import views
from dpcam.data.store import PreparedDataset, fingerprint, load_dataset
from dpcam.errors import UserError
from dpcam.families import check_flags, family_runs, run_config, schedule_of_run
from dpcam.names import CLIPPED_SCHEMES, NOISED_SCHEMES, UNGUARANTEED_SCHEMES
from dpcam.records import TrainRecord, calibration_error, calibration_features
from dpcam.saved import load_model, resolve_device, save_model

log = logging.getLogger("dpcam.train")

COLLAPSE_SHARE = 0.9  # a model predicting one class for ≥ 90% of the test set is collapsed
UNDERTRAINED_Z = 2.0  # a last-epoch record by more than this many standard errors: still rising
# settings that may differ between a checkpoint and the run resuming it
_RESUMABLE = {"device", "eval_batch_size", "keep_best", "name"}
LOCK_FILE = ".train.lock"  # in the run's folder while a process trains it
STAMP = ".stamp"  # in a finished grid run's folder: what its outputs were made from (run_stamp)
RUN_ID_FILE = ".mlflow-run-id"  # in a run's folder while its MLflow run is open: ended KILLED if left RUNNING
# per-epoch MLflow metric keys (steps 1..E) of the history's rows; none of them is a train.json key
EPOCH_METRICS = {
    "train_loss": "train_loss",
    "val_accuracy": "val_accuracy_epoch",
    "epsilon_spent": "epsilon_spent",
    "lr": "lr",
}


@dataclass
class FitResult:
    model: nn.Module  # the plain module (no Opacus hooks), best-validation weights when keep_best
    metrics: TrainRecord
    history: list[dict[str, float]]
    predictions: dict[str, np.ndarray] = field(default_factory=dict)  # test: index, pred, label


VERSIONED = ("torch", "opacus", "captum", "dp-accounting", "dpcam")


def library_versions() -> dict[str, str]:
    """The versions of the libraries a run's numbers depend on (recorded in train.json)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def open_data(cfg: TrainConfig) -> PreparedDataset:
    path = cfg.data_dir
    if cfg.public:
        if not (path / layout.MANIFEST).is_file():
            raise UserError(
                f"no public set of {cfg.dataset!r} ({path} does not exist); run `dpcam prepare --public` first"
            )
        from dpcam.data.public import open_public

        return open_public(path)
    if not (path / layout.MANIFEST).is_file():
        if cfg.ldp:
            have = sorted(p.name for p in path.parent.glob("*") if (p / layout.MANIFEST).is_file())
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
def predict(model: nn.Module, split, batch_size: int, device: torch.device) -> tuple[np.ndarray, ...]:
    """Predicted class, true label and softmax probabilities (float32, one row per image) for every image of
    ``split`` (plain module, eval mode)."""
    was_training = model.training
    model.eval()
    probs, labels = [], []
    for x, y in split.loader(batch_size):
        probs.append(torch.softmax(model(x.to(device)).float(), 1).cpu())
        labels.append(y)
    model.train(was_training)
    prob = torch.cat(probs).numpy()
    return prob.argmax(1), torch.cat(labels).numpy(), prob


def calibration_metrics(prob: np.ndarray, true: np.ndarray, prefix: str) -> dict[str, float]:
    """Expected calibration error (|confidence − accuracy| per equal-width confidence bin, weighted by the bin's
    share of images: :func:`dpcam.records.calibration_error`) and the mean confidence (the predicted class's
    probability) of one split."""
    ece = calibration_error(calibration_features(prob, true).sum(0))
    return {f"{prefix}_ece": float(ece), f"{prefix}_confidence": float(prob.max(1).mean())}


def classification_metrics(pred: np.ndarray, true: np.ndarray, num_classes: int, prefix: str) -> dict[str, Any]:
    """Accuracy, macro-F1, quadratic weighted kappa, the prediction histogram and each class's recall (None for
    a class the split lacks) of one split."""
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
        f"{prefix}_recall": [float((pred[true == c] == c).mean()) if (true == c).any() else None for c in labels],
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
    ckpt = guard.read_pt(path, fix="delete it and train without --resume")
    older = {"precision": "fp32", "ema": None, "augment": "none", "aug_mult": 1}  # keys older checkpoints lack
    theirs, ours = {**older, **ckpt.get("config", {})}, _fingerprint(cfg)
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
    trained: list[str] = field(default_factory=list)  # the parameters trained (a DP run's private ones)
    origin: dict[str, Any] = field(default_factory=dict)  # weights, weights_sha256, public_data (the record's)
    ema: Any = None  # torch.optim.swa_utils.AveragedModel of the weights (cfg.ema), or None
    aug_gen: torch.Generator | None = None  # the augmentation's random numbers (cfg.augment)
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


def _privacy_unit(cfg: TrainConfig, data: PreparedDataset, train_idx: np.ndarray) -> dict[str, Any]:
    """The record's privacy unit: {} for images; for grouped data (prepare.groups) "group" and the stated most
    images of one patient, k (train.max_group_images). A DP run on grouped data without k, or with a patient
    holding more than k training images, is refused before training (one line)."""
    if data.groups is None:
        return {}
    counts = np.bincount(data.groups[train_idx])
    largest = int(counts.max(initial=0))
    k = cfg.max_group_images
    if cfg.scheme in NOISED_SCHEMES and k is None:
        raise UserError(
            f"{data.path} groups images by patient (prepare.groups): set train.max_group_images to the most images "
            f"one patient may have (its training split's largest: {largest}), so ε is stated per patient"
        )
    if k is not None and largest > k:
        names = data.manifest.get("groups", {}).get("names") or []
        g = int(np.argmax(counts))
        who = names[g] if g < len(names) else str(g)
        raise UserError(
            f"{data.path}: patient {who} has {largest} training images, more than train.max_group_images = {k}; "
            "raise it (the guarantee weakens with k) or leave images of that patient out"
        )
    return {"privacy_unit": "group", "group_size": k}


def _start(cfg: TrainConfig) -> _Training:
    """Data, model, optimizer and the private setup of a fresh run (the noise calibrated for its plan)."""
    from dpcam.privacy.engine import make_private

    device = resolve_device(cfg.device)
    data = open_data(cfg)
    train, val, test = _splits(cfg, data)
    origin = {**_origin(cfg, data), **_privacy_unit(cfg, data, train.indices)}
    torch.manual_seed(cfg.seed)
    model, trained, loaded = _model(cfg, data)
    if loaded is not None:
        origin["weights_loaded"] = loaded
        print(f"{cfg.run_name}: {loaded}", file=sys.stderr, flush=True)
    model = model.to(device)
    ema = _ema(cfg, model)  # a copy of the plain model, before Opacus wraps it
    optimizer = _make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad])
    sampler_gen = torch.Generator().manual_seed(cfg.seed)
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    if cfg.batch_size > len(train):
        warnings.warn(
            f"{cfg.run_name}: batch size {cfg.batch_size} is more than the {len(train)} training images; "
            f"using {len(train)}: every step sees the whole training set"
            + (" (sampling rate q = 1: no amplification by subsampling)" if cfg.scheme in CLIPPED_SCHEMES else ""),
            UserWarning,
            stacklevel=3,
        )
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
        precision=cfg.precision,
        large_delta=cfg.force_delta,
    )
    return _Training(
        cfg,
        device,
        data,
        (train, val, test),
        setup,
        _make_schedule(cfg, setup.optimizer),
        sampler_gen,
        noise_gen,
        trained=trained,
        origin=origin,
        ema=ema,
        aug_gen=torch.Generator().manual_seed(cfg.seed + 2) if cfg.augment != "none" else None,
    )


def _ema(cfg: TrainConfig, model: nn.Module):
    """An exponential moving average of ``model``'s weights (PyTorch's AveragedModel; decay ``cfg.ema``), or None.

    Averaging the private iterates is post-processing: it spends no privacy. The average is what is
    validated, kept (``keep_best``) and released."""
    if cfg.ema is None:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)


def _evaluated(t: _Training) -> nn.Module:
    """The weights validation, keep_best and the release use: the moving average when there is one."""
    return t.ema.module if t.ema is not None else t.setup.plain_module


def _model(cfg: TrainConfig, data: PreparedDataset) -> tuple[nn.Module, list[str], str | None]:
    """The model to train, the names of the parameters it trains (``cfg.trainable``; the rest frozen), and the
    weights file's one-line account (every tensor of the file: used, ignored, trained from initialisation; None
    without ``cfg.weights``).

    Fine-tuning (``trainable`` head or last-block) loads ``cfg.weights`` strictly for the frozen trunk, and only
    for it: a trunk tensor the file lacks or holds in another shape is a UserError naming them (a frozen tensor
    left at random initialisation would make the run meaningless). The trained part starts from the seed's
    initialisation, not from the file (whose head was trained for the public task, or for other classes): what
    the model knows beyond the public trunk it learns from the private data, through the accountant.
    """
    from dpcam.models import create_model, freeze, frozen_keys, load_weights, trunk_keys

    model = create_model(cfg.model, data.num_classes, data.image_size, small_input=cfg.small_input, seed=cfg.seed)
    report = None
    if cfg.weights is not None:
        if cfg.trainable == "all":
            report = load_weights(model, cfg.weights, required=trunk_keys(model))
        else:
            trunk = frozen_keys(model, cfg.trainable)
            report = load_weights(model, cfg.weights, required=trunk, only=trunk)
    return model, freeze(model, cfg.trainable), report.summary() if report is not None else None


def _origin(cfg: TrainConfig, data: PreparedDataset) -> dict[str, Any]:
    """What the run starts from and learns without privacy, as the record states it (checked before training):
    ``weights`` and their checksum, and ``public_data`` (the public set of a public run, or the trunk's data)."""
    from dpcam.data.public import public_run_data, trunk_provenance
    from dpcam.data.store import file_sha256
    from dpcam.layout import PREPARED_ROOT

    out: dict[str, Any] = {}
    if cfg.public:
        out["public_data"] = public_run_data(data, PREPARED_ROOT / cfg.dataset)
    if cfg.weights is not None:
        if not Path(cfg.weights).is_file():
            trunk = Path(cfg.weights).parts[:2] == ("models", "public")
            raise UserError(
                f"--weights {cfg.weights}: no such file; "
                + (
                    "train the public trunk first (`dpcam train --family public`, or `dvc repro`)"
                    if trunk
                    else "give a local state dict saved with torch.save (a dpcam trunk: models/public/<run>/model.pt)"
                )
            )
        out["weights"] = str(cfg.weights)
        out["weights_sha256"] = file_sha256(Path(cfg.weights))
        if not cfg.public:
            out["public_data"] = trunk_provenance(cfg.weights, data, private_scheme=cfg.scheme in CLIPPED_SCHEMES)
    return out


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
    if t.ema is not None:
        t.ema.load_state_dict(ckpt["ema"])
    if t.aug_gen is not None:
        t.aug_gen.set_state(ckpt["aug_rng"])
    t.start_epoch, t.history, t.steps = ckpt["epoch"], list(ckpt["history"]), int(ckpt["steps"])
    t.best = {"val_accuracy": ckpt["best_val_accuracy"], "epoch": ckpt["best_epoch"], "state": ckpt["best_state"]}
    eps = t.setup.epsilon()
    spent = "no guarantee" if eps is None else f"ε spent so far {eps:.4g}"
    log.info("resuming %s at epoch %d (%s)", t.cfg.run_name, t.start_epoch, spent)


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
        if t.aug_gen is not None:  # cfg.aug_mult views of each example, view-major (data.augment)
            x = views(x, cfg.aug_mult, t.aug_gen, shift=max(1, round(x.shape[-1] / 16)))
            y = y.repeat_interleave(cfg.aug_mult)
        with setup.autocast():  # bfloat16 activations for precision bf16; a no-op for fp32
            out = setup.module(x)
            # an empty Poisson batch is still a step: noise only
            loss = out.sum() * 0.0 if len(y) == 0 else setup.criterion(out, y.to(t.device))
        value = float(loss.detach())
        if not math.isfinite(value):
            raise Diverged(t, epoch, f"loss = {value} at step {t.steps + 1}")
        with warnings.catch_warnings():
            # Opacus's hooks on the first layer: the images need no gradient, and that is fine
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        setup.average_views(cfg.aug_mult)  # one gradient per example before clipping
        setup.optimizer.step()
        if t.ema is not None:
            t.ema.update_parameters(setup.plain_module)
        t.steps += 1
        total += value * len(y)
        count += len(y)
    t.schedule.step()
    if not all(bool(torch.isfinite(p).all()) for p in setup.plain_module.parameters()):
        raise Diverged(t, epoch, "the weights are not finite")
    return total / max(count, 1)


class Diverged(UserError):
    """Training diverged (a loss or weight of inf or NaN): the run stops, its MLflow run ends FAILED, nothing of
    it is saved (its checkpoint is removed: resuming would diverge again)."""

    def __init__(self, t: _Training, epoch: int, what: str):
        cfg = t.cfg
        super().__init__(
            f"{cfg.run_name}: training diverged in epoch {epoch + 1} ({what}); lr = {cfg.lr:g} is too large for "
            f"this run ({cfg.scheme}, batch size {cfg.batch_size}, {cfg.optimizer}): lower it and train again"
        )


def _validate(t: _Training, epoch: int, train_loss: float) -> dict[str, float]:
    """The epoch's row of the history; keeps the best-validation weights."""
    val_pred, val_true, _ = predict(_evaluated(t), t.splits[1], t.cfg.eval_batch_size, t.device)
    row: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": train_loss,
        "val_accuracy": float((val_pred == val_true).mean()),
        "epsilon_spent": t.setup.epsilon(),  # None for laplace-paper: no guarantee, no ε
        "lr": t.schedule.get_last_lr()[0],
    }
    t.history.append(row)
    if row["val_accuracy"] > t.best["val_accuracy"]:
        t.best = {
            "val_accuracy": row["val_accuracy"],
            "epoch": epoch + 1,
            "state": copy.deepcopy(_evaluated(t).state_dict()),
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
            **({"ema": t.ema.state_dict()} if t.ema is not None else {}),
            **({"aug_rng": t.aug_gen.get_state()} if t.aug_gen is not None else {}),
            **(extra_state or {}),
        },
        path,
    )


def undertrained(curve: list[float], n_val: int, z: float = UNDERTRAINED_Z) -> bool:
    """Whether validation accuracy was still rising at the end of training.

    The rule: the last epoch beats the best of all earlier epochs by more than ``z`` standard errors
    of a difference of two validation accuracies, sqrt(2 p (1 − p) / n_val) at the last epoch's
    accuracy p. A run whose final epoch is still a clear record has not converged: more epochs
    would likely change its numbers. (A cosine schedule's last epochs run at a small learning rate,
    so a converged cosine run gains little in its very last epoch.) One epoch: never undertrained
    by this rule, as nothing earlier exists to compare with.
    """
    if len(curve) < 2:
        return False
    p = curve[-1]
    se = math.sqrt(2 * max(p * (1 - p), 1e-12) / max(n_val, 1))
    return curve[-1] - max(curve[:-1]) > z * se


def _finish(t: _Training, seconds: float) -> tuple[TrainRecord, dict[str, np.ndarray]]:
    """Best-validation weights back in, test metrics, privacy report: the run's record and its test predictions."""
    cfg, plain = t.cfg, t.setup.plain_module
    if cfg.keep_best and t.best["state"] is not None:
        plain.load_state_dict(t.best["state"])
    elif t.ema is not None:  # the released weights are the average's
        plain.load_state_dict(t.ema.module.state_dict())
    test_pred, test_true, test_prob = predict(plain, t.splits[2], cfg.eval_batch_size, t.device)
    privacy = {**t.setup.report(), "steps": t.steps}  # steps taken (the ledger's count is the same for DP runs)
    record = TrainRecord(
        dataset=cfg.dataset,
        data_dir=str(cfg.data_dir),
        data_fingerprint=fingerprint(t.data),
        ldp=cfg.ldp,
        ldp_guarantee=t.data.manifest.get("guarantee") if cfg.ldp else None,
        model=cfg.model,
        **privacy,
        epochs=cfg.epochs,
        train_size=len(t.splits[0]),
        best_epoch=t.best["epoch"] if cfg.keep_best else cfg.epochs,
        val_accuracy=t.best["val_accuracy"] if cfg.keep_best else t.history[-1]["val_accuracy"],
        **classification_metrics(test_pred, test_true, t.data.num_classes, "test"),
        **calibration_metrics(test_prob, test_true, "test"),
        train_seconds=seconds,
        device=t.device.type,
        precision=cfg.precision,
        ema=cfg.ema,
        augment=cfg.augment,
        aug_mult=cfg.aug_mult,
        collapsed=False,
        val_curve=[row["val_accuracy"] for row in t.history],
        undertrained=undertrained([row["val_accuracy"] for row in t.history], len(t.splits[1])),
        versions=library_versions(),
        trainable=cfg.trainable,
        trained_parameter_count=sum(p.numel() for n, p in plain.named_parameters() if n in set(t.trained)),
        trained_parameters=None if cfg.trainable == "all" else list(t.trained),
        **t.origin,
    )
    if record.group_size is not None and record.epsilon is not None and record.delta is not None:
        k = record.group_size  # group privacy: (ε, δ) per image gives (kε, k·e^((k−1)ε)·δ) per group of ≤ k images
        record.group_epsilon = k * record.epsilon
        record.group_delta = min(1.0, k * math.exp((k - 1) * record.epsilon) * record.delta)
    record.collapsed = record.test_majority_share >= COLLAPSE_SHARE
    if record.collapsed:
        warnings.warn(
            f"{cfg.run_name}: collapsed model: predicts class {int(np.argmax(record.test_pred_histogram))} "
            f"for {record.test_majority_share:.0%} of the test set",
            stacklevel=3,
        )
    return record, {"index": t.splits[2].indices, "pred": test_pred, "label": test_true, "prob": test_prob}


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
            eps = row["epsilon_spent"]
            tqdm.write(
                f"{cfg.run_name} epoch {epoch + 1}/{cfg.epochs}: loss {row['train_loss']:.4f} "
                f"val_acc {row['val_accuracy']:.3f} " + ("no guarantee (no ε)" if eps is None else f"ε {eps:.4g}")
            )
    record, predictions = _finish(t, time.perf_counter() - started)
    return FitResult(t.setup.release(), record, t.history, predictions)  # no Opacus hooks left on the returned model


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
    recorded in train.json and tagged ``dpcam.profile``. The folder is locked for the whole run
    (:func:`run_lock`): made (and found writable) before anything else, refused while another
    process trains it.
    """
    out = Path(out) if out is not None else layout.MODELS_ROOT / cfg.run_name
    with run_lock(out, cfg.run_name):
        return _run_locked(cfg, out, resume=resume, progress=progress, grid=grid, profile=profile)


def _run_locked(
    cfg: TrainConfig, out: Path, *, resume: bool, progress: bool, grid: str | None, profile: str | None
) -> TrainRecord:
    from dpcam import tracking

    name = cfg.run_name
    checkpoint = out / layout.CHECKPOINT
    run_id = _resumed_run_id(checkpoint, cfg, name, out, resume)
    data = open_data(cfg)
    if run_id is None:
        end_abandoned(out)
    tags = {
        "dpcam.scheme": cfg.scheme,
        "dpcam.dataset": cfg.dataset,
        "dpcam.model": cfg.model,
        "dataset.images_sha256": data.manifest.get("checksums", {}).get("images.npy", ""),
        **guarantee_tags(cfg),
    }
    tags.update({k: v for k, v in (("dpcam.grid", grid), ("dpcam.profile", profile)) if v})
    try:
        with tracking.run(cfg.dataset, name, run_id=run_id, tags=tags) as mlflow_id:
            layout.write_text(out / RUN_ID_FILE, mlflow_id + "\n")
            if run_id is None:
                tracking.log_params(mlflow_params(cfg, data))

            def on_epoch(epoch: int, row: dict[str, float]) -> None:
                tracking.log_metrics({EPOCH_METRICS[k]: v for k, v in row.items() if k in EPOCH_METRICS}, step=epoch)

            try:
                result = fit(
                    cfg,
                    checkpoint=checkpoint,
                    resume=resume,
                    on_epoch=on_epoch,
                    extra_state={"mlflow_run_id": mlflow_id},
                    progress=progress,
                )
            except Diverged:
                checkpoint.unlink(missing_ok=True)  # its weights lead to the same divergence: no --resume from it
                raise
            record = result.metrics.model_copy(
                update={"run_name": name, "mlflow_run_id": mlflow_id, "profile": profile}
            )
            save_model(result.model, cfg, data, out)
            # every test prediction, for paired differences between runs (report.verdict)
            layout.write_atomic(out / layout.PREDICTIONS, lambda p: np.savez(p, **result.predictions))
            tracking.log_metrics(mlflow_metrics(record, data))
            tracking.set_tags({"dpcam.collapsed": record.collapsed, "dpcam.accountant": record.accountant})
            example = data.split("test").batch([0, 1])[0].numpy()
            clean, _ = load_model(out)  # rebuilt from the saved files: no Opacus hooks, proves the save reloads
            record.mlflow_model_uri = tracking.log_model(clean, input_example=example)
            record.write(out / layout.TRAIN_JSON)
            tracking.log_artifact(out / layout.TRAIN_JSON)
    finally:  # the MLflow run is ended (FINISHED, FAILED or KILLED): only a SIGKILL leaves the file behind
        (out / RUN_ID_FILE).unlink(missing_ok=True)
    checkpoint.unlink()  # finished: the model and metrics are the run's outputs now
    return record


def end_abandoned(out: Path) -> list[str]:
    """End KILLED the MLflow runs of ``out`` that a killed process left RUNNING (named in its run-id file or its
    checkpoint), before the run is trained again from the start; returns their ids."""
    from dpcam import tracking

    ids = []
    try:
        ids.append((out / RUN_ID_FILE).read_text().strip())
    except OSError:
        pass
    if (out / layout.CHECKPOINT).is_file():
        try:
            ids.append(guard.read_pt(out / layout.CHECKPOINT, fix="").get("mlflow_run_id"))
        except UserError:
            pass
    ended = [i for i in dict.fromkeys(ids) if i and tracking.end_abandoned(i)]
    for i in ended:
        log.warning("%s: MLflow run %s was left RUNNING by a killed process; ended it KILLED", out.name, i)
    return ended


def guarantee_tags(cfg: TrainConfig) -> dict[str, str]:
    """MLflow tags set when the run starts (so a failed run carries them too): ``dpcam.guarantee`` (``dp`` for
    gaussian and laplace, ``none`` for laplace-paper, whose noise has no guarantee), ``dpcam.trainable`` and
    ``dpcam.public`` (a run on the public set)."""
    tags = {"dpcam.trainable": cfg.trainable}
    if cfg.scheme in UNGUARANTEED_SCHEMES:
        tags["dpcam.guarantee"] = "none"
    elif cfg.scheme in NOISED_SCHEMES:
        tags["dpcam.guarantee"] = "dp"
    if cfg.public:
        tags["dpcam.public"] = "true"
    return tags


def _ldp_mechanism(data: PreparedDataset) -> tuple[str | None, float | None, dict[str, Any]]:
    """(mechanism name, its ε, its guarantee) of an LDP derivative's manifest."""
    mech = data.manifest.get("mechanism") or {}
    eps = mech.get("epsilon")
    return mech.get("name"), float(eps) if isinstance(eps, (int, float)) else None, data.manifest.get("guarantee") or {}


def mlflow_params(cfg: TrainConfig, data: PreparedDataset) -> dict[str, Any]:
    """The run's settings as MLflow params: only those that applied to it.

    ``epsilon``: the target ε as in run names (``1``, ``0.5``) for gaussian/laplace, ``inf`` for
    none and clip-only, absent for laplace-paper (no guarantee: ``nominal_epsilon``, ``nominal_delta`` and
    ``nominal_accountant`` are what its σ was calibrated from, and ``guarantee`` is ``none``) and for ldp (no
    DP-SGD; the data's ε is ``ldp_epsilon``, with ``ldp_mechanism`` and ``ldp_scope``: what that ε protects).
    ``delta`` only where it enters an (ε, δ) guarantee (gaussian, laplace); ``clip`` and ``grad_sample_mode``
    only for clipped schemes; ``accountant`` only for gaussian (laplace has its own, logged as the
    ``dpcam.accountant`` tag).
    """
    params = cfg.model_dump(mode="json")
    for key in ("epsilon", "delta", "clip", "accountant", "grad_sample_mode"):
        params.pop(key)
    if cfg.scheme in NOISED_SCHEMES:
        params.update(epsilon=layout.format_eps(cfg.epsilon), delta=cfg.delta)
    elif cfg.scheme in UNGUARANTEED_SCHEMES:  # no ε: the one it was calibrated from, under its own name
        params.update(nominal_epsilon=layout.format_eps(cfg.epsilon), nominal_delta=cfg.delta, guarantee="none")
    elif cfg.scheme != "ldp":
        params["epsilon"] = "inf"
    if cfg.scheme in CLIPPED_SCHEMES:
        params.update(clip=cfg.clip, grad_sample_mode=cfg.grad_sample_mode)
    if cfg.scheme == "gaussian":
        params["accountant"] = cfg.accountant
    if cfg.scheme in UNGUARANTEED_SCHEMES:
        params["nominal_accountant"] = cfg.accountant
    if cfg.scheme == "ldp":
        mechanism, eps, guarantee = _ldp_mechanism(data)
        params.update(
            ldp_mechanism=mechanism,
            ldp_epsilon=layout.format_eps(eps) if eps is not None else None,
            ldp_scope=guarantee.get("scope"),
        )
    return params


def mlflow_metrics(record: TrainRecord, data: PreparedDataset) -> dict[str, Any]:
    """train.json's numbers as MLflow metrics (same keys, same values), plus ``ldp_epsilon`` for LDP runs.

    ∞ is left out (ε of a non-private run: MLflow's SQL stores would show it as 1.8e308; the param
    ``epsilon = inf`` says it); ``delta`` only where it enters an (ε, δ) guarantee.
    """
    out = {k: v for k, v in record.to_json().items() if k != "schema"}
    out.update({f"test_recall_{c}": v for c, v in enumerate(record.test_recall or []) if v is not None})
    if record.scheme not in NOISED_SCHEMES:
        out.pop("delta", None)
    if record.scheme == "ldp":
        _, eps, guarantee = _ldp_mechanism(data)
        out.update(ldp_epsilon=eps, ldp_image_epsilon=guarantee.get("image_epsilon"))
    return out


# ------------------------------------------------------------------------------------ the run folder's lock


@contextlib.contextmanager
def run_lock(folder: Path, name: str) -> Iterator[None]:
    """Make ``folder`` and hold an exclusive lock on ``folder/.train.lock`` for the block.

    One line (UserError) when the folder cannot be made or written (before any training), or when
    another process holds the lock (naming its pid and host). The lock file is removed on the way
    out; a killed process's stale file is harmless (the kernel dropped its lock). Folders this
    call made are removed again when they are left empty. No-op where ``fcntl`` is missing.
    """
    folder = Path(folder)
    made = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(made)
        raise UserError(_unwritable(made[-1].parent if made else folder, folder, e)) from None
    try:
        fd = _lock(folder / LOCK_FILE, name)
    except BaseException:
        _remove_empty(made)
        raise
    try:
        yield
    finally:
        if fd is not None:
            (folder / LOCK_FILE).unlink(missing_ok=True)  # still holding it: a waiter re-checks the path
            os.close(fd)
        _remove_empty(made)


def _unwritable(blocked: Path, folder: Path, e: OSError) -> str:
    return (
        f"{blocked} is not writable ({e.strerror or type(e).__name__}); the run's checkpoint, model and "
        f"train.json go to {folder}: fix its permissions (or run dpcam from a folder you can write)"
    )


def _lock(path: Path, name: str) -> int | None:
    """The locked file descriptor of ``path`` (our pid and host written in it); None without fcntl."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the folder was removed by a run that just ended empty-handed
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            raise UserError(_unwritable(path.parent, path.parent, e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"process {holder[0]}" + (f" on {holder[1]}" if len(holder) > 1 else "") if holder else "a process"
            stop = f"stop it (kill {holder[0]})" if holder else "stop it"
            raise UserError(
                f"run {name!r} is being trained right now by {who} ({path} is locked); wait for it to finish, "
                f"or {stop} and continue it with --resume"
            ) from None
        except OSError as e:  # a file system without flock: train unlocked rather than not at all
            warnings.warn(
                f"{path}: cannot lock ({e.strerror}); two processes training {name} would clash", stacklevel=4
            )
            os.close(fd)
            return None
        try:
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:  # not a file its last holder removed between our open and our lock
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            return fd
        os.close(fd)
    raise UserError(f"{path}: could not take the run's lock (it keeps changing hands); try again")


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def _empty_folder(folder: Path) -> None:
    """Remove everything in ``folder`` but its lock file (a grid run's folder is rebuilt from scratch)."""
    for entry in folder.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


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
    return run_jobs(_train_fresh, jobs, [s.name for s in specs], **grid.run_options())


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
