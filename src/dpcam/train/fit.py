"""Fit one model: Poisson-sampled DP-SGD (or plain SGD), validation each epoch, checkpoints that resume
with the same privacy ledger and RNG states, test metrics at the best-validation epoch."""

from __future__ import annotations

import copy
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dpcam import guard, layout
from dpcam.config import TrainConfig
from dpcam.data.augment import views
from dpcam.data.store import PreparedDataset, fingerprint, load_dataset
from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, NOISED_SCHEMES
from dpcam.records import TrainRecord, calibration_error, calibration_features
from dpcam.saved import resolve_device

log = logging.getLogger("dpcam.train")

COLLAPSE_SHARE = 0.9  # a model predicting one class for ≥ 90% of the test set is collapsed
UNDERTRAINED_Z = 2.0  # a last-epoch record by more than this many standard errors: still rising
# settings that may differ between a checkpoint and the run resuming it
_RESUMABLE = {"device", "eval_batch_size", "keep_best", "name"}


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
    setup: Any  # privacy.setup.PrivateSetup
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
    from dpcam.models import create_model, freeze, frozen_keys, trunk_keys
    from dpcam.weights import load_weights

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
