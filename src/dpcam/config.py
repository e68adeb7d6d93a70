"""params.yaml sections as validated models, CLI overrides, and one-line errors.

Each pipeline stage reads only its own section (DVC's rule: a stage depends on its own params), so
changing an explanation setting never retrains a model. Every invalid value becomes a
``UserError`` naming the key, the bad value and what is allowed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpcam.errors import UserError

PARAMS_FILE = Path("params.yaml")
PREPARED_ROOT = Path("data/prepared")
LDP_ROOT = Path("data/ldp")
FORMATS = ("synthetic", "aptos", "catsdogs", "petimages", "imagefolder")
DATASET_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_eps(eps: float) -> str:
    """ε as it appears in folder and run names: ``0.25``, ``1``, ``10`` (no trailing ``.0``)."""
    return f"{eps:g}"


def _eps_literal(v: Any) -> Any:
    # DVC builds output paths from the literal YAML value (``1.0`` -> "eps1.0") while dpcam
    # writes ``format_eps`` ("eps1"); refusing whole floats keeps the two names identical.
    if isinstance(v, float) and v.is_integer():
        raise ValueError(
            f"write whole numbers without '.0' ({int(v)}), because DVC names output folders from the literal value"
        )
    return v


def _eps_positive(v: float) -> float:
    if not (v > 0 and math.isfinite(v)):
        raise ValueError("ε must be a finite number > 0")
    return v


def _known_mechanism(name: str) -> str:
    from dpcam.data.ldp import MECHANISMS

    if name not in MECHANISMS:
        raise ValueError(f"unknown mechanism; known: {', '.join(sorted(MECHANISMS))}")
    return name


Mechanism = Annotated[str, AfterValidator(_known_mechanism)]
Epsilon = Annotated[float, BeforeValidator(_eps_literal), AfterValidator(_eps_positive)]


class SplitConfig(_Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(
                f"the split fractions train + val + test must sum to 1 (they sum to {total:g})"
            )
        if self.train <= 0:
            raise ValueError("train must be > 0 (the training split cannot be empty)")
        return self


class SyntheticConfig(_Section):
    """Generator settings of the built-in synthetic-fundus dataset."""

    n: int = Field(6000, ge=10, description="number of images")
    balance: Literal["uniform", "aptos"] | list[float] = Field(
        "uniform", description="class shares of grades 0-4: uniform, aptos (skewed) or 5 numbers"
    )
    lesion_scale: float = Field(1.0, gt=0, le=10, description="multiplies every lesion's size")

    @field_validator("balance")
    @classmethod
    def _balance(cls, v):
        if isinstance(v, list):
            if len(v) != 5 or any(x < 0 for x in v) or sum(v) <= 0:
                raise ValueError(f"{v}: give 5 non-negative shares (grades 0-4), 'uniform' or 'aptos'")
        return v


class PrepareConfig(_Section):
    dataset: str = Field("synthetic-fundus", pattern=DATASET_NAME)
    format: Literal[FORMATS] = "synthetic"  # type: ignore[valid-type]
    source: Path | None = None
    masks: Path | None = Field(None, description="optional folder of binary masks named like the images")
    size: int = Field(64, ge=16, le=1024)
    seed: int = 0
    split: SplitConfig = SplitConfig()
    skip_bad: bool = False
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per core")
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _source(self) -> "PrepareConfig":
        if self.format != "synthetic":
            if self.source is None:
                raise ValueError(f"source is required for format {self.format!r}: set it to the dataset folder")
            if not self.source.exists():
                raise ValueError(f"source = {str(self.source)!r}: does not exist; point it at the dataset folder")
        if self.masks is not None and not self.masks.is_dir():
            raise ValueError(f"masks = {str(self.masks)!r}: not a folder; point it at a folder of mask images")
        return self


class DpPixConfig(_Section):
    b: int = Field(4, ge=1, description="cell size in pixels")
    m: int = Field(1, ge=1, description="neighbouring images differ in at most m pixels")


class LdpConfig(_Section):
    mechanisms: list[Mechanism] = Field(default_factory=lambda: ["singh-sikka", "dp-pix"])
    epsilons: list[Epsilon] = Field(default_factory=lambda: [0.25, 0.5, 1])
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of pixel-gaussian (per value)")
    seed: int = 0
    secure: bool = False
    dp_pix: DpPixConfig = DpPixConfig()



SCHEMES = ("none", "clip-only", "gaussian", "laplace", "ldp")
DP_SCHEMES = ("gaussian", "laplace")


class TrainConfig(_Section):
    """One training run. ``scheme`` and ``epsilon`` follow DESIGN.md §3."""

    dataset: str = Field("synthetic-fundus", pattern=DATASET_NAME)
    ldp: str | None = Field(None, description="train on data/ldp/<dataset>/<ldp>, e.g. singh-sikka-eps0.5")
    model: str = "smallcnn"
    weights: Path | None = None
    small_input: bool | None = None
    scheme: Literal[SCHEMES] = "gaussian"  # type: ignore[valid-type]
    epsilon: float | None = Field(1.0, description="target ε of gaussian/laplace")
    delta: float = Field(1e-4, gt=0, lt=1)
    clip: float = Field(1.0, gt=0, description="per-example clipping bound C (L2; L1 for laplace)")
    accountant: Literal["prv", "rdp", "gdp"] = "prv"
    grad_sample_mode: Literal["hooks", "ew", "functorch", "ghost"] = "hooks"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = Field(5, ge=1, description="epochs between decays of the step schedule")
    gamma: float = Field(0.5, gt=0, le=1, description="decay factor of the step schedule")
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(256, ge=1, description="expected batch size (Poisson sampling for DP runs)")
    train_size: int | None = Field(None, ge=10, description="train on this many training images (None = all)")
    eval_batch_size: int = Field(512, ge=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    keep_best: bool = True
    name: str | None = Field(None, pattern=DATASET_NAME, description="run name (default <scheme>-eps<ε>-<model>-s<seed>)")

    @model_validator(mode="after")
    def _scheme(self) -> "TrainConfig":
        if self.scheme in DP_SCHEMES:
            if self.epsilon is None or not (self.epsilon > 0 and math.isfinite(self.epsilon)):
                raise ValueError(f"epsilon = {self.epsilon!r}: scheme {self.scheme!r} needs a finite target ε > 0")
        if self.scheme == "ldp" and not self.ldp:
            raise ValueError("ldp is required for scheme 'ldp': name a derivative such as singh-sikka-eps0.5")
        if self.ldp and self.scheme != "ldp":
            raise ValueError(f"ldp = {self.ldp!r}: training on local-DP data is scheme 'ldp', not {self.scheme!r}")
        return self

    @property
    def target_epsilon(self) -> float | None:
        return self.epsilon if self.scheme in DP_SCHEMES else None

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        if self.scheme == "ldp":
            eps = self.ldp
        else:
            eps = "eps" + (format_eps(self.epsilon) if self.scheme in DP_SCHEMES else "inf")
        return f"{self.scheme}-{eps}-{self.model}-s{self.seed}"

    @property
    def data_dir(self) -> Path:
        return LDP_ROOT / self.dataset / self.ldp if self.ldp else PREPARED_ROOT / self.dataset


class ExplainConfig(_Section):
    """Grad-CAM scoring of a trained run (DESIGN.md §3 definitions)."""

    method: str = Field("gradcam", description="gradcam | guided-gradcam")
    target: Literal["prediction", "label"] = "prediction"
    metrics: list[str] = Field(
        default_factory=lambda: ["confidence", "deletion-insertion", "pointing-game", "energy-pointing-game",
                                 "map-agreement", "randomisation"]
    )
    max_images: int | None = Field(None, ge=1, description="score at most this many test images (None = all)")
    batch_size: int = Field(128, ge=1)
    steps: int = Field(16, ge=2, le=256, description="deletion/insertion steps K")
    layer: str | None = Field(None, description="Grad-CAM layer (dotted module name); None = the model's registered layer")
    tolerance: int | None = Field(None, ge=0, description="pointing-game tolerance in pixels (None = 15 px at 224 px, scaled)")
    grid_images: int = Field(6, ge=1, le=32)
    seed: int = Field(0, description="seed of the re-initialised model of the randomisation check")
    device: Literal["auto", "cpu", "cuda"] = "auto"


class NonPrivateConfig(_Section):
    """Optimiser of the runs without clipping (none, ldp): DP-SGD's large lr would diverge there."""

    optimizer: Literal["sgd", "adam"] = "adam"
    lr: float = Field(0.003, gt=0)
    batch_size: int = Field(128, ge=1)


