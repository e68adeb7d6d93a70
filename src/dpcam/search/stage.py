"""The ``dpcam search`` stage: open (or join) the study, run this process's trials, write the report."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpcam.config import ExplainConfig, SearchConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.search.cost import tuning_cost
from dpcam.search.front import pareto_front, prune_models, trial_row
from dpcam.search.objectives import OBJECTIVES, Objective, objective_names
from dpcam.search.report import write_report
from dpcam.search.study import ATTR_DRAWN, make_sampler, mask_url, open_storage, open_study, study_full, worker_seed
from dpcam.search.trial import SearchContext, run_trial, trial_config


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
    from dpcam import tracking

    tracking.open_store()  # a tracking store fault stops the search before any study or model is touched
    objective = OBJECTIVES[cfg.objective]  # scored on the maps of explain's headline method
    train_size = _train_size(cfg, base, objective)
    ctx = SearchContext(
        cfg, base, explain, objective, cfg.study_name or f"dpcam-{base.dataset}", base.dataset, progress=progress
    )
    study, created, n_existing = _open(ctx)
    ctx.drawn = study.user_attrs.get(ATTR_DRAWN)
    shown = mask_url(cfg.storage)
    _announce(ctx, shown, created, n_existing, echo)
    tags = {"dpcam.study": ctx.study_name, "dpcam.storage": shown, "dpcam.sampler": cfg.sampler, "dpcam.kind": "search"}
    with tracking.parent_run(ctx.dataset, ctx.study_name, f"{shown}#{ctx.study_name}", tags=tags) as parent_id:
        if created:
            tracking.log_params({f"search.{k}": v for k, v in cfg.model_dump(mode="json").items()})
        started_trials = _optimize(study, ctx, echo)
        cost, front, out = _conclude(study, ctx, train_size, report)
    echo(f"front: {len(front)} of {cost['trials_complete']} complete trials" + (f"; report in {out}/" if out else ""))
    echo(f"cost of tuning: {cost['statement']}")
    names = objective_names(objective)
    return SearchResult(
        ctx.study_name, shown, started_trials, [trial_row(t, names) for t in front], cost, out, parent_id, ctx.timings
    )


def _train_size(cfg: SearchConfig, base: TrainConfig, objective: Objective) -> int:
    """Training images of a trial; an unknown dataset, or one without the masks the objective needs,
    fails here, before any study is created."""
    from dpcam.train.fit import open_data

    probe = trial_config(base, {"scheme": cfg.schemes[0], "epsilon": float(cfg.epsilon[1])}, "probe", 0)
    data = open_data(probe)
    if objective.needs_masks and data.masks is None:
        raise UserError(
            f"search.objective = {cfg.objective!r} needs lesion masks and {data.path} has none; "
            "choose masked_score_pct, avg_drop_pct or another objective without masks"
        )
    return len(data.split("train")) if base.train_size is None else base.train_size


def _open(ctx: SearchContext):
    """``(study, created, trials it had)``: the study in ``cfg.storage``, with this worker's seeded sampler."""
    import optuna

    cfg = ctx.cfg
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by _on_trial, in one line
    storage = open_storage(
        cfg.storage,
        heartbeat=cfg.heartbeat,
        grace_period=cfg.grace_period,
        max_retry=0 if cfg.trials_distribution != "fixed" else cfg.max_retry,
    )
    study, created = open_study(storage, cfg, ctx.study_name, ctx.objective, ctx.dataset)
    n_existing = len(study.get_trials(deepcopy=False))
    study.sampler = make_sampler(cfg, worker_seed(cfg, created, n_existing))
    return study, created, n_existing


def _announce(ctx: SearchContext, shown: str, created: bool, n_existing: int, echo: Callable[[str], None]) -> None:
    cfg, names = ctx.cfg, objective_names(ctx.objective)
    echo(
        f"study {ctx.study_name} in {shown}: {'created' if created else f'resumed with {n_existing} trials'}; "
        f"objectives {names[0]} (min), {names[1]} (max), {names[2]} (max); sampler {cfg.sampler}"
        + (
            f"; {ctx.drawn} trials drawn ({cfg.trials_distribution}, mean {cfg.trials})"
            if ctx.drawn is not None
            else ""
        )
    )


def _on_trial(ctx: SearchContext, echo: Callable[[str], None]) -> Callable:
    """Optuna callback: one line per finished trial; prunes models that left the front."""
    names = objective_names(ctx.objective)

    def on_trial(study, trial) -> None:
        if trial.state.name == "COMPLETE":
            eps, acc, q = trial.values
            flag = (
                "  [degenerate: " + "; ".join(trial.user_attrs.get("degenerate_reasons") or []) + "]"
                if trial.user_attrs.get("degenerate")
                else ""
            )
            echo(
                f"trial {trial.number}: {trial.params['scheme']} ε {eps:.3g}, val accuracy {acc:.3f}, "
                f"{names[2]} {q:.3g}{flag}"
            )
            prune_models(study, ctx.study_name)
        elif trial.state.name == "FAIL":
            echo(f"trial {trial.number} failed: {trial.user_attrs.get('error') or 'see the log'}")

    return on_trial


def _optimize(study, ctx: SearchContext, echo: Callable[[str], None]) -> int:
    """Run this process's trials (none for ``trials: 0`` or a full study); returns how many it started."""
    import optuna

    cfg = ctx.cfg
    callbacks = [_on_trial(ctx, echo)]
    if cfg.max_trials is not None:
        callbacks.append(optuna.study.MaxTrialsCallback(cfg.max_trials, states=(optuna.trial.TrialState.COMPLETE,)))
    if cfg.trials <= 0 or study_full(study, cfg):
        return 0
    before = len(study.get_trials(deepcopy=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", message=".*collapsed model.*")
        study.optimize(
            lambda t: run_trial(t, ctx),
            n_trials=cfg.trials if ctx.drawn is None else None,
            timeout=cfg.timeout,
            catch=(UserError,),
            callbacks=callbacks,
        )
    return len(study.get_trials(deepcopy=False)) - before


def _conclude(study, ctx: SearchContext, train_size: int, report: bool):
    """``(cost, front, report folder or None)``: the cost of tuning, the front, the report; logged to the parent run."""
    from dpcam import tracking

    cost = tuning_cost(study, ctx.cfg, ctx.base, train_size)
    front = pareto_front(study)
    out = None
    if report and front:
        # a worker leaves other workers' front members alone; `--trials 0` (report only) retrains them
        out = write_report(study, ctx, cost, retrain=ctx.cfg.trials == 0)
        tracking.log_artifacts(out, artifact_path="search")
    tracking.log_metrics(
        {
            "trials_complete": cost["trials_complete"],
            "front_size": len(front),
            "tuning_composed_epsilon": cost["composed_epsilon"],
            "tuning_random_search_epsilon": cost["random_search_epsilon"],
        }
    )
    tracking.set_tags({"dpcam.tuning_cost": cost["statement"][:5000]})
    return cost, front, out
