"""One trial of a search: draw the settings, train (:func:`dpcam.train.fit.fit`), score explanations, record.

The trial's objectives are the accountant's ε of the noise, sampling rate and steps actually used,
the best validation accuracy, and the explanation objective on validation images (the test split
is left for the final front).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dpcam import layout
from dpcam.config import ExplainConfig, SearchConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.search.objectives import Objective, explanation_quality, objective_names

# what a trial records from its TrainRecord (user attributes): the privacy accounting of the run
PRIVACY_FIELDS = (
    "target_epsilon",
    "epsilon",
    "delta",
    "noise_multiplier",
    "max_grad_norm",
    "sample_rate",
    "steps",
    "accountant",
    "epsilon_rdp_check",
    "epsilon_composition_bound",
)
# user attributes a retried trial inherits from its failed original and must not keep
_RESET_ON_RETRY = ("epochs_done", "error", "explain_mean", "degenerate", "degenerate_reasons")


@dataclass
class SearchContext:
    """What every trial of one ``dpcam search`` process shares."""

    cfg: SearchConfig
    base: TrainConfig
    explain: ExplainConfig
    objective: Objective
    study_name: str
    dataset: str
    drawn: int | None = None  # K of a random-count search
    progress: bool = True
    timings: list[dict[str, float]] = field(default_factory=list)


@dataclass
class _Outcome:
    """What a trial's training and scoring produced."""

    metrics: Any  # dpcam.records.TrainRecord
    quality: dict[str, Any]  # explanation_quality's result
    train_s: float
    explain_s: float


# ------------------------------------------------------------------------------------- settings


def _suggest_log(trial, name: str, bounds: Sequence[float]) -> float:
    low, high = float(bounds[0]), float(bounds[1])
    return trial.suggest_float(name, low, high, log=True)


def suggest(trial, cfg: SearchConfig) -> dict[str, Any]:
    """Sample one trial's training settings: the TrainConfig fields that the search varies.

    Parameter names: ``scheme``, ``model`` (when ``cfg.models``), ``epsilon`` (target), ``clip``
    and ``lr`` (gaussian) or ``laplace_clip`` and ``laplace_lr`` (laplace; L1 clipping has another
    scale), ``epochs``, ``batch_size``.
    """
    scheme = trial.suggest_categorical("scheme", list(cfg.schemes))
    out: dict[str, Any] = {"scheme": scheme}
    if cfg.models:
        out["model"] = trial.suggest_categorical("model", list(cfg.models))
    out["epsilon"] = _suggest_log(trial, "epsilon", cfg.epsilon)
    prefix = "laplace_" if scheme == "laplace" else ""
    out["clip"] = _suggest_log(trial, f"{prefix}clip", getattr(cfg, f"{prefix}clip"))
    out["lr"] = _suggest_log(trial, f"{prefix}lr", getattr(cfg, f"{prefix}lr"))
    out["epochs"] = trial.suggest_int("epochs", int(cfg.epochs[0]), int(cfg.epochs[1]))
    out["batch_size"] = trial.suggest_categorical("batch_size", list(cfg.batch_size))
    return out


def trial_config(base: TrainConfig, settings: dict[str, Any], study_name: str, number: int) -> TrainConfig:
    """The TrainConfig of trial ``number``: ``base`` (the train section) with the sampled ``settings``."""
    return TrainConfig.model_validate(
        {**base.model_dump(), **settings, "ldp": None, "name": f"{study_name}-trial-{number}"}
    )


def trial_model_dir(study_name: str, number: int) -> Path:
    """``models/search/<study>/trial-<n>/``: a trial's saved model (kept while it may be on the front)."""
    return layout.search_trial_dir(study_name, number)


# ------------------------------------------------------------------------------------- the trial


def run_trial(trial, ctx: SearchContext) -> tuple[float, float, float]:
    """One trial: train, score explanations on validation images, save the model; return the objectives.

    Writes user attributes: ``train_config``, ``epochs_done`` (per epoch), the privacy fields,
    ``explain_mean``, ``degenerate`` and ``degenerate_reasons``, timings; and one nested MLflow run.
    """
    from dpcam import tracking

    started = time.perf_counter()
    _stop_beyond_drawn(trial, ctx)
    _reset_retried(trial)
    cfg = _configure(trial, ctx)
    tags = {
        "dpcam.study": ctx.study_name,
        "dpcam.trial": trial.number,
        "dpcam.scheme": cfg.scheme,
        "dpcam.model": cfg.model,
    }
    with tracking.run(ctx.dataset, f"trial-{trial.number}", nested=True, tags=tags):
        tracking.log_params({**trial.params, "trial": trial.number})
        outcome = _train_and_score(trial, cfg, ctx)
        _record(trial, outcome)
        values = (float(outcome.metrics.epsilon), float(outcome.metrics.val_accuracy), float(outcome.quality["value"]))
        objective_s = time.perf_counter() - started
        trial.set_user_attr(
            "seconds", {"train": outcome.train_s, "explain": outcome.explain_s, "objective": objective_s}
        )
        _track(trial, ctx, outcome, values)
    ctx.timings.append(
        {"number": trial.number, "objective": objective_s, "train": outcome.train_s, "explain": outcome.explain_s}
    )
    return values