class ClipSweepConfig(_Section):
    """The paper's Figure 6b: Gaussian runs at one ε with other clipping bounds C."""

    epsilon: Epsilon = 1
    clips: list[Annotated[float, BeforeValidator(_eps_literal), AfterValidator(_eps_positive)]] = Field(
        default_factory=lambda: [0.1, 10]
    )


class TrainSizesConfig(_Section):
    """DP needs data: the same runs on the first N training images of each size."""

    sizes: list[Annotated[int, Field(ge=10)]] = Field(default_factory=list)
    gaussian: list[Epsilon] = Field(default_factory=list)
    none: bool = True


class GridConfig(_Section):
    """The runs `dvc repro` trains and `dpcam report` tabulates (read by dvc.yaml and report)."""

    name: str = Field("quick", pattern=DATASET_NAME, description="grid tag of the MLflow runs")
    models: list[str] = Field(default_factory=lambda: ["smallcnn"])
    seeds: list[int] = Field(default_factory=lambda: [0])
    gaussian: list[Epsilon] = Field(default_factory=lambda: [0.5, 1, 5, 10])
    laplace: list[Epsilon] = Field(default_factory=lambda: [1, 5, 10])
    laplace_clip: float = Field(1.0, gt=0, description="L1 clipping bound of the laplace runs")
    laplace_lr: float = Field(0.1, gt=0)
    baselines: list[Literal["none", "clip-only"]] = Field(default_factory=lambda: ["none", "clip-only"])
    ldp: list[str] = Field(default_factory=list, description="local-DP derivatives to train on, e.g. singh-sikka-eps0.5")
    clip_sweep: ClipSweepConfig = ClipSweepConfig()
    train_sizes: TrainSizesConfig = TrainSizesConfig()
    nonprivate: NonPrivateConfig = NonPrivateConfig()


