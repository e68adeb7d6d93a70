"""`dpcam search`: Optuna multi-objective search for the Pareto front of (ε ↓, accuracy ↑, explanation quality ↑).

Optuna is the engine (samplers, RDB storages, heartbeats, visualisation); this module adds what is
dpcam's own:

- the search space (``search`` section of params.yaml) on top of the ``train`` section, and
  one training run per trial (:func:`dpcam.train.fit`); ε of a trial is the accountant's ε for the
  noise, sampling rate and steps actually used;
- the three objectives: achieved ε (minimised), validation accuracy (maximised), an explanation
  metric on validation images (maximised; see :data:`OBJECTIVES`). A model flagged degenerate on
  those images gets the worst explanation value (it would otherwise score a "perfect" Average Drop),
  with the reasons in the trial's user attributes. The test split is read only to re-evaluate the
  final front;
- a study identity (objective names, directions, dataset) checked when a study is resumed;
- one parent MLflow run per study and tracking store, one nested run per trial (through
  :mod:`dpcam.tracking`);
- ``reports/search/``: the front as Markdown/CSV with test metrics, all trials as CSV, 2-D
  projections and a 3-D scatter (PNG), an index.html, and the cost of tuning (:func:`tuning_cost`,
  Papernot & Steinke 2022).
"""

from __future__ import annotations

import csv
import html
import json
import logging
import math
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from dpcam.config import ExplainConfig, SearchConfig, TrainConfig
from dpcam.errors import UserError

log = logging.getLogger("dpcam.search")

DIRECTIONS = ("minimize", "maximize", "maximize")
MODELS_ROOT = Path("models/search")
DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# study user attributes that make a study's identity
ATTR_OBJECTIVES, ATTR_DATASET, ATTR_DRAWN = "dpcam.objectives", "dpcam.dataset", "dpcam.trials_drawn"
ATTR_DISTRIBUTION = "dpcam.trials_distribution"
# RDP orders for the cost-of-tuning bounds
RDP_ORDERS = (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 24.0, 32.0, 48.0, 64.0,
              96.0, 128.0, 256.0, 512.0)


# ------------------------------------------------------------------------------------- objectives


@dataclass(frozen=True)
class Objective:
    """An explanation-quality objective: the mean of ``key`` from registered metric ``metric``.

    Every objective is maximised: for a lower-is-better metric the value is ``complement − mean``
    (100 − Average Drop %, 1 − deletion AUC), so 0 is the worst value of every objective.
    """

    name: str
    metric: str  # name in dpcam.explain.metrics.METRICS
    key: str  # per-image key whose mean is the metric
    complement: float | None = None
    needs_masks: bool = False

    @property
    def label(self) -> str:
        """The objective's name in tables and plots, e.g. ``100 - avg_drop_pct``."""
        return f"{self.complement:g} - {self.key}" if self.complement is not None else self.key

    def value(self, mean: float) -> float:
        """The maximised value of a metric mean."""
        return self.complement - mean if self.complement is not None else mean

    worst: float = 0.0


OBJECTIVES: dict[str, Objective] = {o.name: o for o in (
    Objective("masked_score_pct", "confidence", "masked_score_pct"),
    Objective("avg_drop_pct", "confidence", "avg_drop_pct", complement=100.0),
    Objective("increase_conf_pct", "confidence", "increase_conf_pct"),
    Objective("masked_accuracy_pct", "confidence", "masked_accuracy_pct"),
    Objective("insertion_auc", "deletion-insertion", "insertion_auc"),
    Objective("deletion_auc", "deletion-insertion", "deletion_auc", complement=1.0),
    Objective("pointing_game", "pointing-game", "pointing_game", needs_masks=True),
    Objective("energy_pointing_game", "energy-pointing-game", "energy_pointing_game", needs_masks=True),
)}


def objective_names(objective: Objective) -> list[str]:
    """The study's three objective names, in the order of :data:`DIRECTIONS`."""
    return ["epsilon", "val_accuracy", objective.label]


def explanation_quality(
    model,
    split,
    num_classes: int,
    objective: Objective,
    explain: ExplainConfig,
    max_images: int,
    device,
) -> dict[str, Any]:
    """Explanation objective of ``model`` on up to ``max_images`` images of ``split`` (means in memory, no files).

    ``split``: an :class:`dpcam.data.store.ImageDataset` (with masks for pointing objectives); the
    images are a fixed random subset (seed ``explain.seed``) so both classes appear. Maps follow
    ``explain`` (method, target, layer, steps, tolerance). Returns ``{"value": maximised objective,
    "mean": metric mean or None, "images": n, "degenerate": bool, "reasons": [...],
    "accuracy": accuracy on those images}``; a degenerate model (or one with no valid image for the
    metric) gets ``objective.worst``.
    """
    import torch

    from dpcam.explain.gradcam import gradcam
    from dpcam.explain.metrics import DegeneracyStats, ExplainBatch, RunningMean, get_metrics

    (metric,) = get_metrics([objective.metric])
    n = min(int(max_images), len(split))
    if n == 0:
        raise UserError(f"{split.ds.path}: the split used for explanations is empty; prepare the dataset with a validation split")
    positions = np.sort(np.random.default_rng(explain.seed).permutation(len(split))[:n])
    options = {"deletion-insertion": {"steps": explain.steps}, "pointing-game": {"tolerance": explain.tolerance}}
    options = {k: v for k, v in options.get(metric.name, {}).items() if v is not None}
    sums, degeneracy = RunningMean(), DegeneracyStats(num_classes)
    model.eval()
    for start in range(0, n, explain.batch_size):
        batch = split.batch(positions[start:start + explain.batch_size])
        x, y = batch[0].to(device), batch[1].to(device)
        masks = batch[2].to(device) if len(batch) > 2 else None
        maps, target, probs = gradcam(model, x, target=y if explain.target == "label" else None,
                                      layer=explain.layer, method=explain.method)
        eb = ExplainBatch(model, x, maps, target, probs=probs, labels=y, masks=masks)
        with torch.no_grad():
            values, valid = metric(eb, **options)
        sums.add(values, valid)
        degeneracy.add(probs, y)
    mean = sums.result().get(objective.key)
    deg = degeneracy.result()
    reasons = list(deg["reasons"])
    if mean is None:
        reasons.append(f"no image with a valid {objective.key} among the {n} scored")
    value = objective.worst if reasons else float(objective.value(mean))
    return {"value": value, "mean": mean, "images": n, "degenerate": deg["degenerate"], "reasons": reasons,
            "accuracy": deg["accuracy"]}


