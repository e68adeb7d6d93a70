"""The Optuna side of a search: storage, the study and its identity, the sampler and its seed.

A study's identity is its objective names and directions, its dataset and its trial-count
distribution (user attributes :data:`ATTR_OBJECTIVES` ...); a study is resumed only with the same
identity. Optuna's own metric names (``study.set_metric_names``) are set too, for optuna-dashboard.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from dpcam.config import SearchConfig
from dpcam.errors import UserError
from dpcam.search.objectives import DIRECTIONS, Objective, objective_names

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# study user attributes that make a study's identity
ATTR_OBJECTIVES, ATTR_DATASET, ATTR_DRAWN = "dpcam.objectives", "dpcam.dataset", "dpcam.trials_drawn"
ATTR_DISTRIBUTION = "dpcam.trials_distribution"
ATTR_MEAN = "dpcam.trials_mean"


# ------------------------------------------------------------------------------------- storage


def mask_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (SQLAlchemy's rendering; a regex for unparsable URLs)."""
    import re

    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
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
    import sqlalchemy.exc
    from sqlalchemy.engine import make_url

    shown = mask_url(url)
    try:
        parsed = make_url(url)
    except Exception:
        raise UserError(
            f"--storage {shown}: not a database URL; use e.g. {DEFAULT_STORAGE} or postgresql://user:password@host/db"
        ) from None
    url, engine_kwargs = _engine_options(url, parsed, shown)
    from dpcam import tracking

    path = Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None
    if path is not None and str(path) == ":memory:":
        path = None
    what = "Optuna study storage"
    try:
        # the first worker on a new sqlite file creates Optuna's tables while the others wait (one lock, no race)
        with tracking.creation_lock(path, what):
            if path is not None:
                tracking.check_sqlite(path, what)
            return _connect(url, engine_kwargs, heartbeat=heartbeat, grace_period=grace_period, max_retry=max_retry)
    except (sqlalchemy.exc.SQLAlchemyError, ImportError, OSError) as e:
        if (err := tracking.sqlite_fault(e, path, what, "open it")) is not None:
            raise err from None
        why = str(getattr(e, "orig", None) or e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        why = why.replace(url, shown).replace(parsed.password or "\0", "***")
        raise UserError(
            f"--storage {shown}: cannot open the study storage ({why}); check that the database "
            "server is running and the URL, user and password are right"
        ) from None


def _engine_options(url: str, parsed, shown: str) -> tuple[str, dict[str, Any]]:
    """The URL to connect with and SQLAlchemy engine options for its backend
    (sqlite: lock wait; postgresql: psycopg 3)."""
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
    return url, engine_kwargs


def _connect(url: str, engine_kwargs: dict[str, Any], *, heartbeat: int, grace_period: int | None, max_retry: int):
    """``RDBStorage(url)``, retried while another worker is creating Optuna's tables in the same database."""
    import optuna
    import sqlalchemy.exc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(6):
            try:
                return optuna.storages.RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                        max_retry=max_retry
                    ),
                )
            except sqlalchemy.exc.SQLAlchemyError as e:
                # workers starting together on a new database race to create Optuna's tables:
                # the loser sees a duplicate table/type/version row; the tables exist then
                if attempt == 5 or not _init_race(e):
                    raise
                time.sleep(0.2 + 0.3 * np.random.default_rng().random())


def _init_race(e: Exception) -> bool:
    """Whether a storage error is another process creating the same schema at the same moment."""
    import sqlalchemy.exc

    text = str(getattr(e, "orig", None) or e).lower()
    return isinstance(e, sqlalchemy.exc.IntegrityError) or any(
        w in text for w in ("duplicate", "already exists", "unique constraint", "database is locked")
    )


# ------------------------------------------------------------------------------------- sampler and draws


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


def worker_seed(cfg: SearchConfig, created: bool, n_existing: int) -> int | None:
    """The study's creator uses ``cfg.seed`` (a fresh search is reproducible); a worker that joins or
    resumes a study mixes in its process, host and the trial count so it does not repeat others' draws.
    A random number of trials needs unpredictable hyper-parameters as well: OS entropy (None)."""
    if cfg.trials_distribution != "fixed":
        return None
    if created:
        return cfg.seed
    host = int.from_bytes(socket.gethostname().encode()[:8].ljust(8, b"\0"), "little")
    return int(np.random.SeedSequence([cfg.seed, n_existing, os.getpid(), host]).generate_state(1)[0])


