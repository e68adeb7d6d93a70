"""`dpcam search`: Optuna multi-objective search for the Pareto front of (ε ↓, accuracy ↑, explanation quality ↑).

Optuna is the engine (samplers, RDB storages, heartbeats, visualisation); this package adds what is
dpcam's own:

- :mod:`~dpcam.search.objectives`: the three objectives: achieved ε (minimised), validation
  accuracy (maximised), an explanation metric on validation images (maximised; see
  :data:`OBJECTIVES`). A model flagged degenerate on those images gets the worst explanation value
  (it would otherwise score a "perfect" Average Drop), with the reasons in the trial's user
  attributes;
- :mod:`~dpcam.search.study`: the storage, a study identity (objective names, directions, dataset)
  checked when a study is resumed, the sampler and each worker's seed;
- :mod:`~dpcam.search.trial`: the search space (``search`` section of params.yaml) on top of the
  ``train`` section, and one training run per trial (:func:`dpcam.train.fit`); ε of a trial is the
  accountant's ε for the noise, sampling rate and steps actually used;
- :mod:`~dpcam.search.front`: the Pareto front; the test split is read only to re-evaluate it;
- :mod:`~dpcam.search.report`: ``reports/search/``: the front as Markdown/CSV with test metrics, all
  trials as CSV, 2-D projections and a 3-D scatter (PNG), an index.html;
- :mod:`~dpcam.search.cost`: the cost of tuning (:func:`tuning_cost`, Papernot & Steinke 2022; the
  maths is :mod:`dpcam.privacy.tuning`);
- :mod:`~dpcam.search.stage`: :func:`search`, the command: one parent MLflow run per study and
  tracking store, one nested run per trial (through :mod:`dpcam.tracking`).
"""

from __future__ import annotations

from dpcam.search.cost import tuning_cost
from dpcam.search.front import complete_trials, evaluate_front_member, pareto_front, prune_models, trial_row
from dpcam.search.objectives import DIRECTIONS, OBJECTIVES, Objective, explanation_quality, objective_names
from dpcam.search.report import write_report
from dpcam.search.stage import SearchResult, search
from dpcam.search.study import (
    ATTR_DATASET,
    ATTR_DISTRIBUTION,
    ATTR_DRAWN,
    ATTR_MEAN,
    ATTR_OBJECTIVES,
    DEFAULT_STORAGE,
    make_sampler,
    mask_url,
    open_storage,
    open_study,
    worker_seed,
)
from dpcam.search.trial import SearchContext, run_trial, suggest, trial_config, trial_model_dir

__all__ = [
    "ATTR_DATASET",
    "ATTR_DISTRIBUTION",
    "ATTR_DRAWN",
    "ATTR_MEAN",
    "ATTR_OBJECTIVES",
    "DEFAULT_STORAGE",
    "DIRECTIONS",
    "OBJECTIVES",
    "Objective",
    "SearchContext",
    "SearchResult",
    "complete_trials",
    "evaluate_front_member",
    "explanation_quality",
    "make_sampler",
    "mask_url",
    "objective_names",
    "open_storage",
    "open_study",
    "pareto_front",
    "prune_models",
    "run_trial",
    "search",
    "suggest",
    "trial_config",
    "trial_model_dir",
    "trial_row",
    "tuning_cost",
    "worker_seed",
    "write_report",
]