# ------------------------------------------------------------------------------------- storage


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (SQLAlchemy's rendering; a regex for unparsable URLs)."""
    import re

    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is still shown, without what looks like a password
        return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def open_storage(url: str, *, heartbeat: int, grace_period: int | None, max_retry: int):
    """An Optuna ``RDBStorage`` with heartbeats and ``RetryHeartbeatStaleTrialCallback``; UserError if unreachable.

    A worker that dies mid-trial stops its heartbeat; after ``grace_period`` seconds the next
    worker to start a trial marks it FAIL and the callback queues it again with the same settings
    (up to ``max_retry`` times). ``RetryHeartbeatStaleTrialCallback`` is Optuna 4.9+'s name for
    ``RetryFailedTrialCallback`` (deprecated there).

    A sqlite file's folder must exist, except for the default ``mlruns/`` which is created. The
    error line shows the URL without its password.
    """
    import optuna
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    shown = mask_url(url)
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 - sqlalchemy raises ArgumentError and others for a malformed URL
        raise UserError(f"--storage {shown}: not a database URL; use e.g. {DEFAULT_STORAGE} or "
                        "postgresql://user:password@host/db") from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        folder = Path(parsed.database).parent
        if folder == Path("mlruns"):
            folder.mkdir(exist_ok=True)
        elif not folder.is_dir():
            raise UserError(f"--storage {shown}: folder {folder} does not exist; create it or use {DEFAULT_STORAGE}")
        engine_kwargs["connect_args"] = {"timeout": 60}  # workers sharing one sqlite file wait for its lock
    elif parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":  # psycopg 3 (a dependency), whichever driver SQLAlchemy defaults to
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
        engine_kwargs["pool_pre_ping"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            for attempt in range(6):
                try:
                    return optuna.storages.RDBStorage(
                        url,
                        engine_kwargs=engine_kwargs,
                        heartbeat_interval=heartbeat,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry),
                    )
                except sqlalchemy.exc.SQLAlchemyError as e:
                    # workers starting together on a new database race to create Optuna's tables:
                    # the loser sees a duplicate table/type/version row; the tables exist then
                    if attempt == 5 or not _init_race(e):
                        raise
                    time.sleep(0.2 + 0.3 * np.random.default_rng().random())
        except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:
            why = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            why = why.replace(url, shown).replace(parsed.password or "\0", "***")
            raise UserError(f"--storage {shown}: cannot open the study storage ({why}); check that the database "
                            "server is running and the URL, user and password are right") from None


def _init_race(e: Exception) -> bool:
    """Whether a storage error is another process creating the same schema at the same moment."""
    import sqlalchemy.exc

    text = str(getattr(e, "orig", None) or e).lower()
    return isinstance(e, sqlalchemy.exc.IntegrityError) or any(
        w in text for w in ("duplicate", "already exists", "unique constraint", "database is locked"))


def make_sampler(cfg: SearchConfig, seed: int | None):
    """The Optuna sampler of ``cfg.sampler`` seeded with ``seed`` (None: OS entropy)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if cfg.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=cfg.population, seed=seed)
        if cfg.sampler == "tpe":
            return optuna.samplers.TPESampler(n_startup_trials=cfg.population, seed=seed)
        return optuna.samplers.RandomSampler(seed=seed)


def _worker_seed(cfg: SearchConfig, created: bool, n_existing: int) -> int | None:
    """The study's creator uses ``cfg.seed`` (a fresh search is reproducible); a worker that joins or
    resumes a study mixes in its process, host and the trial count so it does not repeat others' draws.
    A random number of trials needs unpredictable hyper-parameters as well: OS entropy (None)."""
    if cfg.trials_distribution != "fixed":
        return None
    if created:
        return cfg.seed
    host = int.from_bytes(socket.gethostname().encode()[:8].ljust(8, b"\0"), "little")
    return int(np.random.SeedSequence([cfg.seed, n_existing, os.getpid(), host]).generate_state(1)[0])


def _draw_trials(cfg: SearchConfig) -> int | None:
    """The number of trials K of a random-count search, from OS entropy (None for a fixed count)."""
    rng = np.random.default_rng()
    if cfg.trials_distribution == "poisson":
        return int(rng.poisson(cfg.trials))
    if cfg.trials_distribution == "geometric":
        return int(rng.geometric(1.0 / max(cfg.trials, 1)))  # support 1, 2, ...; mean = trials
    return None


def open_study(storage, cfg: SearchConfig, study_name: str, objective: Objective, dataset: str):
    """Create the study, or load it when it exists (``load_if_exists``); check it has the same identity.

    Returns ``(study, created)``. A study created with other objective names, directions, dataset
    or count distribution is refused with one line.
    """
    import optuna

    names = objective_names(objective)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=list(DIRECTIONS))
        created = True
        study.set_user_attr(ATTR_OBJECTIVES, names)
        study.set_user_attr(ATTR_DATASET, dataset)
        study.set_user_attr(ATTR_DISTRIBUTION, cfg.trials_distribution)
        if cfg.trials_distribution != "fixed":
            study.set_user_attr(ATTR_DRAWN, _draw_trials(cfg))
            study.set_user_attr("dpcam.trials_mean", cfg.trials)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
        created = False
        attrs = study.user_attrs
        for _ in range(50):  # its creator sets the identity right after creating it
            if ATTR_OBJECTIVES in attrs and ATTR_DISTRIBUTION in attrs:
                break
            time.sleep(0.1)
            attrs = study.user_attrs
        theirs = [d.name.lower() for d in study.directions]
        where = f"study {study_name!r} in {mask_url(storage.url)}"
        if ATTR_OBJECTIVES not in attrs:
            raise UserError(f"{where} was not created by dpcam search (it has no objective names); use another --study-name")
        if attrs[ATTR_OBJECTIVES] != names or theirs != list(DIRECTIONS):
            got = ", ".join(f"{n} ({d})" for n, d in zip(attrs[ATTR_OBJECTIVES], theirs))
            raise UserError(f"{where} was created with other objectives ({got}); this search has "
                            f"{', '.join(f'{n} ({d})' for n, d in zip(names, DIRECTIONS))}: use another --study-name "
                            f"or objective {attrs[ATTR_OBJECTIVES][-1]!r}")
        if attrs.get(ATTR_DATASET) != dataset:
            raise UserError(f"{where} searches dataset {attrs.get(ATTR_DATASET)!r}, not {dataset!r}; use another --study-name")
        if attrs.get(ATTR_DISTRIBUTION, "fixed") != cfg.trials_distribution:
            raise UserError(f"{where} has trials_distribution {attrs.get(ATTR_DISTRIBUTION)!r}, not "
                            f"{cfg.trials_distribution!r}: a random-count search cannot be mixed with another; "
                            "use another --study-name")
    return study, created


# ------------------------------------------------------------------------------------- trials


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
    return TrainConfig.model_validate({**base.model_dump(), **settings, "ldp": None,
                                       "name": f"{study_name}-trial-{number}"})


def trial_model_dir(study_name: str, number: int) -> Path:
    """``models/search/<study>/trial-<n>/``: a trial's saved model (kept while it may be on the front)."""
    return MODELS_ROOT / study_name / f"trial-{number}"


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


def run_trial(trial, ctx: SearchContext) -> tuple[float, float, float]:
    """One trial: train, score explanations on validation images, save the model; return the objectives.

    Writes user attributes: ``train_config``, ``epochs_done`` (per epoch), the privacy fields,
    ``explain_mean``, ``degenerate`` and ``degenerate_reasons``, timings; and one nested MLflow run.
    """
    import optuna

    from dpcam import tracking
    from dpcam.train import fit, open_data, resolve_device, save_model

    started = time.perf_counter()
    if ctx.drawn is not None and trial.number >= ctx.drawn:
        trial.set_user_attr("skipped", f"beyond the {ctx.drawn} trials drawn for this random-count search")
        trial.study.stop()
        raise optuna.TrialPruned(f"the search's {ctx.drawn} trials are all started")
    for key in ("epochs_done", "error", "explain_mean", "degenerate", "degenerate_reasons"):
        if key in trial.user_attrs:  # a retried trial starts with its failed original's attributes
            trial.set_user_attr(key, None)
    settings = suggest(trial, ctx.cfg)
    try:
        cfg = trial_config(ctx.base, settings, ctx.study_name, trial.number)
    except Exception as e:  # noqa: BLE001 - pydantic's ValidationError: a searched value TrainConfig refuses
        raise UserError(f"trial {trial.number}: settings {settings} are not a valid training config ({e})") from None
    trial.set_user_attr("train_config", cfg.model_dump(mode="json"))
    trial.set_user_attr("sampler", ctx.cfg.sampler)
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    tags = {"dpcam.study": ctx.study_name, "dpcam.trial": trial.number, "dpcam.scheme": cfg.scheme,
            "dpcam.model": cfg.model}
    with tracking.run(ctx.dataset, f"trial-{trial.number}", nested=True, tags=tags):
        tracking.log_params({**trial.params, "trial": trial.number})
        try:
            t0 = time.perf_counter()
            result = fit(cfg, on_epoch=lambda epoch, row: trial.set_user_attr("epochs_done", epoch), progress=False)
            train_s = time.perf_counter() - t0
            data = open_data(cfg)
            folder = trial_model_dir(ctx.study_name, trial.number)
            save_model(result.model, cfg, data, folder)
            model = result.model.eval().to(resolve_device(cfg.device))  # fit returns it free of Opacus hooks
            t0 = time.perf_counter()
            quality = explanation_quality(
                model, data.split("val", with_masks=ctx.objective.needs_masks), data.num_classes,
                ctx.objective, ctx.explain, ctx.cfg.explain_images, resolve_device(cfg.device))
            explain_s = time.perf_counter() - t0
        except UserError as e:
            trial.set_user_attr("error", str(e))
            tracking.set_tags({"dpcam.error": str(e)})
            raise
        m = result.metrics  # test metrics are not read here: the test split is for the final front only
        privacy = {k: m.get(k) for k in ("target_epsilon", "epsilon", "delta", "noise_multiplier", "max_grad_norm",
                                         "sample_rate", "steps", "accountant", "epsilon_rdp_check",
                                         "epsilon_composition_bound")}
        for k, v in privacy.items():
            trial.set_user_attr(k, v)
        trial.set_user_attr("best_epoch", m.get("best_epoch"))
        trial.set_user_attr("explain_mean", quality["mean"])
        trial.set_user_attr("explain_images", quality["images"])
        trial.set_user_attr("degenerate", quality["degenerate"] or bool(quality["reasons"]))
        trial.set_user_attr("degenerate_reasons", quality["reasons"])
        values = (float(m["epsilon"]), float(m["val_accuracy"]), float(quality["value"]))
        objective_s = time.perf_counter() - started
        trial.set_user_attr("seconds", {"train": train_s, "explain": explain_s, "objective": objective_s})
        names = objective_names(ctx.objective)
        tracking.log_metrics({**dict(zip(names, values)), "explain_mean": quality["mean"],
                              "degenerate": float(trial.user_attrs["degenerate"]),
                              "noise_multiplier": m.get("noise_multiplier"), "steps": m.get("steps"),
                              "sample_rate": m.get("sample_rate"), "train_seconds": train_s,
                              "explain_seconds": explain_s})
        tracking.set_tags({"dpcam.degenerate": trial.user_attrs["degenerate"],
                           "dpcam.degenerate_reasons": "; ".join(quality["reasons"]) or "-",
                           "dpcam.accountant": m.get("accountant")})
    ctx.timings.append({"number": trial.number, "objective": objective_s, "train": train_s, "explain": explain_s})
    return values


# ------------------------------------------------------------------------------------- the front


def complete_trials(study) -> list:
    """The study's COMPLETE trials, by number."""
    from optuna.trial import TrialState

    return sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number)


