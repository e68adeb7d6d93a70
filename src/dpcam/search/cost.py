"""The cost of tuning: what releasing a model chosen by a search costs in privacy (Papernot & Steinke 2022).

The statement logic lives here; the privacy maths (composition, the worst case of the search
space, the random-search bounds) is :mod:`dpcam.privacy.tuning` (imported when a cost is computed:
it loads dp_accounting, which takes about a second).
"""

from __future__ import annotations

from typing import Any

from dpcam.config import SearchConfig, TrainConfig
from dpcam.search.study import ATTR_DRAWN, ATTR_MEAN

THEOREMS = {
    "poisson": "Theorem 6, Poisson",
    "geometric": "Theorem 2, truncated negative binomial with η = 1 (geometric)",
}


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
    trained_failed = [
        t for t in trials if t.state != TrialState.COMPLETE and (t.user_attrs.get("epochs_done") or 0) > 0
    ]
    out = _composition(cfg, base, complete, trained_failed)
    comp = _composition_statement(out)
    if cfg.sampler != "random":
        out["statement"] = (
            f"Sampler {cfg.sampler} is adaptive (each trial's settings depend on earlier trials' "
            "results), so no random-search bound (Papernot & Steinke 2022) applies: releasing any model "
            f"chosen from this search costs the composition of its trials. {comp}"
        )
        return out
    if cfg.trials_distribution == "fixed":
        out["statement"] = (
            "Random search with a fixed number of trials: Papernot & Steinke's bounds need a random "
            "number of trials (set trials_distribution: poisson or geometric); releasing the best of a "
            f"fixed number can cost as much as the composition. {comp}"
        )
        return out
    ran = len(complete) + len([t for t in trials if t.state == TrialState.FAIL])
    out.update(_random_search(study, cfg, base, train_size, out["delta"]))
    out["statement"] = _random_search_statement(cfg, out) + f" {comp}" + _unfinished_caveat(out, ran)
    return out


def _composition(cfg: SearchConfig, base: TrainConfig, complete: list, trained_failed: list) -> dict[str, Any]:
    """The cost record's composition part: every complete trial's mechanism composed (PLD), plus the
    target ε of trials that trained and then failed (basic composition); ``basic_epsilon`` beside it."""
    from dpcam.privacy import tuning

    mechs = [
        (t.params["scheme"], t.user_attrs["noise_multiplier"], t.user_attrs["sample_rate"], t.user_attrs["steps"])
        for t in complete
    ]
    deltas = {t.user_attrs.get("delta") for t in complete if t.user_attrs.get("delta") is not None} or {base.delta}
    delta = max(deltas)  # trials of one study share the train section's δ; the largest is the safe one
    composed = tuning.composed_epsilon(mechs, delta)
    failed_eps = sum(float(t.params.get("epsilon", 0.0)) for t in trained_failed)
    return {
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


def _composition_statement(out: dict[str, Any]) -> str:
    failed = out["trials_trained_and_failed"]
    return (
        f"Composition of all {out['trials_complete'] + failed} trials that trained on the data: "
        f"ε ≤ {out['composed_epsilon']:.4g} at δ = {out['composed_delta']:.3g} (dp_accounting PLD"
        + (f", plus the target ε of {failed} trials that failed after training" if failed else "")
        + "); this holds whatever is released, even every trial's model."
    )


def _random_search(study, cfg: SearchConfig, base: TrainConfig, train_size: int, delta: float) -> dict[str, Any]:
    """Papernot & Steinke's bound for the best of a random number of random-search trials, over the
    worst case of the search space (q and steps of :func:`dpcam.privacy.plan.training_plan`)."""
    from dpcam.privacy import tuning

    mean = float(study.user_attrs.get(ATTR_MEAN, cfg.trials))
    mechanisms = tuning.worst_case_mechanisms(
        cfg.schemes, cfg.batch_size, cfg.epochs, cfg.epsilon[1], base.delta, base.accountant, train_size
    )
    eps = tuning.random_search_bound(cfg.trials_distribution, mean, mechanisms, delta)
    return {
        "random_search_epsilon": eps,
        "random_search_delta": delta,
        "trials_drawn": study.user_attrs.get(ATTR_DRAWN),
        "trials_mean": mean,
        "theorem": f"Papernot & Steinke 2022, {THEOREMS[cfg.trials_distribution]}",
    }


def _random_search_statement(cfg: SearchConfig, out: dict[str, Any]) -> str:
    theorem = THEOREMS[cfg.trials_distribution]
    return (
        f"Random search with a {cfg.trials_distribution} number of trials (mean {out['trials_mean']:g}): releasing "
        f"only the best trial, chosen by an order fixed before the search, "
        f"costs ε ≤ {out['random_search_epsilon']:.4g} "
        f"at δ = {out['delta']:.3g} (Papernot & Steinke 2022, {theorem}; worst case over the search space, RDP "
        f"converted by Mironov's Prop. 3). Releasing the front, the trial table or the number of trials is not "
        f"covered: that costs the composition."
    )


def _unfinished_caveat(out: dict[str, Any], ran: int) -> str:
    drawn = out["trials_drawn"]
    if drawn is None or ran == drawn:
        return ""
    return (
        f" The search has {ran} finished trials of the {drawn} drawn: the bound assumes exactly the drawn "
        "number ran; resume the search to finish it."
    )