FAMILIES = ("baseline", "gaussian", "laplace", "ldp", "clip-sweep", "train-size")


class RunSpec(BaseModel):
    """One run of the grid: its name (models/<name>/, metrics/<name>/) and what it varies."""

    name: str
    family: Literal["baseline", "gaussian", "laplace", "ldp", "clip-sweep", "train-size"]
    scheme: str
    model: str
    seed: int
    epsilon: float | None = None  # target ε (None = ∞ for none/clip-only; the data's ε for ldp)
    ldp: str | None = None
    clip: float | None = None  # set when the run overrides the train section's clip
    train_size: int | None = None

    @property
    def model_dir(self) -> Path:
        """``models/<family>/<run>/``: model.pt, model.json and train.json (the train stage's output)."""
        return Path("models") / self.family / self.name

    @property
    def metrics_dir(self) -> Path:
        """``metrics/<family>/<run>/``: explain.json, maps.npy, map_indices.npy, cams.png."""
        return Path("metrics") / self.family / self.name


def grid_runs(grid: GridConfig) -> list[RunSpec]:
    """Every run of the grid, named exactly as dvc.yaml names them."""
    runs: list[RunSpec] = []
    for model in grid.models:
        for seed in grid.seeds:
            tail = f"{model}-s{seed}"
            for scheme in grid.baselines:
                runs.append(RunSpec(name=f"{scheme}-epsinf-{tail}", family="baseline", scheme=scheme, model=model, seed=seed))
            for eps in grid.gaussian:
                runs.append(RunSpec(name=f"gaussian-eps{format_eps(eps)}-{tail}", family="gaussian", scheme="gaussian",
                                    model=model, seed=seed, epsilon=eps))
            for eps in grid.laplace:
                runs.append(RunSpec(name=f"laplace-eps{format_eps(eps)}-{tail}", family="laplace", scheme="laplace",
                                    model=model, seed=seed, epsilon=eps, clip=grid.laplace_clip))
            for name in grid.ldp:
                eps = name.rsplit("-eps", 1)[-1]
                runs.append(RunSpec(name=f"ldp-{name}-{tail}", family="ldp", scheme="ldp", model=model, seed=seed,
                                    ldp=name, epsilon=float(eps) if eps.replace(".", "", 1).isdigit() else None))
            sweep = grid.clip_sweep
            for c in sweep.clips:
                runs.append(RunSpec(name=f"gaussian-eps{format_eps(sweep.epsilon)}-clip{format_eps(c)}-{tail}",
                                    family="clip-sweep", scheme="gaussian", model=model, seed=seed,
                                    epsilon=sweep.epsilon, clip=c))
            sizes = grid.train_sizes
            for n in sizes.sizes:
                if sizes.none:
                    runs.append(RunSpec(name=f"none-epsinf-n{n}-{tail}", family="train-size", scheme="none",
                                        model=model, seed=seed, train_size=n))
                for eps in sizes.gaussian:
                    runs.append(RunSpec(name=f"gaussian-eps{format_eps(eps)}-n{n}-{tail}", family="train-size",
                                        scheme="gaussian", model=model, seed=seed, epsilon=eps, train_size=n))
    return runs