def pareto_front(study) -> list:
    """The non-dominated COMPLETE trials (Optuna's ``study.best_trials``), sorted by ε then number."""
    return sorted(study.best_trials, key=lambda t: (t.values[0], t.number))


def prune_models(study, study_name: str) -> None:
    """Delete saved models of trials no longer on the front (domination is permanent: they never return)."""
    front = {t.number for t in study.best_trials}
    folder = MODELS_ROOT / study_name
    if not folder.is_dir():
        return
    for path in folder.glob("trial-*"):
        try:
            number = int(path.name.split("-", 1)[1])
        except ValueError:
            continue
        if number not in front:
            shutil.rmtree(path, ignore_errors=True)


def evaluate_front_member(trial, ctx: SearchContext, *, retrain: bool = True) -> dict[str, Any]:
    """Test-set metrics of one front member: accuracy, macro-F1, QWK, the explanation objective, degeneracy.

    Loads the trial's saved model; a trial run by another worker has none here: with ``retrain`` it
    is retrained from its recorded config (same seed), else its test metrics are left empty.
    ``model_source`` says which.
    """
    from dpcam.train import classification_metrics, fit, load_model, open_data, predict, resolve_device, save_model

    cfg = TrainConfig.model_validate(trial.user_attrs["train_config"])
    folder = trial_model_dir(ctx.study_name, trial.number)
    data = open_data(cfg)
    source = "saved"
    if not (folder / "model.pt").is_file():
        if not retrain:
            return {"model_source": "other worker (dpcam search --trials 0 retrains and evaluates it)"}
        save_model(fit(cfg, progress=False).model, cfg, data, folder)
        source = "retrained"
    model, _ = load_model(folder)  # the saved weights, whichever worker trained them
    device = resolve_device(cfg.device)
    model.to(device)
    test = data.split("test", with_masks=ctx.objective.needs_masks)
    pred, true = predict(model, test, cfg.eval_batch_size, device)
    out = {k: v for k, v in classification_metrics(pred, true, data.num_classes, "test").items()
           if k in ("test_accuracy", "test_macro_f1", "test_qwk")}
    q = explanation_quality(model, test, data.num_classes, ctx.objective, ctx.explain, ctx.cfg.explain_images, device)
    out.update({"test_explain": q["value"], "test_explain_mean": q["mean"], "test_degenerate": q["degenerate"],
                "model_source": source})
    return out