def draw_trials(cfg: SearchConfig) -> int | None:
    """The number of trials K of a random-count search, from OS entropy (None for a fixed count)."""
    rng = np.random.default_rng()
    if cfg.trials_distribution == "poisson":
        return int(rng.poisson(cfg.trials))
    if cfg.trials_distribution == "geometric":
        return int(rng.geometric(1.0 / max(cfg.trials, 1)))  # support 1, 2, ...; mean = trials
    return None


def study_full(study, cfg: SearchConfig) -> bool:
    """Whether the study already has ``cfg.max_trials`` complete trials."""
    from optuna.trial import TrialState

    if cfg.max_trials is None:
        return False
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) >= cfg.max_trials


# ------------------------------------------------------------------------------------- the study


def open_study(storage, cfg: SearchConfig, study_name: str, objective: Objective, dataset: str):
    """Create the study, or load it when it exists (``load_if_exists``); check it has the same identity.

    Returns ``(study, created)``. A study created with other objective names, directions, dataset
    or count distribution is refused with one line.
    """
    import optuna

    names = objective_names(objective)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=list(DIRECTIONS))
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=study_name, storage=storage)
        where = f"study {study_name!r} in {mask_url(storage.url)}"
        _check_identity(study, _identity(study), cfg, where, names, dataset)
        return study, False
    _set_identity(study, cfg, names, dataset)
    return study, True


def _set_identity(study, cfg: SearchConfig, names: list[str], dataset: str) -> None:
    """A new study's metric names (optuna-dashboard's axis labels) and identity attributes."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(names)
    study.set_user_attr(ATTR_OBJECTIVES, names)
    study.set_user_attr(ATTR_DATASET, dataset)
    study.set_user_attr(ATTR_DISTRIBUTION, cfg.trials_distribution)
    if cfg.trials_distribution != "fixed":
        study.set_user_attr(ATTR_DRAWN, draw_trials(cfg))
        study.set_user_attr(ATTR_MEAN, cfg.trials)


def _identity(study) -> dict[str, Any]:
    """The study's user attributes, once its creator has set the identity (waits up to 5 s for it)."""
    attrs = study.user_attrs
    for _ in range(50):  # its creator sets the identity right after creating it
        if ATTR_OBJECTIVES in attrs and ATTR_DISTRIBUTION in attrs:
            break
        time.sleep(0.1)
        attrs = study.user_attrs
    return attrs


def _check_identity(
    study, attrs: dict[str, Any], cfg: SearchConfig, where: str, names: list[str], dataset: str
) -> None:
    """UserError (naming ``where``) unless an existing study has this search's objectives, directions,
    dataset and count distribution."""
    theirs = [d.name.lower() for d in study.directions]
    if ATTR_OBJECTIVES not in attrs:
        raise UserError(
            f"{where} was not created by dpcam search (it has no objective names); use another --study-name"
        )
    if attrs[ATTR_OBJECTIVES] != names or theirs != list(DIRECTIONS):
        got = ", ".join(f"{n} ({d})" for n, d in zip(attrs[ATTR_OBJECTIVES], theirs))
        raise UserError(
            f"{where} was created with other objectives ({got}); this search has "
            f"{', '.join(f'{n} ({d})' for n, d in zip(names, DIRECTIONS))}: use another --study-name "
            f"or objective {attrs[ATTR_OBJECTIVES][-1]!r}"
        )
    if attrs.get(ATTR_DATASET) != dataset:
        raise UserError(
            f"{where} searches dataset {attrs.get(ATTR_DATASET)!r}, not {dataset!r}; use another --study-name"
        )
    if attrs.get(ATTR_DISTRIBUTION, "fixed") != cfg.trials_distribution:
        raise UserError(
            f"{where} has trials_distribution {attrs.get(ATTR_DISTRIBUTION)!r}, not "
            f"{cfg.trials_distribution!r}: a random-count search cannot be mixed with another; "
            "use another --study-name"
        )