def _stop_beyond_drawn(trial, ctx: SearchContext) -> None:
    """A random-count search prunes (without training) every trial beyond the K drawn, and stops the study."""
    import optuna

    if ctx.drawn is not None and trial.number >= ctx.drawn:
        trial.set_user_attr("skipped", f"beyond the {ctx.drawn} trials drawn for this random-count search")
        trial.study.stop()
        raise optuna.TrialPruned(f"the search's {ctx.drawn} trials are all started")


def _reset_retried(trial) -> None:
    """A retried trial starts with its failed original's attributes: clear those this trial sets anew."""
    for key in _RESET_ON_RETRY:
        if key in trial.user_attrs:
            trial.set_user_attr(key, None)


def _configure(trial, ctx: SearchContext) -> TrainConfig:
    """Draw the trial's settings and record its TrainConfig, sampler and worker; UserError for an invalid config."""
    settings = suggest(trial, ctx.cfg)
    try:
        cfg = trial_config(ctx.base, settings, ctx.study_name, trial.number)
    except Exception as e:
        raise UserError(f"trial {trial.number}: settings {settings} are not a valid training config ({e})") from None
    trial.set_user_attr("train_config", cfg.model_dump(mode="json"))
    trial.set_user_attr("sampler", ctx.cfg.sampler)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    return cfg


def _train_and_score(trial, cfg: TrainConfig, ctx: SearchContext) -> _Outcome:
    """Train, save the model under :func:`trial_model_dir`, score explanations on validation images.

    A UserError is recorded (trial attribute ``error``, MLflow tag) and raised again: the trial fails.
    """
    from dpcam import tracking
    from dpcam.saved import resolve_device, save_model
    from dpcam.train.fit import fit, open_data

    try:
        t0 = time.perf_counter()
        result = fit(cfg, on_epoch=lambda epoch, row: trial.set_user_attr("epochs_done", epoch), progress=False)
        train_s = time.perf_counter() - t0
        data = open_data(cfg)
        save_model(result.model, cfg, data, trial_model_dir(ctx.study_name, trial.number))
        model = result.model.eval().to(resolve_device(cfg.device))  # fit returns it free of Opacus hooks
        t0 = time.perf_counter()
        quality = explanation_quality(
            model,
            data.split("val", with_masks=ctx.objective.needs_masks),
            data.num_classes,
            ctx.objective,
            ctx.explain,
            ctx.cfg.explain_images,
            resolve_device(cfg.device),
        )
        explain_s = time.perf_counter() - t0
    except UserError as e:
        trial.set_user_attr("error", str(e))
        tracking.set_tags({"dpcam.error": str(e)})
        raise
    # test metrics are not read here: the test split is for the final front only
    return _Outcome(result.metrics, quality, train_s, explain_s)


def _record(trial, outcome: _Outcome) -> None:
    """The trial's user attributes: privacy fields, best epoch, explanation mean and degeneracy."""
    m, quality = outcome.metrics, outcome.quality
    for k in PRIVACY_FIELDS:
        trial.set_user_attr(k, getattr(m, k))
    trial.set_user_attr("best_epoch", m.best_epoch)
    trial.set_user_attr("explain_mean", quality["mean"])
    trial.set_user_attr("explain_images", quality["images"])
    trial.set_user_attr("degenerate", quality["degenerate"] or bool(quality["reasons"]))
    trial.set_user_attr("degenerate_reasons", quality["reasons"])


def _track(trial, ctx: SearchContext, outcome: _Outcome, values: tuple[float, float, float]) -> None:
    """The trial's nested MLflow run: the three objectives, explanation mean, degeneracy, noise and timings."""
    from dpcam import tracking

    m, quality = outcome.metrics, outcome.quality
    names = objective_names(ctx.objective)
    tracking.log_metrics(
        {
            **dict(zip(names, values)),
            "explain_mean": quality["mean"],
            "degenerate": float(trial.user_attrs["degenerate"]),
            "noise_multiplier": m.noise_multiplier,
            "steps": m.steps,
            "sample_rate": m.sample_rate,
            "train_seconds": outcome.train_s,
            "explain_seconds": outcome.explain_s,
        }
    )
    tracking.set_tags(
        {
            "dpcam.degenerate": trial.user_attrs["degenerate"],
            "dpcam.degenerate_reasons": "; ".join(quality["reasons"]) or "-",
            "dpcam.accountant": m.accountant,
        }
    )