def _row(trial, names: list[str]) -> dict[str, Any]:
    a, p = trial.user_attrs, trial.params
    scheme = p.get("scheme")
    prefix = "laplace_" if scheme == "laplace" else ""
    row = {
        "trial": trial.number, "state": trial.state.name, "scheme": scheme,
        "model": p.get("model") or (a.get("train_config") or {}).get("model"),
        "target_epsilon": p.get("epsilon"), "clip": p.get(f"{prefix}clip"), "lr": p.get(f"{prefix}lr"),
        "epochs": p.get("epochs"), "batch_size": p.get("batch_size"),
        "noise_multiplier": a.get("noise_multiplier"), "delta": a.get("delta"), "steps": a.get("steps"),
        "accountant": a.get("accountant"),
    }
    values = trial.values or [None] * 3
    row.update({names[0]: values[0], names[1]: values[1], names[2]: values[2]})
    row["degenerate"] = a.get("degenerate")
    row["degenerate_reasons"] = "; ".join(a.get("degenerate_reasons") or [])
    row["seconds"] = (a.get("seconds") or {}).get("objective")
    row["error"] = a.get("error") or a.get("skipped")
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = list(dict.fromkeys(k for r in rows for k in r)) or ["trial"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else v) for k, v in r.items()})


def _markdown_table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def _plots(study, names: list[str], out: Path) -> list[Path]:
    """Optuna's Pareto-front plots (the 3-D front highlighted): one 3-D scatter and three 2-D projections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization.matplotlib import plot_pareto_front

    paths = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = plot_pareto_front(study, target_names=names)
        ax.figure.set_size_inches(7, 6)
        path = out / "pareto_3d.png"
        ax.figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(ax.figure)
        paths.append(path)
        for i, j in ((0, 1), (0, 2), (1, 2)):
            ax = plot_pareto_front(study, target_names=[names[i], names[j]],
                                   targets=lambda t, i=i, j=j: (t.values[i], t.values[j]))
            ax.set_title(f"{names[j]} vs {names[i]} (3-D front highlighted)")
            ax.figure.set_size_inches(6, 4.5)
            path = out / f"pareto_{i}{j}.png"
            ax.figure.savefig(path, dpi=100, bbox_inches="tight")
            plt.close(ax.figure)
            paths.append(path)
    return paths


def write_report(study, ctx: SearchContext, cost: dict[str, Any], *, evaluate: bool = True, retrain: bool = True) -> Path:
    """Write ``ctx.cfg.out`` (default reports/search/) atomically: front.md/.csv (with test metrics),
    trials.csv (validation metrics only), cost.json, Pareto plots and index.html.

    ``retrain``: retrain front members whose model is not here (trials of other workers)."""
    names = objective_names(ctx.objective)
    out = Path(ctx.cfg.out)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        _write_csv(tmp / "trials.csv", [_row(t, names) for t in trials])
        front = pareto_front(study)
        rows = []
        for t in front:
            row = _row(t, names)
            if evaluate:
                row.update(evaluate_front_member(t, ctx, retrain=retrain))
            rows.append(row)
        _write_csv(tmp / "front.csv", rows)
        (tmp / "cost.json").write_text(json.dumps(cost, indent=2) + "\n")
        images = _plots(study, names, tmp) if front else []
        cols = ["trial", "scheme", "model", "target_epsilon", "clip", "lr", "epochs", "batch_size", "noise_multiplier",
                *names, "degenerate"] + (["test_accuracy", "test_macro_f1", "test_qwk", "test_explain", "test_degenerate",
                                          "model_source"] if evaluate else [])
        done = len(complete_trials(study))
        md = [f"# Pareto front of study `{ctx.study_name}` ({ctx.dataset})", "",
              f"{len(front)} non-dominated of {done} complete trials ({len(trials)} in all). Objectives: "
              f"{names[0]} (min), {names[1]} (max, validation), {names[2]} (max, validation; "
              f"`test_explain` is the same on test images). Degenerate models get the worst explanation value.",
              "", _markdown_table(rows, cols), "", "## Cost of tuning", "", cost["statement"], ""]
        (tmp / "front.md").write_text("\n".join(md))
        (tmp / "index.html").write_text(_html(ctx, rows, cols, images, cost, len(front), done))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _html(ctx: SearchContext, rows, cols, images, cost, n_front: int, n_done: int) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(r.get(c)))}</td>" for c in cols) + "</tr>" for r in rows)
    pics = "".join(f'<img src="{p.name}" alt="{p.stem}" style="max-width:48%">' for p in images)
    return (f"<!doctype html><meta charset='utf-8'><title>dpcam search: {html.escape(ctx.study_name)}</title>"
            f"<h1>Pareto front of {html.escape(ctx.study_name)} ({html.escape(ctx.dataset)})</h1>"
            f"<p>{n_front} non-dominated of {n_done} complete trials. Files: <a href='front.csv'>front.csv</a>, "
            f"<a href='trials.csv'>trials.csv</a>, <a href='cost.json'>cost.json</a>.</p>"
            f"<table border=1 cellspacing=0 cellpadding=3><tr>{head}</tr>{body}</table>{pics}"
            f"<h2>Cost of tuning</h2><p>{html.escape(cost['statement'])}</p>")


# ------------------------------------------------------------------------------ cost of tuning


def _gaussian_pld_event(sigma: float, q: float, steps: int):
    import dp_accounting as dpa

    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)


def _laplace_pld_event(lam: float, q: float, steps: int):
    import dp_accounting as dpa

    return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.LaplaceDpEvent(lam)), steps)


def _event(scheme: str, noise: float, q: float, steps: int):
    return (_gaussian_pld_event if scheme == "gaussian" else _laplace_pld_event)(noise, q, steps)


def composed_epsilon(mechanisms: Sequence[tuple[str, float, float, int]], delta: float) -> float:
    """ε at ``delta`` of all ``(scheme, noise multiplier, sample rate, steps)`` mechanisms composed (dp_accounting PLD).

    Pessimistic PLD discretisation (an upper bound). Returns 0.0 for none.
    """
    import dp_accounting as dpa
    from dp_accounting.pld import PLDAccountant

    if not mechanisms:
        return 0.0
    acc = PLDAccountant(value_discretization_interval=1e-3)
    acc.compose(dpa.ComposedDpEvent([_event(*m) for m in mechanisms]))
    return float(acc.get_epsilon(delta))


def steps_plan(train_size: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(q, steps) of a DP run, as :func:`dpcam.privacy.engine.poisson_plan` gives them for its loader."""
    batches = math.ceil(train_size / min(batch_size, train_size))
    return 1.0 / batches, epochs * batches


