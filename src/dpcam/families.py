"""Run families: the grid of the study as a registry, one definition per family.

A family is a group of runs that answer one question of the paper (the ε = ∞ baselines, Gaussian
DP-SGD across ε, Laplace, the paper's unguaranteed Laplace replica, local DP, the clipping sweep,
training-set sizes, and public pretraining with private fine-tuning: the ``public`` trunk and the
``finetune-<scheme>`` families that start from it). Its definition, in one place, is read by every stage:

- ``runs(grid, model, seed)``: its runs (:class:`RunSpec`), named as :func:`dpcam.layout.run_name` names them;
- ``train(grid)``: what its runs change in the ``train`` section besides what each run varies;
- ``grid_keys`` / ``train_keys``: the ``grid.*`` params keys its runs and their training read (DVC
  stage params; :mod:`dpcam.pipeline` writes dvc.yaml from this registry);
- ``table`` / ``title`` / ``columns``: its table of the report, and the columns it lays its runs out in.

A new family is one ``FAMILIES.add`` call (a :class:`dpcam.registry.Registry`); families are
registered by name in :data:`FAMILIES`, in the order stages and the report walk them.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from dpcam import names
from dpcam.config import GridConfig, NonPrivateConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.layout import AUDITS_ROOT, METRICS_ROOT, MODEL_JSON, MODEL_PT, MODELS_ROOT, format_eps, grid_dir, run_name
from dpcam.registry import Registry

INF = math.inf


class RunSpec(BaseModel):
    """One run of the grid: its name (models/<family>/<name>/ ...) and what it varies."""

    name: str
    family: str
    scheme: str
    model: str
    seed: int
    epsilon: float | None = None  # target ε (None = ∞ for none/clip-only; the data's ε for ldp)
    ldp: str | None = None
    clip: float | None = None  # set when the run sweeps the clipping bound
    train_size: int | None = None
    public: bool = False  # trained on the public set (the public trunk)
    trainable: str | None = None  # head | last-block: a fine-tuning run (None: the whole model)
    weights: str | None = None  # the trunk a fine-tuning run starts from (models/public/<run>/model.pt)
    schedule: str | None = None  # a reference trained with this DP schedule's recipe (grid.schedules)
    held: bool = False  # a clipping-sweep run whose lr·C is held at the main run's

    @property
    def model_dir(self) -> Path:
        """``models/<family>/<run>/``: model.pt, model.json and train.json (the train stage's output)."""
        return grid_dir(MODELS_ROOT, self.family, self.name)

    @property
    def metrics_dir(self) -> Path:
        """``metrics/<family>/<run>/``: explain.json, maps.npy, map_indices.npy, cams.png."""
        return grid_dir(METRICS_ROOT, self.family, self.name)

    @property
    def audit_dir(self) -> Path:
        """``audits/<family>/<run>/``: audit.json and roc.png."""
        return grid_dir(AUDITS_ROOT, self.family, self.name)


def spec(family: str, scheme: str, model: str, seed: int, **varies: Any) -> RunSpec:
    """A RunSpec named from what it varies (``epsilon`` only names schemes calibrated from an ε)."""
    eps = varies.get("epsilon") if scheme in names.CALIBRATED_SCHEMES else None
    name = run_name(
        scheme,
        model,
        seed,
        epsilon=eps,
        ldp=varies.get("ldp"),
        clip=varies.get("clip"),
        train_size=varies.get("train_size"),
        public=varies.get("public", False),
        trainable=varies.get("trainable"),
        schedule=varies.get("schedule"),
        held=varies.get("held", False),
    )
    return RunSpec(name=name, family=family, scheme=scheme, model=model, seed=seed, **varies)


# ------------------------------------------------------------------------------------ report columns


@dataclass
class Column:
    """One column of a family's table: the runs (seeds) it pools, its plot position ``x`` (ε, C; ∞ =
    non-private) and the line it belongs to in the figures (``group``: scheme, mechanism or size).

    ``runs`` are the report's run objects: anything with ``spec``, ``value(key)`` and ``degenerate``.
    """

    label: str
    runs: list
    x: float
    group: str

    def values(self, key: str) -> list[float]:
        return [v for r in self.runs if (v := r.value(key)) is not None]

    @property
    def degenerate(self) -> bool:
        return any(r.degenerate for r in self.runs)


def pick(runs: Iterable, **attrs) -> list:
    """The runs whose spec has every attribute given."""
    return [r for r in runs if all(getattr(r.spec, k) == v for k, v in attrs.items())]


def eps_column(eps: float, runs: list, group: str, prefix: str = "") -> Column:
    label = prefix + ("ε = ∞" if eps == INF else f"ε = {format_eps(eps)}")
    return Column(label, runs, eps, group)


# (mine: the family's runs of one model, model_runs: every run of that model, grid) -> columns
Columns = Callable[[list, list, GridConfig], list[Column]]


@dataclass(frozen=True)
class Family:
    name: str
    title: str
    table: str  # file stem of its report table
    runs: Callable[[GridConfig, str, int], list[RunSpec]]
    columns: Columns
    grid_keys: tuple[str, ...]  # grid.<key> that decide its runs
    train_keys: tuple[str, ...] = ()  # further grid.<key> its training reads
    train: Callable[[GridConfig], dict[str, Any]] = field(default=lambda grid: {})
    data: str = "prepared"  # the data its runs train on: prepared | ldp | public (data/prepared/<dataset>-public)
    reference: bool = True  # its explanations are compared with the baseline's (map agreement)
    needs: tuple[str, ...] = ()  # families whose models its runs start from (the public trunk)
    sources: dict[str, str] = field(default_factory=dict)  # train key -> the grid.<key> that sets it (CLI errors)


FAMILIES: Registry[Family] = Registry("grid family")


# ------------------------------------------------------------------------------------ the families


def _baseline_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    words = {"none": "none (no clipping, no noise)", "clip-only": "clip-only (clipping, no noise)"}
    cols = []
    for sched in sorted({r.spec.schedule for r in mine}, key=lambda s: (s is not None, s or "")):
        tail = "" if sched is None else f", {sched} schedule"
        cols += [
            Column(words[s] + (", tuned" if sched is None and s == "none" and grid.schedules else tail), runs, INF, s)
            for s in grid.baselines
            if (runs := pick(mine, scheme=s, schedule=sched))
        ]
    return cols


def _none_of(model_runs: list) -> list:
    """The ε = ∞ reference: the baseline's non-private runs with their own (tuned) recipe."""
    return pick(model_runs, family="baseline", scheme="none", schedule=None)


def _eps_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    family = mine[0].spec.family
    eps = sorted({r.spec.epsilon for r in mine})
    return [eps_column(e, pick(mine, epsilon=e), family) for e in eps] + [eps_column(INF, _none_of(model_runs), "none")]


def _ldp_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    def key(name: str) -> tuple[str, float]:
        r = pick(mine, ldp=name)[0]
        return name.rsplit("-eps", 1)[0], r.spec.epsilon if r.spec.epsilon is not None else INF

    cols = []
    for name in sorted({r.spec.ldp for r in mine}, key=key):
        mech, e = key(name)
        if e == INF:  # a derivative name without a readable ε: tabulated, not plotted
            cols.append(Column(name, pick(mine, ldp=name), math.nan, mech))
        else:
            cols.append(Column(f"{mech} ε = {format_eps(e)}", pick(mine, ldp=name), e, mech))
    return cols + [Column("no LDP (ε = ∞)", _none_of(model_runs), INF, "none")]


def _clip_sweep_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    main = pick(model_runs, family="gaussian", epsilon=grid.clip_sweep.epsilon)
    cols = [
        Column(
            f"C = {format_eps(c)}" + (", lr·C held" if held else ", lr fixed"), runs, c, "held" if held else "gaussian"
        )
        for c in sorted({r.spec.clip for r in mine})
        for held in (False, True)
        if (runs := pick(mine, clip=c, held=held))
    ]
    if main:
        c = main[0].value("max_grad_norm")
        c = math.nan if c is None else c
        cols.append(Column(f"C = {format_eps(c)} (main run)", main, c, "gaussian"))
    return sorted(cols, key=lambda col: col.x)


def _train_size_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    sizes = sorted({r.spec.train_size for r in mine})
    full = [r for r in model_runs if r.spec.family in ("gaussian", "baseline")]
    n_full = next((int(v) for r in full if (v := r.value("train_size"))), None)
    full_label = f"n = {n_full} (all)" if n_full else "n = all"
    cols = []
    for e in sorted({r.spec.epsilon for r in mine if r.spec.epsilon is not None}) + (
        [INF] if pick(mine, scheme="none") else []
    ):
        scheme = "none" if e == INF else "gaussian"
        for n in sizes:
            cols.append(
                eps_column(
                    e,
                    pick(mine, scheme=scheme, epsilon=None if e == INF else e, train_size=n),
                    f"n = {n}",
                    prefix=f"n = {n}, ",
                )
            )
        main = _none_of(model_runs) if e == INF else pick(model_runs, family="gaussian", epsilon=e)
        cols.append(eps_column(e, main, full_label, prefix=f"{full_label}, "))
    return cols


def _nominal_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    """laplace-paper: one column per nominal ε (the ε its σ was calibrated from; no guarantee), then ∞."""
    eps = sorted({r.spec.epsilon for r in mine})
    return [eps_column(e, pick(mine, epsilon=e), "laplace-paper", prefix="nominal (NO guarantee) ") for e in eps] + [
        eps_column(INF, _none_of(model_runs), "none")
    ]


def _infinities(model_runs: list) -> list[Column]:
    """The two non-private references: fine-tuned (finetune-none) and from scratch (the baseline)."""
    return [
        Column("ε = ∞, fine-tuned", pick(model_runs, family="finetune-none"), INF, "finetune-none"),
        Column("ε = ∞, from scratch", _none_of(model_runs), INF, "none"),
    ]


def _side_by_side(lineup: tuple[tuple[str, str], ...]) -> Columns:
    """Columns that set, at each ε of the family, one column per (family, words) of ``lineup``; then the ε = ∞
    references (fine-tuned, from scratch)."""

    def columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
        return [
            eps_column(e, pick(model_runs, family=family, epsilon=e), family, prefix=f"{words} ")
            for e in sorted({r.spec.epsilon for r in mine})
            for family, words in lineup
        ] + _infinities(model_runs)

    return columns


# Table 2 that answers (finetune-laplace's table): valid Laplace fine-tuned, the paper's replica, Gaussian
_answer_columns = _side_by_side(
    (
        ("finetune-laplace", "Laplace (L1, valid), fine-tuned"),
        ("laplace-paper", "laplace-paper (NO guarantee), from scratch, nominal"),
        ("finetune-gaussian", "Gaussian, fine-tuned"),
        ("gaussian", "Gaussian, from scratch"),
    )
)
# finetune-gaussian's table: each noise from scratch beside fine-tuned
_scratch_vs_finetuned_columns = _side_by_side(
    (
        ("gaussian", "Gaussian, from scratch"),
        ("finetune-gaussian", "Gaussian, fine-tuned"),
        ("laplace", "Laplace (L1), from scratch"),
        ("finetune-laplace", "Laplace (L1), fine-tuned"),
    )
)


def _public_columns(mine: list, model_runs: list, grid: GridConfig) -> list[Column]:
    return [Column("public trunk (public data, no privacy)", mine, INF, "public")]


def public_trunk(grid: GridConfig, model: str) -> str:
    """The trunk every fine-tuning run of ``model`` starts from: ``grid.finetune.weights`` (local weights), else
    the ``public`` family's run of that model (its first seed): ``models/public/<run>/model.pt``."""
    if grid.finetune.weights is not None:
        return str(grid.finetune.weights)
    seed = grid.seeds_of("public")[0]
    return str(grid_dir(MODELS_ROOT, "public", run_name("none", model, seed, public=True)) / MODEL_PT)


def _public_runs(grid: GridConfig, model: str, seed: int) -> list[RunSpec]:
    if not grid.finetune.schemes or grid.finetune.weights is not None:
        return []
    return [spec("public", "none", model, seed, public=True)]


def _finetune_runs(scheme: str):
    def runs(grid: GridConfig, model: str, seed: int) -> list[RunSpec]:
        if scheme not in grid.finetune.schemes:
            return []
        ft = {"trainable": grid.finetune.trainable, "weights": public_trunk(grid, model)}
        family = f"finetune-{scheme}"
        if scheme == "none":
            return [spec(family, scheme, model, seed, **ft)]
        return [spec(family, scheme, model, seed, epsilon=e, **ft) for e in grid.laplace]

    return runs


def _finetune_train(scheme: str):
    """The fine-tuning recipe of ``finetune-<scheme>`` (grid.finetune; docs/recipes.md)."""

    def train(grid: GridConfig) -> dict[str, Any]:
        ft = grid.finetune
        common = {"epochs": ft.epochs, "batch_size": ft.batch_size}
        if scheme == "gaussian":
            return {**common, "lr": ft.lr, "clip": ft.clip}
        if scheme == "laplace":
            return {**common, "lr": ft.laplace_lr, "clip": ft.laplace_clip}
        if grid.protocol == "same":  # finetune-none: the DP fine-tune's recipe, without clipping and noise
            return {**common, "lr": ft.lr}
        return ft.nonprivate.model_dump()

    return train


def _finetune_sources(scheme: str) -> dict[str, str]:
    keys = {"trainable": "finetune.trainable", "weights": "finetune.weights"}
    if scheme == "none":
        return {**keys, **{k: f"finetune.nonprivate.{k}" for k in ("lr", "batch_size", "epochs")}}
    pre = "laplace_" if scheme == "laplace" else ""
    return {
        **keys,
        "epochs": "finetune.epochs",
        "batch_size": "finetune.batch_size",
        "lr": f"finetune.{pre}lr",
        "clip": f"finetune.{pre}clip",
    }


def _baseline_runs(grid: GridConfig, model: str, seed: int) -> list[RunSpec]:
    """The ε = ∞ reference (``none``, its own tuned recipe) and, per DP schedule, the references the gap is split
    by: ``none`` and ``clip-only`` trained with the schedule's recipe. Without schedules, ``clip-only`` trains with
    the train section's recipe (the DP runs' recipe)."""
    runs = [spec("baseline", "none", model, seed)] if "none" in grid.baselines else []
    if not grid.schedules:
        return runs + ([spec("baseline", "clip-only", model, seed)] if "clip-only" in grid.baselines else [])
    used = grid.active_schedules()
    return runs + [spec("baseline", s, model, seed, schedule=name) for name in used for s in grid.baselines]


def _ldp_epsilon(name: str) -> float | None:
    eps = name.rsplit("-eps", 1)[-1]
    return float(eps) if eps.replace(".", "", 1).isdigit() else None


FAMILIES.add(
    Family(
        "baseline",
        "Baselines: non-private vs clipping only",
        "table6_baselines",
        runs=lambda grid, model, seed: _baseline_runs(grid, model, seed),
        columns=_baseline_columns,
        grid_keys=("baselines", "schedules"),  # the references: ε = ∞ and clip-only per DP schedule
        train_keys=("nonprivate",),
        reference=False,
    )
)
FAMILIES.add(
    Family(
        "gaussian",
        "Table 1: global DP, Gaussian DP-SGD",
        "table1_gaussian",
        runs=lambda grid, model, seed: [spec("gaussian", "gaussian", model, seed, epsilon=e) for e in grid.gaussian],
        columns=_eps_columns,
        grid_keys=("gaussian",),
    )
)
FAMILIES.add(
    Family(
        "laplace",
        "Table 2: global DP, Laplace (L1 clip)",
        "table2_laplace",
        runs=lambda grid, model, seed: [spec("laplace", "laplace", model, seed, epsilon=e) for e in grid.laplace],
        columns=_eps_columns,
        grid_keys=("laplace",),
        train_keys=("laplace_clip", "laplace_lr"),
        train=lambda grid: {"clip": grid.laplace_clip, "lr": grid.laplace_lr},
        sources={"clip": "laplace_clip", "lr": "laplace_lr"},
    )
)
FAMILIES.add(
    Family(
        "laplace-paper",
        "Table 2, the paper's replica: L2 clip + Laplace noise of the Gaussian σ·C (NO guarantee)",
        "table2c_laplace_paper",
        runs=lambda grid, model, seed: [
            spec("laplace-paper", "laplace-paper", model, seed, epsilon=e) for e in grid.laplace
        ],
        columns=_nominal_columns,
        grid_keys=("laplace",),
    )
)
FAMILIES.add(
    Family(
        "ldp",
        "Local DP: training on noised images",
        "table3_ldp",
        runs=lambda grid, model, seed: [
            spec("ldp", "ldp", model, seed, ldp=d, epsilon=_ldp_epsilon(d)) for d in grid.ldp
        ],
        columns=_ldp_columns,
        grid_keys=("ldp",),
        train_keys=("nonprivate",),
        data="ldp",
    )
)
FAMILIES.add(
    Family(
        "clip-sweep",
        "Clipping bound C at fixed ε",
        "table4_clip_sweep",
        runs=lambda grid, model, seed: [
            spec("clip-sweep", "gaussian", model, seed, epsilon=grid.clip_sweep.epsilon, clip=c, held=held)
            for c in grid.clip_sweep.clips
            for held in ((False, True) if grid.clip_sweep.hold_step else (False,))
        ],
        columns=_clip_sweep_columns,
        grid_keys=("clip_sweep",),
        sources={"clip": "clip_sweep.clips"},
    )
)
FAMILIES.add(
    Family(
        "train-size",
        "Training-set size (DP needs more data)",
        "table5_train_size",
        runs=lambda grid, model, seed: [
            r
            for n in grid.train_sizes.sizes
            for r in ([spec("train-size", "none", model, seed, train_size=n)] if grid.train_sizes.none else [])
            + [spec("train-size", "gaussian", model, seed, epsilon=e, train_size=n) for e in grid.train_sizes.gaussian]
        ],
        columns=_train_size_columns,
        grid_keys=("train_sizes",),
        train_keys=("nonprivate",),
        train=lambda grid: {} if grid.train_sizes.epochs is None else {"epochs": grid.train_sizes.epochs},
        sources={"epochs": "train_sizes.epochs"},
    )
)
FAMILIES.add(
    Family(
        "public",
        "Public pretraining: the trunk, trained without privacy on the public set",
        "table7_public",
        runs=_public_runs,
        columns=_public_columns,
        grid_keys=("finetune.schemes", "finetune.weights"),
        train_keys=("nonprivate",),
        train=lambda grid: {"public": True},
        data="public",
    )
)
for _scheme, _title, _table, _columns in (
    (
        "none",
        "Fine-tuned without privacy: the fine-tuned ε = ∞ reference",
        "table2d_finetune_none",
        lambda mine, model_runs, grid: _infinities(model_runs),
    ),
    (
        "gaussian",
        "From scratch vs fine-tuned on a public-pretrained trunk, at each ε",
        "table2b_scratch_vs_finetuned",
        _scratch_vs_finetuned_columns,
    ),
    (
        "laplace",
        "Table 2 that answers: valid Laplace (fine-tuned), the paper's replica (NO guarantee) and Gaussian at each ε",
        "table2a_laplace_valid_vs_paper",
        _answer_columns,
    ),
):
    FAMILIES.add(
        Family(
            f"finetune-{_scheme}",
            _title,
            _table,
            runs=_finetune_runs(_scheme),
            columns=_columns,
            grid_keys=("laplace", "finetune"),
            train_keys=("nonprivate",) if _scheme == "none" else (),
            train=_finetune_train(_scheme),
            needs=("public",),
            sources=_finetune_sources(_scheme),
        )
    )


# ------------------------------------------------------------------------------------ the grid


def grid_runs(grid: GridConfig) -> list[RunSpec]:
    """Every run of the grid: per model, family by family, per seed of the family (``grid.seeds_of``)."""
    return [
        r
        for model in grid.models
        for f in FAMILIES.values()
        for seed in grid.seeds_of(f.name)
        for r in f.runs(grid, model, seed)
    ]


def family_runs(grid: GridConfig, family: str, root: Path, *, trained: bool = False) -> list[RunSpec]:
    """The runs of ``family`` for a stage writing ``root/<family>/``: one door for train, explain and audit.

    Unknown family -> UserError; a family without runs gets an empty ``root/<family>/`` (the DVC stage's
    output); ``trained`` checks every run's model exists before the stage writes anything.
    """
    FAMILIES.lookup(family)
    specs = [s for s in grid_runs(grid) if s.family == family]
    if not specs:  # e.g. no ldp runs in this profile
        (Path(root) / family).mkdir(parents=True, exist_ok=True)
    for s in specs if trained else []:
        if not (s.model_dir / MODEL_JSON).is_file():
            raise UserError(
                f"grid run {s.name}: no trained model at {s.model_dir}; run `dpcam train --family {family}` first"
            )
    return specs


def fresh(folder: Path) -> Path:
    """``folder`` emptied of what an earlier (possibly interrupted) stage left there: a stage's run
    folder is rebuilt from scratch, never continued from another configuration's files."""
    if folder.exists():
        shutil.rmtree(folder)
    return folder


def train_overrides(s: RunSpec, grid: GridConfig) -> dict[str, Any]:
    """What run ``s`` changes in the ``train`` section: what it varies, its family's settings, and for
    runs without clipping the ``grid.nonprivate`` optimiser (DP-SGD's large lr diverges unclipped)."""
    over: dict[str, Any] = {
        "scheme": s.scheme,
        "model": s.model,
        "seed": s.seed,
        "name": s.name,
        "ldp": s.ldp,
        "train_size": s.train_size,
    }
    if s.scheme in names.CALIBRATED_SCHEMES:
        over["epsilon"] = s.epsilon
    if s.scheme in names.UNCLIPPED_SCHEMES and grid.protocol == "tuned":
        over.update(grid.nonprivate.model_dump())
    over.update(_schedule_recipe(s, grid))  # a DP schedule's recipe: its ε's, or the one a reference trains with
    over.update(FAMILIES[s.family].train(grid))  # a family's own recipe wins (finetune-none's)
    over.update(grid.overrides.get(s.family, {}))  # then what the grid sets for the family (grid.overrides)
    if s.clip is not None:
        over["clip"] = s.clip
    if s.trainable is not None:
        over.update(trainable=s.trainable, weights=s.weights)
    return over


def schedule_of_run(s: RunSpec, grid: GridConfig) -> str | None:
    """The DP schedule (grid.schedules) whose recipe run ``s`` trains with: a reference's own, or the band of a
    from-scratch Gaussian run's ε (any family: the clipping sweep and train-size runs too); None otherwise."""
    if s.schedule is not None:
        return s.schedule
    return grid.schedule_of(s.epsilon) if s.scheme == "gaussian" and s.trainable is None else None


def _schedule_recipe(s: RunSpec, grid: GridConfig) -> dict[str, Any]:
    """The train keys a DP schedule sets for run ``s``: a reference's own schedule (``none``: the schedule's steps
    and views with its reference lr; ``clip-only``: the DP recipe), or the schedule of a Gaussian run's ε."""
    name = schedule_of_run(s, grid)
    if name is None:
        return {}
    sched = grid.schedules[name]
    return sched.reference() if s.scheme == "none" else sched.recipe()


def run_config(s: RunSpec, grid: GridConfig, base: TrainConfig) -> TrainConfig:
    """The TrainConfig of one grid run: the train section with what the run and its family change; a combination
    that is not a valid run is one line naming the run and the key."""
    values = {**base.model_dump(), **train_overrides(s, grid)}
    if s.held:  # DP-SGD's update scales with lr·C: hold it at the main run's (the same run with its own C)
        main = {**base.model_dump(), **train_overrides(s.model_copy(update={"clip": None, "held": False}), grid)}
        values["lr"] = main["lr"] * main["clip"] / s.clip
    try:
        return TrainConfig.model_validate(values)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        shown = f"train.{key} = {err.get('input')!r}: " if key else ""
        raise UserError(
            f"grid run {s.name}: {shown}{err['msg'].removeprefix('Value error, ')}; fix the grid or train section"
        ) from None


def check_flags(family: str, grid: GridConfig, flags: dict[str, Any]) -> None:
    """Refuse (one line) a ``dpcam train --family`` flag that the grid sets for some run of ``family``:
    it would be silently lost for that run."""
    for s in family_runs(grid, family, MODELS_ROOT):
        for key in set(train_overrides(s, grid)) - set(names.RUN_KEYS):
            if flags.get(key) is not None:
                flag = "--" + key.replace("_", "-")
                raise UserError(
                    f"{flag}: the grid sets {key} for run {s.name} of family {family} "
                    f"(grid.{_source(s, key, grid)}); change it there in params.yaml, or train one run without --family"
                )


def _source(s: RunSpec, key: str, grid: GridConfig) -> str:
    """The grid key that sets train key ``key`` for run ``s``, in train_overrides' order read backwards."""
    if key in grid.overrides.get(s.family, {}):
        return f"overrides.{s.family}.{key}"
    family = FAMILIES[s.family]
    if key in family.sources and (key in family.train(grid) or key in ("clip", "trainable", "weights")):
        return family.sources[key]  # the family's recipe, or what its runs vary
    sched = schedule_of_run(s, grid)
    if sched is not None:
        reference = s.scheme == "none"
        if key in (grid.schedules[sched].reference() if reference else grid.schedules[sched].recipe()):
            return f"schedules.{sched}.{'reference_lr' if reference and key == 'lr' else key}"
    if key in NonPrivateConfig.model_fields and s.scheme in names.UNCLIPPED_SCHEMES:
        return f"nonprivate.{key}"
    return key