def family_runs(grid: GridConfig, family: str, root: Path, *, trained: bool = False) -> list[RunSpec]:
    """The runs of ``family`` for a stage writing ``root/<family>/``: one door for train, explain and audit.

    Unknown family -> UserError; a family without runs gets an empty ``root/<family>/`` (the DVC stage's
    output); ``trained`` checks every run's model exists before the stage writes anything.
    """
    if family not in FAMILIES:
        raise UserError(f"unknown grid family {family!r}; families: {', '.join(FAMILIES)}")
    specs = [s for s in grid_runs(grid) if s.family == family]
    if not specs:  # e.g. no ldp runs in this profile
        (Path(root) / family).mkdir(parents=True, exist_ok=True)
    for spec in specs if trained else []:
        if not (spec.model_dir / "model.json").is_file():
            raise UserError(f"grid run {spec.name}: no trained model at {spec.model_dir}; run `dpcam train --family {family}` first")
    return specs


SECTIONS: dict[str, type[_Section]] = {
    "prepare": PrepareConfig, "ldp": LdpConfig, "train": TrainConfig, "explain": ExplainConfig, "grid": GridConfig,
}


# ---------------------------------------------------------------------------------- search


def _search_range(kind: str):
    """Validator of a ``[low, high]`` search range (``kind``: "log" float > 0, or "int" ≥ 1)."""

    def check(v: list) -> list:
        if len(v) == 0:
            raise ValueError("empty range; give [low, high]")
        if len(v) != 2:
            raise ValueError(f"a range is two numbers [low, high], got {len(v)}")
        low, high = v
        if kind == "int" and (low < 1 or high < 1):
            raise ValueError("both ends must be whole numbers >= 1")
        if kind == "log" and not (low > 0 and math.isfinite(high)):
            raise ValueError("both ends must be finite numbers > 0 (the range is searched on a log scale)")
        if low > high:
            raise ValueError(f"inverted range (low {low:g} > high {high:g}); write [low, high]")
        return v

    return check


def _search_choices(v: list) -> list:
    if len(v) == 0:
        raise ValueError("empty list of choices; give at least one")
    if len(set(v)) != len(v):
        raise ValueError("choices repeat; list each once")
    return v


def _search_objective(name: str) -> str:
    from dpcam.search import OBJECTIVES

    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective metric; known: {', '.join(OBJECTIVES)}")
    return name


def _search_models(v: list | None) -> list | None:
    from dpcam.models import MODELS

    if v is None:
        return v
    _search_choices(v)
    unknown = [m for m in v if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(sorted(MODELS))}")
    return v


LogRange = Annotated[list[float], AfterValidator(_search_range("log"))]
IntRange = Annotated[list[int], AfterValidator(_search_range("int"))]