def worst_case_mechanisms(cfg: SearchConfig, base: TrainConfig, train_size: int) -> list[tuple[str, float, float, int]]:
    """For each (scheme, batch size, epochs) of the space, the least noise any trial can get.

    The noise is calibrated to ε_high·(1 + 2·rtol) (rtol: the calibration tolerance), whose ε is ≥ ε_high,
    so it is at most the noise of any target ε ≤ ε_high (ε falls as the noise grows): every RDP order
    and every δ(ε) of a trial is bounded by the mechanism returned here.
    """
    from dpcam.privacy.accounting import CALIBRATION_RTOL, calibrate_gaussian, calibrate_laplace

    target = float(cfg.epsilon[1]) * (1 + 2 * CALIBRATION_RTOL)
    out = []
    for scheme in cfg.schemes:
        for b in cfg.batch_size:
            for e in range(int(cfg.epochs[0]), int(cfg.epochs[1]) + 1):
                q, steps = steps_plan(train_size, b, e)
                if scheme == "gaussian":
                    noise = calibrate_gaussian(target, base.delta, q, steps, base.accountant)
                else:
                    noise = calibrate_laplace(target, base.delta, q, steps)
                out.append((scheme, noise, q, steps))
    return out


def rdp_curve(scheme: str, noise: float, q: float, steps: int, orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
    """RDP ε(λ) per order of one training run: float64 ``(len(orders),)``.

    Gaussian: Opacus's Poisson-subsampled Gaussian RDP (Mironov et al. 2019). Laplace: each step is
    ε₁-DP with ε₁ = log(1 + q(e^{1/λ} − 1)) (subsampling amplification), and ε₁-DP implies
    (α, min(ε₁, αε₁²/2))-RDP (Bun & Steinke 2016, Prop. 3.3), composed over the steps.
    """
    from opacus.accountants.analysis.rdp import compute_rdp

    from dpcam.privacy.accounting import laplace_amplified_step_epsilon

    orders = np.asarray(orders, dtype=np.float64)
    if scheme == "gaussian":
        return np.asarray(compute_rdp(q=q, noise_multiplier=noise, steps=steps, orders=list(orders)), dtype=np.float64)
    e1 = laplace_amplified_step_epsilon(noise, q)
    return steps * np.minimum(e1, orders * e1 * e1 / 2)


def _rdp_to_dp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> float:
    """Mironov 2017 Prop. 3: (λ, ε)-RDP ⇒ (ε + log(1/δ)/(λ − 1), δ)-DP; the best order."""
    return float(np.min(rdp + math.log(1 / delta) / (orders - 1)))


def random_search_bound(
    distribution: str, mean: float, mechanisms: Sequence[tuple[str, float, float, int]], delta: float,
    orders: Sequence[float] = RDP_ORDERS,
) -> float:
    """ε at ``delta`` of releasing the best of K random-search trials, K random (Papernot & Steinke 2022).

    ``mechanisms``: the worst-case runs of the space (:func:`worst_case_mechanisms`); the base
    algorithm Q (draw hyper-parameters, train) is bounded at every order by their maximum.

    - ``poisson`` (their Theorem 6): if Q is (λ, ε)-RDP and (ε̂, δ̂)-DP with e^ε̂ ≤ 1 + 1/(λ − 1),
      K ~ Poisson(μ) gives (λ, ε + μδ̂ + log(μ)/(λ − 1))-RDP; we take ε̂ = log(1 + 1/(λ − 1)) and δ̂ the
      largest δ(ε̂) of the mechanisms (dp_accounting PLD).
    - ``geometric`` (their Theorem 2, truncated negative binomial with η = 1, γ = 1/μ, E[K] = μ):
      (λ, ε(λ) + 2(1 − 1/λ̂)ε(λ̂) + 2 log(μ)/λ̂ + log(μ)/(λ − 1))-RDP for any λ̂ ≥ 1 (best λ̂ taken).

    RDP is converted to (ε, δ)-DP with Mironov's Prop. 3 at the best order.
    """
    from dp_accounting.pld import PLDAccountant

    orders_a = np.asarray(orders, dtype=np.float64)
    rdp = np.max([rdp_curve(*m, orders=orders_a) for m in mechanisms], axis=0)
    if distribution == "poisson":
        eps_hat = np.log1p(1.0 / (orders_a - 1))
        delta_hat = np.zeros_like(orders_a)
        for m in mechanisms:
            acc = PLDAccountant(value_discretization_interval=1e-3)
            acc.compose(_event(*m))
            delta_hat = np.maximum(delta_hat, [acc.get_delta(float(e)) for e in eps_hat])
        rdp_a = rdp + mean * delta_hat + math.log(mean) / (orders_a - 1)
    elif distribution == "geometric":
        hats = orders_a[:, None]  # λ̂ over rows, λ over columns
        extra = np.min(2 * (1 - 1 / hats) * rdp[:, None] + 2 * math.log(mean) / hats, axis=0)
        rdp_a = rdp + extra + math.log(mean) / (orders_a - 1)
    else:
        raise ValueError(f"no random-search bound for a {distribution!r} number of trials")
    return _rdp_to_dp(rdp_a, orders_a, delta)


def tuning_cost(study, cfg: SearchConfig, base: TrainConfig, train_size: int) -> dict[str, Any]:
    """What releasing a model chosen by this search costs in privacy (every trial used the same data).

    Always: the composition of every trial that trained (dp_accounting PLD over the complete
    trials' mechanisms, plus basic composition with the target ε of trials that trained and then
    failed) — valid for any sampler, even if every trial's model were released. For sampler
    ``random`` with a random number of trials: also Papernot & Steinke's bound for releasing only
    the best trial under an order fixed in advance. For NSGA-II / TPE (adaptive: each trial's
    settings depend on earlier trials' results) no such bound applies: the statement says so.
    """
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    trained_failed = [t for t in trials if t.state != TrialState.COMPLETE and (t.user_attrs.get("epochs_done") or 0) > 0]
    delta = base.delta
    mechs = [(t.params["scheme"], t.user_attrs["noise_multiplier"], t.user_attrs["sample_rate"], t.user_attrs["steps"])
             for t in complete]
    deltas = {t.user_attrs.get("delta") for t in complete if t.user_attrs.get("delta") is not None} or {delta}
    delta = max(deltas)  # trials of one study share the train section's δ; the largest is the safe one
    composed = composed_epsilon(mechs, delta)
    failed_eps = sum(float(t.params.get("epsilon", 0.0)) for t in trained_failed)
    out: dict[str, Any] = {
        "sampler": cfg.sampler,
        "trials_distribution": cfg.trials_distribution,
        "trials_complete": len(complete),
        "trials_trained_and_failed": len(trained_failed),
        "delta": delta,
        "max_trial_epsilon": max((t.values[0] for t in complete), default=None),
        "composed_epsilon": composed + failed_eps,
        "composed_delta": delta * (1 + len(trained_failed)),
        "basic_epsilon": sum(t.values[0] for t in complete) + failed_eps,
        "basic_delta": delta * (len(complete) + len(trained_failed)),
        "random_search_epsilon": None,
        "random_search_delta": None,
    }
    comp = (f"Composition of all {len(complete) + len(trained_failed)} trials that trained on the data: "
            f"ε ≤ {out['composed_epsilon']:.4g} at δ = {out['composed_delta']:.3g} (dp_accounting PLD"
            + (f", plus the target ε of {len(trained_failed)} trials that failed after training" if trained_failed else "")
            + "); this holds whatever is released, even every trial's model.")
    if cfg.sampler != "random":
        out["statement"] = (f"Sampler {cfg.sampler} is adaptive (each trial's settings depend on earlier trials' "
                            "results), so no random-search bound (Papernot & Steinke 2022) applies: releasing any model "
                            f"chosen from this search costs the composition of its trials. {comp}")
        return out
    if cfg.trials_distribution == "fixed":
        out["statement"] = ("Random search with a fixed number of trials: Papernot & Steinke's bounds need a random "
                            "number of trials (set trials_distribution: poisson or geometric); releasing the best of a "
                            f"fixed number can cost as much as the composition. {comp}")
        return out
    drawn = study.user_attrs.get(ATTR_DRAWN)
    mean = float(study.user_attrs.get("dpcam.trials_mean", cfg.trials))
    ran = len(complete) + len([t for t in trials if t.state == TrialState.FAIL])
    mechanisms = worst_case_mechanisms(cfg, base, train_size)
    eps = random_search_bound(cfg.trials_distribution, mean, mechanisms, delta)
    theorem = "Theorem 6, Poisson" if cfg.trials_distribution == "poisson" else "Theorem 2, truncated negative binomial with η = 1 (geometric)"
    out.update({"random_search_epsilon": eps, "random_search_delta": delta, "trials_drawn": drawn, "trials_mean": mean,
                "theorem": f"Papernot & Steinke 2022, {theorem}"})
    caveat = ""
    if drawn is not None and ran != drawn:
        caveat = (f" The search has {ran} finished trials of the {drawn} drawn: the bound assumes exactly the drawn "
                  "number ran; resume the search to finish it.")
    out["statement"] = (f"Random search with a {cfg.trials_distribution} number of trials (mean {mean:g}): releasing only "
                        f"the best trial, chosen by an order fixed before the search, costs ε ≤ {eps:.4g} at δ = {delta:.3g} "
                        f"(Papernot & Steinke 2022, {theorem}; worst case over the search space, RDP converted by "
                        f"Mironov's Prop. 3). Releasing the front, the trial table or the number of trials is not "
                        f"covered: that costs the composition. {comp}{caveat}")
    return out


# ------------------------------------------------------------------------------------- the command


@dataclass
class SearchResult:
    study_name: str
    storage: str  # password masked
    trials_run: int  # by this process
    front: list[dict[str, Any]]
    cost: dict[str, Any]
    report: Path | None
    mlflow_run_id: str | None
    timings: list[dict[str, float]]


def search(
    cfg: SearchConfig,
    base: TrainConfig,
    explain: ExplainConfig,
    *,
    progress: bool = True,
    report: bool = True,
    echo: Callable[[str], None] = print,
) -> SearchResult:
    """Run ``cfg.trials`` trials of the study (create it or join it), then write the report.

    ``cfg.trials = 0`` only writes the report of the study as it is (e.g. after several workers
    finished). Stops early on ``cfg.timeout`` or once the study has ``cfg.max_trials`` finished trials.
    """
    import optuna

    from dpcam import tracking
    from dpcam.explain.gradcam import METHODS
    from dpcam.train import open_data

    objective = OBJECTIVES[cfg.objective]
    if explain.method.lower() not in METHODS:
        raise UserError(f"explain.method = {explain.method!r}: unknown explanation method; known: {', '.join(sorted(METHODS))}")
    probe = trial_config(base, {"scheme": cfg.schemes[0], "epsilon": float(cfg.epsilon[1])}, "probe", 0)
    data = open_data(probe)  # an unknown dataset fails before any study is created
    if objective.needs_masks and data.masks is None:
        raise UserError(f"search.objective = {cfg.objective!r} needs lesion masks and {data.path} has none; "
                        "choose masked_score_pct, avg_drop_pct or another objective without masks")
    train_size = len(data.split("train")) if base.train_size is None else base.train_size
    dataset = base.dataset
    study_name = cfg.study_name or f"dpcam-{dataset}"
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by on_trial, in one line
    storage = open_storage(cfg.storage, heartbeat=cfg.heartbeat, grace_period=cfg.grace_period,
                           max_retry=0 if cfg.trials_distribution != "fixed" else cfg.max_retry)
    study, created = open_study(storage, cfg, study_name, objective, dataset)
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg, _worker_seed(cfg, created, n_existing))
    ctx = SearchContext(cfg, base, explain, objective, study_name, dataset, drawn=study.user_attrs.get(ATTR_DRAWN),
                        progress=progress)
    names = objective_names(objective)
    shown = mask_url(cfg.storage)
    echo(f"study {study_name} in {shown}: {'created' if created else f'resumed with {n_existing} trials'}; "
         f"objectives {names[0]} (min), {names[1]} (max), {names[2]} (max); sampler {cfg.sampler}"
         + (f"; {ctx.drawn} trials drawn ({cfg.trials_distribution}, mean {cfg.trials})" if ctx.drawn is not None else ""))

    def on_trial(study, trial) -> None:
        if trial.state.name == "COMPLETE":
            eps, acc, q = trial.values
            flag = "  [degenerate: " + "; ".join(trial.user_attrs.get("degenerate_reasons") or []) + "]" \
                if trial.user_attrs.get("degenerate") else ""
            echo(f"trial {trial.number}: {trial.params['scheme']} ε {eps:.3g}, val accuracy {acc:.3f}, "
                 f"{names[2]} {q:.3g}{flag}")
            prune_models(study, study_name)
        elif trial.state.name == "FAIL":
            echo(f"trial {trial.number} failed: {trial.user_attrs.get('error') or 'see the log'}")

    key = f"{shown}#{study_name}"
    tags = {"dpcam.study": study_name, "dpcam.storage": shown, "dpcam.sampler": cfg.sampler, "dpcam.kind": "search"}
    run_trials = cfg.trials if ctx.drawn is None else None
    started_trials = 0
    with tracking.parent_run(dataset, study_name, key, tags=tags) as parent_id:
        if created:
            tracking.log_params({f"search.{k}": v for k, v in cfg.model_dump(mode="json").items()})
        callbacks = [on_trial]
        if cfg.max_trials is not None:
            callbacks.append(optuna.study.MaxTrialsCallback(cfg.max_trials, states=(optuna.trial.TrialState.COMPLETE,)))
        if cfg.trials > 0 and not _study_full(study, cfg):
            before = len(study.get_trials(deepcopy=False))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                warnings.filterwarnings("ignore", message=".*collapsed model.*")
                study.optimize(lambda t: run_trial(t, ctx), n_trials=run_trials, timeout=cfg.timeout,
                               catch=(UserError,), callbacks=callbacks)
            started_trials = len(study.get_trials(deepcopy=False)) - before
        cost = tuning_cost(study, cfg, base, train_size)
        front = pareto_front(study)
        out = None
        if report and front:
            # a worker leaves other workers' front members alone; `--trials 0` (report only) retrains them
            out = write_report(study, ctx, cost, retrain=cfg.trials == 0)
            tracking.log_artifacts(out, artifact_path="search")
        tracking.log_metrics({"trials_complete": cost["trials_complete"], "front_size": len(front),
                              "tuning_composed_epsilon": cost["composed_epsilon"],
                              "tuning_random_search_epsilon": cost["random_search_epsilon"]})
        tracking.set_tags({"dpcam.tuning_cost": cost["statement"][:5000]})
    echo(f"front: {len(front)} of {cost['trials_complete']} complete trials"
         + (f"; report in {out}/" if out else ""))
    echo(f"cost of tuning: {cost['statement']}")
    return SearchResult(study_name, shown, started_trials, [_row(t, names) for t in front], cost, out, parent_id,
                        ctx.timings)


def _study_full(study, cfg: SearchConfig) -> bool:
    from optuna.trial import TrialState

    if cfg.max_trials is None:
        return False
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= cfg.max_trials
