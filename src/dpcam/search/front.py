"""The Pareto front of a study: its members, their saved models, their test metrics, table rows."""

from __future__ import annotations

import shutil
from typing import Any

from dpcam import layout
from dpcam.config import TrainConfig
from dpcam.search.objectives import explanation_quality
from dpcam.search.trial import SearchContext, trial_model_dir


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
    folder = layout.SEARCH_MODELS_ROOT / study_name
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
    from dpcam.saved import load_model, resolve_device, save_model
    from dpcam.train.fit import classification_metrics, fit, open_data, predict

    cfg = TrainConfig.model_validate(trial.user_attrs["train_config"])
    folder = trial_model_dir(ctx.study_name, trial.number)
    data = open_data(cfg)
    source = "saved"
    if not (folder / layout.MODEL_PT).is_file():
        if not retrain:
            return {"model_source": "other worker (dpcam search --trials 0 retrains and evaluates it)"}
        save_model(fit(cfg, progress=False).model, cfg, data, folder)
        source = "retrained"
    model, _ = load_model(folder)  # the saved weights, whichever worker trained them
    device = resolve_device(cfg.device)
    model.to(device)
    test = data.split("test", with_masks=ctx.objective.needs_masks)
    pred, true, _ = predict(model, test, cfg.eval_batch_size, device)
    out = {
        k: v
        for k, v in classification_metrics(pred, true, data.num_classes, "test").items()
        if k in ("test_accuracy", "test_macro_f1", "test_qwk")
    }
    q = explanation_quality(model, test, data.num_classes, ctx.objective, ctx.explain, ctx.cfg.explain_images, device)
    out.update(
        {
            "test_explain": q["value"],
            "test_explain_mean": q["mean"],
            "test_degenerate": q["degenerate"],
            "model_source": source,
        }
    )
    return out


def trial_row(trial, names: list[str]) -> dict[str, Any]:
    """One trial as a table row: settings, privacy, the three objectives (named ``names``), degeneracy, error."""
    a, p = trial.user_attrs, trial.params
    scheme = p.get("scheme")
    prefix = "laplace_" if scheme == "laplace" else ""
    row = {
        "trial": trial.number,
        "state": trial.state.name,
        "scheme": scheme,
        "model": p.get("model") or (a.get("train_config") or {}).get("model"),
        "target_epsilon": p.get("epsilon"),
        "clip": p.get(f"{prefix}clip"),
        "lr": p.get(f"{prefix}lr"),
        "epochs": p.get("epochs"),
        "batch_size": p.get("batch_size"),
        "noise_multiplier": a.get("noise_multiplier"),
        "delta": a.get("delta"),
        "steps": a.get("steps"),
        "accountant": a.get("accountant"),
    }
    values = trial.values or [None] * 3
    row.update({names[0]: values[0], names[1]: values[1], names[2]: values[2]})
    row["degenerate"] = a.get("degenerate")
    row["degenerate_reasons"] = "; ".join(a.get("degenerate_reasons") or [])
    row["seconds"] = (a.get("seconds") or {}).get("objective")
    row["error"] = a.get("error") or a.get("skipped")
    return row