class SearchConfig(_Section):
    """``dpcam search``: Optuna multi-objective search (ε ↓, validation accuracy ↑, explanation quality ↑).

    Trials start from the ``train`` section and override what is searched; explanations are scored
    as the ``explain`` section says (method, target, steps, tolerance) on validation images. Ranges
    are ``[low, high]`` (``low == high`` fixes the value); float ranges are searched on a log scale.
    """

    objective: Annotated[str, AfterValidator(_search_objective)] = "masked_score_pct"
    sampler: Literal["nsga2", "tpe", "random"] = "nsga2"
    seed: int = 0
    trials: int = Field(30, ge=0, description="trials this process runs (the mean number for a random count)")
    trials_distribution: Literal["fixed", "poisson", "geometric"] = Field(
        "fixed", description="random number of trials (sampler random only) for the Papernot-Steinke bound")
    max_trials: int | None = Field(None, ge=1, description="stop once the study has this many finished trials")
    timeout: float | None = Field(None, gt=0, description="seconds; stop starting new trials after this")
    storage: str = Field("sqlite:///mlruns/optuna.db", min_length=1, description="any SQLAlchemy URL")
    study_name: str | None = Field(None, pattern=DATASET_NAME, description="default dpcam-<dataset>")
    population: int = Field(8, ge=2, description="NSGA-II generation size; TPE's random start-up trials")
    schemes: Annotated[list[Literal["gaussian", "laplace"]], AfterValidator(_search_choices)] = Field(
        default_factory=lambda: ["gaussian", "laplace"])
    models: Annotated[list[str] | None, AfterValidator(_search_models)] = Field(
        None, description="models to search over (null = train.model)")
    epsilon: LogRange = Field(default_factory=lambda: [0.5, 10], description="target ε")
    clip: LogRange = Field(default_factory=lambda: [0.1, 10], description="L2 clipping bound C (gaussian)")
    lr: LogRange = Field(default_factory=lambda: [0.1, 3], description="learning rate (gaussian)")
    laplace_clip: LogRange = Field(default_factory=lambda: [10, 1000], description="L1 clipping bound C (laplace)")
    laplace_lr: LogRange = Field(default_factory=lambda: [0.05, 2], description="learning rate (laplace)")
    epochs: IntRange = Field(default_factory=lambda: [2, 6])
    batch_size: Annotated[list[Annotated[int, Field(ge=1)]], AfterValidator(_search_choices)] = Field(
        default_factory=lambda: [128, 256, 512], description="expected batch sizes (choices)")
    explain_images: int = Field(256, ge=1, description="validation images scored per trial")
    heartbeat: int = Field(30, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(None, ge=1, description="a trial silent this long is failed (default 2 x heartbeat)")
    max_retry: int = Field(2, ge=0, description="retries of a trial whose worker died")
    out: Path = Field(Path("reports/search"), description="folder of the front table and plots")

    @model_validator(mode="after")
    def _random_count(self) -> "SearchConfig":
        if self.trials_distribution != "fixed" and self.sampler != "random":
            raise ValueError(f"trials_distribution = {self.trials_distribution!r} needs sampler 'random' "
                             f"(the Papernot-Steinke bound is for random search), not {self.sampler!r}")
        if self.trials_distribution != "fixed" and self.trials < 1:
            raise ValueError(f"trials = {self.trials}: a {self.trials_distribution} number of trials needs a mean >= 1")
        return self


SECTIONS["search"] = SearchConfig


def read_params(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """The raw params.yaml mapping ({} when the file does not exist)."""
    if not path.exists():
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of sections ({', '.join(SECTIONS)})")
    return data


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def load_section(
    name: str, overrides: dict[str, Any] | None = None, path: Path = PARAMS_FILE
):
    """Validate section ``name`` of params.yaml with CLI ``overrides`` (dotted keys; None = unset).

    Raises ``UserError`` with one line: ``<file>: <section>.<key> = <value>: <what is allowed>``.
    """
    raw = read_params(path)
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise UserError(f"{path}: section {name!r} must be a mapping")
    section = _deep_copy(section)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in flags.items():
        _set_dotted(section, key, value)
    try:
        return SECTIONS[name].model_validate(section)
    except ValidationError as e:
        raise UserError(_one_line(e, name, path, flags)) from None


def _deep_copy(d):
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


# list-valued keys whose CLI flag is singular and repeatable
_FLAG_NAMES = {"mechanisms": "mechanism", "epsilons": "epsilon", "synthetic.n": "n", "metrics": "metric",
               "attacks": "attack"}


def _one_line(e: ValidationError, section: str, path: Path, flags: dict[str, Any]) -> str:
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("literal[", "list[", "function-"))]
    # keep list indices as [i]
    key = section
    for p in loc:
        key += f"[{p}]" if p.isdigit() else f".{p}"
    dotted = ".".join(p for p in loc if not p.isdigit())  # ldp.epsilons[1] came from the flag "epsilons"
    origin = f"--{_FLAG_NAMES.get(dotted, dotted).replace('_', '-')}" if dotted in flags else str(path)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(SECTIONS[section].model_fields) if len(loc) == 1 else "see README"
        return f"{origin}: unknown key {key}; allowed keys: {allowed}"
    if err["type"] == "missing":
        return f"{origin}: {key} is required"
    value = err.get("input")
    shown = f" = {value!r}"
    if not loc:  # a model-level check: its message starts with the key it is about
        head = msg.split(" ", 1)[0].split(".")[0]
        origin = f"--{_FLAG_NAMES.get(head, head).replace('_', '-')}" if head in flags else str(path)
        return f"{origin}: {section}.{msg}"
    return f"{origin}: {key}{shown}: {msg}"


def default_dataset(path: Path = PARAMS_FILE) -> str:
    """The dataset a stage works on when no --dataset is given: ``prepare.dataset`` in params."""
    name = (read_params(path).get("prepare") or {}).get("dataset", PrepareConfig.model_fields["dataset"].default)
    return str(name)


def prepared_dir(dataset: str) -> Path:
    """data/prepared/<dataset>, or a UserError listing what has been prepared."""
    path = PREPARED_ROOT / dataset
    if not (path / "manifest.json").is_file():
        have = sorted(p.name for p in PREPARED_ROOT.glob("*") if (p / "manifest.json").is_file())
        hint = f"prepared datasets: {', '.join(have)}" if have else "nothing is prepared yet"
        raise UserError(f"unknown dataset {dataset!r} (no {path}/manifest.json; {hint}); run `dpcam prepare --dataset {dataset}` first")
    return path


from dpcam.audit import AuditConfig  # noqa: E402  (audit.py imports nothing from config at module level)

SECTIONS["audit"] = AuditConfig
