"""The sections of params.yaml as validated models; their defaults are params.yaml's values.

One model per stage section (prepare, ldp, train, explain, grid, audit, search). Every default
equals the shipped params.yaml (a test holds them together), so a key a user deletes means what
the shipped file says, never something else. Validators read only leaf registries of names
(:mod:`dpcam.names`), never a stage, so this module imports nothing heavier than pydantic.

Long by declaration (~870 lines): it is the table of every params.yaml key with its type, default, bounds
and description, which `dpcam --help` and the one-line errors quote; its functions are short validators.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dpcam import names
from dpcam.errors import UserError
from dpcam.layout import LDP_ROOT, NAME_PATTERN, PREPARED_ROOT, SEARCH_REPORT, format_eps, public_dataset, run_name

# dataset, derivative, run, grid and study names: plain names, never paths (layout.check_name)
DATASET_NAME = NAME_PATTERN


class Section(BaseModel):
    # every number is finite: an lr, clip, ε, δ, momentum or weight decay of inf or NaN has no meaning
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _distinct(v: list) -> list:
    """A list without repeats: a repeated ε, seed or model would name one run twice (one folder, counted twice)."""
    seen: list = []
    for x in v:
        if x in seen:
            shown = format_eps(x) if isinstance(x, float) else repr(x)
            raise ValueError(f"{shown} is listed twice; list each value once")
        seen.append(x)
    return v


def _needed(why: str):
    """Validator of a list that may not be empty (``why``: what needs it)."""

    def check(v: list) -> list:
        if not v:
            raise ValueError(f"empty; {why}")
        return v

    return check


Distinct = AfterValidator(_distinct)

FLOAT32_MAX = 3.4028234663852886e38  # the weights are float32: a step size or bound above this overflows


def _float32(v: float) -> float:
    if abs(v) > FLOAT32_MAX:
        raise ValueError(f"too large for the float32 arithmetic of training (at most {FLOAT32_MAX:.3g})")
    return v


Float32 = AfterValidator(_float32)


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


def _one_of(registry: tuple[str, ...], what: str):
    def check(name: str) -> str:
        if name not in registry:
            raise ValueError(f"unknown {what}; known: {', '.join(sorted(registry))}")
        return name

    return check


Mechanism = Annotated[str, AfterValidator(_one_of(names.MECHANISMS, "mechanism"))]
Epsilon = Annotated[float, BeforeValidator(_eps_literal), AfterValidator(_eps_positive)]


def _known_model(name: str) -> str:
    if name.lower() not in names.MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(names.MODELS))}")
    return name.lower()


ModelName = Annotated[str, AfterValidator(_known_model)]


# ------------------------------------------------------------------------------------- prepare


class SplitConfig(Section):
    train: float = Field(0.7, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.2, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"the split fractions train + val + test must sum to 1 (they sum to {total:g})")
        if self.train <= 0:
            raise ValueError("train must be > 0 (the training split cannot be empty)")
        return self


class SyntheticConfig(Section):
    """Generator settings of the built-in synthetic-fundus dataset."""

    n: int = Field(12000, ge=10, description="number of images")
    balance: Literal["uniform", "aptos"] | list[float] = Field(
        "uniform", description="class shares of grades 0-4: uniform, aptos (skewed) or 5 numbers"
    )
    lesion_scale: float = Field(3.0, gt=0, le=10, description="multiplies every lesion's size")

    @field_validator("balance")
    @classmethod
    def _balance(cls, v):
        if isinstance(v, list):
            if len(v) != 5 or any(x < 0 for x in v) or sum(v) <= 0:
                raise ValueError(f"{v}: give 5 non-negative shares (grades 0-4), 'uniform' or 'aptos'")
        return v


class PublicConfig(Section):
    """The public set ``dpcam prepare --public`` writes (``data/prepared/<dataset>-public``): the data a trunk is
    pretrained on without privacy before private fine-tuning. It must share no image with the private set."""

    n: int = Field(12000, ge=10, description="synthetic: number of public images")
    seed: int = Field(2, description="synthetic: generator and split seed of the public set (not prepare.seed)")
    source: Path | None = Field(
        None, description="real formats: a folder of public images in prepare.format's layout (null: no public set)"
    )

    @model_validator(mode="after")
    def _source(self) -> PublicConfig:
        if self.source is not None and not self.source.exists():
            raise ValueError(f"source = {str(self.source)!r}: does not exist; point it at a folder of public images")
        return self


class PrepareConfig(Section):
    dataset: str = Field("synthetic-fundus", pattern=DATASET_NAME)
    format: Literal[names.FORMATS] = "synthetic"  # type: ignore[valid-type]
    source: Path | None = None
    masks: Path | None = Field(None, description="optional folder of binary masks named like the images")
    size: int = Field(32, ge=16, le=1024)
    seed: int = 0
    split: SplitConfig = SplitConfig()
    skip_bad: bool = False
    workers: int = Field(0, ge=0, description="decode processes; 0 = one per core")
    groups: Path | None = Field(
        None,
        description="CSV (columns image,group) naming each image's patient: splits keep a patient's images together "
        "and training states the guarantee per patient (train.max_group_images)",
    )
    synthetic: SyntheticConfig = SyntheticConfig()
    public: PublicConfig = PublicConfig()

    @model_validator(mode="after")
    def _source(self) -> PrepareConfig:
        if self.format != "synthetic":
            if self.source is None:
                raise ValueError(f"source is required for format {self.format!r}: set it to the dataset folder")
            if not self.source.exists():
                raise ValueError(f"source = {str(self.source)!r}: does not exist; point it at the dataset folder")
        if self.masks is not None and not self.masks.is_dir():
            raise ValueError(f"masks = {str(self.masks)!r}: not a folder; point it at a folder of mask images")
        if self.groups is not None:
            if self.format == "synthetic":
                raise ValueError("groups: synthetic-fundus has one image per patient; groups are for real formats")
            if not self.groups.is_file():
                raise ValueError(f"groups = {str(self.groups)!r}: no such file; give a CSV with columns image,group")
        return self


# ------------------------------------------------------------------------------------- ldp


class DpPixConfig(Section):
    b: int = Field(4, ge=1, description="cell size in pixels")
    m: int = Field(1, ge=1, description="neighbouring images differ in at most m pixels")


class LdpConfig(Section):
    mechanisms: Annotated[list[Mechanism], Distinct] = Field(default_factory=lambda: ["singh-sikka", "dp-pix"])
    epsilons: Annotated[list[Epsilon], Distinct] = Field(default_factory=lambda: [0.25, 0.5, 1])
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of pixel-gaussian (per value)")
    seed: int = 0
    secure: bool = False
    dp_pix: DpPixConfig = DpPixConfig()


# ------------------------------------------------------------------------------------- train


class TrainConfig(Section):
    """One training run (schemes and their guarantees: docs/privacy.md)."""

    dataset: str = Field("synthetic-fundus", pattern=DATASET_NAME)
    ldp: str | None = Field(
        None, pattern=DATASET_NAME, description="train on data/ldp/<dataset>/<ldp>, e.g. singh-sikka-eps0.5"
    )
    model: ModelName = "smallcnn"
    weights: Path | None = Field(None, description="local pretrained weights (a state dict); the trunk to fine-tune")
    trainable: Literal[names.TRAINABLE] = Field(  # type: ignore[valid-type]
        "all", description="all | head | last-block: train only this part of the model (fine-tuning needs weights)"
    )
    public: bool = Field(False, description="train on the public set data/prepared/<dataset>-public")
    small_input: bool | None = None
    scheme: Literal[names.SCHEMES] = "gaussian"  # type: ignore[valid-type]
    epsilon: float | None = Field(
        1.0, description="target ε of gaussian/laplace; laplace-paper: the nominal ε its σ is calibrated from"
    )
    delta: float = Field(1e-5, gt=0, lt=1)
    clip: Annotated[float, Float32] = Field(1.0, gt=0, description="per-example clipping bound C (L2; L1 for laplace)")
    accountant: Literal[names.GAUSSIAN_ACCOUNTANTS] = "prv"  # type: ignore[valid-type]
    grad_sample_mode: Literal[names.GRAD_SAMPLE_MODES] = "hooks"  # type: ignore[valid-type]
    precision: Literal[names.PRECISIONS] = Field(  # type: ignore[valid-type]
        "fp32",
        description="bf16: bfloat16 autocast of each step's forward pass (per-example clipping and noise stay float32; "
        "faster only on CPUs with native bfloat16, docs/benchmarks.md)",
    )
    optimizer: Literal[names.OPTIMIZERS] = "sgd"  # type: ignore[valid-type]
    lr: Annotated[float, Float32] = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: Annotated[float, Float32] = Field(0.0, ge=0)
    schedule: Literal[names.SCHEDULES] = "cosine"  # type: ignore[valid-type]
    step_size: int = Field(5, ge=1, description="epochs between decays of the step schedule")
    gamma: float = Field(0.5, gt=0, le=1, description="decay factor of the step schedule")
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(512, ge=1, description="expected batch size (Poisson sampling for DP runs)")
    train_size: int | None = Field(None, ge=10, description="train on this many training images (None = all)")
    ema: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="decay of an exponential moving average of the weights (evaluated and "
        "released instead of the last iterate; De et al. 2022); None = off",
    )
    augment: Literal[names.AUGMENTATIONS] = Field(  # type: ignore[valid-type]
        "none", description="flip-shift: random left-right flips and shifts of the training images"
    )
    aug_mult: int = Field(
        1, ge=1, description="augmented views per example, averaged before clipping (augmentation multiplicity)"
    )
    eval_batch_size: int = Field(512, ge=1)
    seed: int = 0
    device: Literal[names.DEVICES] = "auto"  # type: ignore[valid-type]
    keep_best: bool = True
    max_group_images: int | None = Field(
        None,
        ge=1,
        description="the most images one patient (group, prepare.groups) may have: the guarantee is stated per "
        "patient by group privacy; required for grouped data, checked against the training split",
    )
    force_delta: bool = Field(
        False,
        description="accept δ ≥ 1/N (N training images) for gaussian/laplace: a guarantee that allows leaking one "
        "image outright; refused unless true",
    )
    name: str | None = Field(
        None, pattern=DATASET_NAME, description="run name (default <scheme>-eps<ε>-<model>-s<seed>)"
    )

    @model_validator(mode="after")
    def _scheme(self) -> TrainConfig:
        if self.scheme in names.CALIBRATED_SCHEMES:
            if self.epsilon is None or not (self.epsilon > 0 and math.isfinite(self.epsilon)):
                raise ValueError(f"epsilon = {self.epsilon!r}: scheme {self.scheme!r} needs a finite target ε > 0")
        if self.trainable != "all" and self.weights is None:
            raise ValueError(
                f"trainable = {self.trainable!r} fine-tunes a pretrained trunk: give its weights (--weights PATH, "
                "e.g. models/public/<run>/model.pt)"
            )
        if self.public and self.ldp:
            raise ValueError(f"public = true trains on the public set, not on the local-DP derivative {self.ldp!r}")
        if self.scheme == "ldp" and not self.ldp:
            raise ValueError("ldp is required for scheme 'ldp': name a derivative such as singh-sikka-eps0.5")
        if self.ldp and self.scheme != "ldp":
            raise ValueError(f"ldp = {self.ldp!r}: training on local-DP data is scheme 'ldp', not {self.scheme!r}")
        if self.aug_mult > 1 and self.augment == "none":
            raise ValueError(f"aug_mult = {self.aug_mult} averages augmented views: set augment (e.g. flip-shift)")
        if self.aug_mult > 1 and self.grad_sample_mode == "ghost" and self.scheme in names.CLIPPED_SCHEMES:
            raise ValueError("aug_mult > 1 averages per-example gradients before clipping: use grad_sample_mode hooks")
        return self

    @property
    def target_epsilon(self) -> float | None:
        """The ε the noise is calibrated for (gaussian, laplace; laplace-paper's nominal ε: not a guarantee)."""
        return self.epsilon if self.scheme in names.CALIBRATED_SCHEMES else None

    @property
    def run_name(self) -> str:
        return self.name or run_name(
            self.scheme,
            self.model,
            self.seed,
            epsilon=self.target_epsilon,
            ldp=self.ldp,
            public=self.public,
            trainable=self.trainable,
        )

    @property
    def data_dir(self) -> Path:
        if self.ldp:
            return LDP_ROOT / self.dataset / self.ldp
        return PREPARED_ROOT / (public_dataset(self.dataset) if self.public else self.dataset)


# ------------------------------------------------------------------------------------- explain


class ExplainConfig(Section):
    """Grad-CAM scoring of a trained run (definitions: docs/metrics.md)."""

    methods: Annotated[list[str], Distinct, AfterValidator(_needed("name at least one explanation method"))] = Field(
        default_factory=lambda: ["gradcam", "integrated-gradients", "occlusion"],
        description="explanation methods, each scored (the first is the headline method of the verdict): "
        + " | ".join(names.EXPLAIN_METHODS),
    )
    target: Literal["prediction", "label"] = "prediction"
    metrics: Annotated[list[str], Distinct] = Field(default_factory=lambda: list(names.EXPLAIN_METRICS))
    max_images: int | None = Field(200, ge=1, description="score at most this many test images (None = all)")
    batch_size: int = Field(128, ge=1)
    steps: int = Field(8, ge=2, le=256, description="deletion/insertion steps K")
    layer: str | None = Field(
        None, description="Grad-CAM layer (dotted module name); None = the model's registered layer"
    )
    tolerance: int | None = Field(
        None, ge=0, description="pointing-game tolerance in pixels (None = 15 px at 224 px, scaled)"
    )
    grid_images: int = Field(6, ge=1, le=32)
    seed: int = Field(
        0,
        description="seed of the re-initialised model of the randomisation check, of the random maps of the "
        "masking baselines and of ROAD's noise and tie-break order (with each image's dataset index)",
    )
    device: Literal[names.DEVICES] = "auto"  # type: ignore[valid-type]
    ig_steps: int = Field(32, ge=2, le=1024, description="integrated-gradients: Gauss-Legendre steps")
    occlusion_window: int = Field(8, ge=1, description="occlusion: side of the square window in pixels")
    occlusion_stride: int = Field(4, ge=1, description="occlusion: pixels the window slides by")

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        for m in v:
            if m not in names.EXPLAIN_METHODS:
                raise ValueError(f"unknown explanation method {m!r}; known: {', '.join(names.EXPLAIN_METHODS)}")
        return v

    @property
    def headline(self) -> str:
        """The first method: its files are the run's metrics folder itself; the verdict's answer reads it."""
        return self.methods[0]

    def check_image(self, size: int, where: str) -> None:
        """Refuse settings that cannot fit an image of ``size`` pixels (``where``: the data it comes from)."""
        if "occlusion" in self.methods and self.occlusion_window > size:
            raise UserError(
                f"explain.occlusion_window = {self.occlusion_window} is larger than the {size}-pixel images of "
                f"{where}; set it to at most {size} in params.yaml"
            )


# ------------------------------------------------------------------------------------- grid


class NonPrivateConfig(Section):
    """The recipe of the runs without clipping (none, ldp) under ``protocol: tuned``: chosen for
    non-private training on validation data (docs/recipes.md), as the DP recipe (the train section)
    was chosen for DP-SGD."""

    optimizer: Literal[names.OPTIMIZERS] = "sgd"  # type: ignore[valid-type]
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(32, ge=1)
    schedule: Literal[names.SCHEDULES] = "cosine"  # type: ignore[valid-type]


class ScheduleConfig(Section):
    """A DP-SGD recipe for a band of ε (chosen on validation data of an independent draw: docs/recipes.md), and the
    learning rate of the non-private reference trained with its schedule (the "budget" part of the gap). A band is
    every ε above the next smaller schedule's bound up to ``max_epsilon`` (null: no upper bound)."""

    max_epsilon: Epsilon | None = Field(
        None, description="the largest Gaussian ε of this band (null: every ε above the other bands)"
    )
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(512, ge=1, description="expected batch size (Poisson sampling)")
    lr: Annotated[float, Float32] = Field(1.0, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    clip: Annotated[float, Float32] = Field(1.0, gt=0)
    ema: float | None = Field(None, gt=0, lt=1, description="decay of the moving average of the weights")
    augment: Literal[names.AUGMENTATIONS] = "none"  # type: ignore[valid-type]
    aug_mult: int = Field(1, ge=1)
    reference_lr: Annotated[float, Float32] = Field(
        0.4, gt=0, description="lr of ε = ∞ trained with this schedule (same batch, epochs, views; no clipping)"
    )

    @model_validator(mode="after")
    def _views(self) -> ScheduleConfig:
        if self.aug_mult > 1 and self.augment == "none":
            raise ValueError(f"aug_mult = {self.aug_mult} averages augmented views: set augment (e.g. flip-shift)")
        return self

    def recipe(self) -> dict[str, Any]:
        """The train keys of the DP runs of this schedule (and of its clip-only reference)."""
        return self.model_dump(exclude={"max_epsilon", "reference_lr"})

    def reference(self) -> dict[str, Any]:
        """The train keys of ε = ∞ trained with this schedule: the same steps and views, its own lr."""
        keys = self.model_dump(include={"epochs", "batch_size", "momentum", "ema", "augment", "aug_mult"})
        return {**keys, "lr": self.reference_lr}

    def examples(self) -> int:
        """Epochs of examples processed (views count): the compute the budget limits."""
        return self.epochs * self.aug_mult


class ClipSweepConfig(Section):
    """The paper's Figure 6b: Gaussian runs at one ε with other clipping bounds C."""

    epsilon: Epsilon = 1
    clips: Annotated[list[Epsilon], Distinct] = Field(default_factory=lambda: [0.1, 10])
    hold_step: bool = Field(
        True,
        description="also train each C with lr·C held at the main run's (DP-SGD's step scales with lr·C); claim (f) "
        "is decided on these",
    )


class TrainSizesConfig(Section):
    """DP needs data: the same runs on the first N training images of each size."""

    sizes: Annotated[list[Annotated[int, Field(ge=10)]], Distinct] = Field(default_factory=lambda: [1000])
    gaussian: Annotated[list[Epsilon], Distinct] = Field(default_factory=lambda: [1, 10])
    none: bool = True
    epochs: int | None = Field(
        269,
        ge=1,
        description="epochs of every train-size run (null: its recipe's); the default processes the "
        "examples of grid.budget's 32 epochs of 8400 images on 1000, the audit's setting",
    )


class FinetuneNonPrivateConfig(Section):
    """The recipe of ``finetune-none``: the non-private fine-tune (no clipping), the fine-tuned ε = ∞ reference."""

    lr: float = Field(0.3, gt=0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(8, ge=1)


class FinetuneConfig(Section):
    """Public pretraining, private fine-tuning: the families ``finetune-<scheme>`` (recipe: docs/recipes.md).

    Each trains ``trainable`` (the classifier head or the last block) on the private data, starting from a trunk
    trained without privacy on public data: the ``public`` family's run (``dpcam prepare --public``'s set), or
    ``weights`` (local pretrained weights, e.g. on real data). The accountant covers the fine-tuning only.
    Every run is at the ε of ``grid.laplace``, so Table 2 sets Laplace and Gaussian fine-tuned beside the
    paper's replica at the same ε.
    """

    schemes: list[Literal[names.FINETUNE_SCHEMES]] = Field(  # type: ignore[valid-type]
        default_factory=list,
        description="fine-tuning families to run (finetune-<scheme>); [] = none, and no public pretraining",
    )
    weights: Path | None = Field(
        None, description="local trunk weights (a state dict); null = the public family's trunk"
    )
    trainable: Literal["head", "last-block"] = "head"
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(512, ge=1, description="expected batch size (Poisson sampling)")
    lr: float = Field(8.0, gt=0, description="finetune-gaussian's learning rate")
    clip: float = Field(1.0, gt=0, description="finetune-gaussian's L2 clipping bound")
    laplace_lr: float = Field(0.5, gt=0, description="finetune-laplace's learning rate")
    laplace_clip: float = Field(5.0, gt=0, description="finetune-laplace's L1 clipping bound")
    nonprivate: FinetuneNonPrivateConfig = FinetuneNonPrivateConfig()

    @field_validator("schemes")
    @classmethod
    def _distinct(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("schemes repeat; list each once")
        return v


class GridConfig(Section):
    """The runs `dvc repro` trains and `dpcam report` tabulates (families: dpcam.families)."""

    name: str = Field("quick", pattern=DATASET_NAME, description="grid tag of the MLflow runs")
    # a family is dropped by emptying its own list (gaussian: []); models and seeds are what every family needs
    models: Annotated[
        list[ModelName], AfterValidator(_needed("give at least one model: every family trains each")), Distinct
    ] = Field(default_factory=lambda: ["smallcnn"])
    seeds: Annotated[
        list[int],
        AfterValidator(
            _needed(
                "give at least one seed: the families without grid.family_seeds run on them (to drop a family, "
                "empty its own list instead, e.g. grid.gaussian: [])"
            )
        ),
        Distinct,
    ] = Field(default_factory=lambda: [0, 1, 2])
    gaussian: Annotated[list[Epsilon], Distinct] = Field(default_factory=lambda: [0.5, 1, 5, 10])
    laplace: Annotated[list[Epsilon], Distinct] = Field(default_factory=list)
    laplace_clip: float = Field(100, gt=0, description="L1 clipping bound of the laplace runs")
    laplace_lr: float = Field(0.75, gt=0)
    baselines: Annotated[list[Literal["none", "clip-only"]], Distinct] = Field(
        default_factory=lambda: ["none", "clip-only"]
    )
    ldp: Annotated[list[Annotated[str, Field(pattern=DATASET_NAME)]], Distinct] = Field(
        default_factory=list,
        description="local-DP derivatives to train on, e.g. singh-sikka-eps0.5",
    )
    clip_sweep: ClipSweepConfig = ClipSweepConfig()
    train_sizes: TrainSizesConfig = TrainSizesConfig()
    nonprivate: NonPrivateConfig = NonPrivateConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    executor: Literal["serial", "local", "ray"] = Field(
        "local",
        description="how a family's runs are run: one after another, in `workers` local processes, or as Ray tasks",
    )
    workers: int = Field(2, ge=1, description="processes of the local executor (1 thread each on 2 cores)")
    cpus_per_run: float = Field(
        1.0, gt=0, description="torch threads of each run, whatever the executor (ray: the CPUs each run asks for)"
    )
    gpus_per_run: float = Field(
        0.0, ge=0, description="ray: GPUs each run asks for; a fraction (0.25) lets several runs share one GPU"
    )
    protocol: Literal["tuned", "same"] = Field(
        "tuned", description="tuned: non-private runs take grid.nonprivate's recipe; same: every ε the train section's"
    )
    family_seeds: dict[str, list[int]] = Field(
        default_factory=lambda: {f: [0] for f in names.FAMILIES if f not in names.HEADLINE_FAMILIES},
        description="seeds of a family other than grid.seeds (e.g. fewer for the non-headline ones)",
    )
    schedules: dict[str, ScheduleConfig] = Field(
        default_factory=lambda: {
            "short": ScheduleConfig(max_epsilon=1, epochs=16, lr=1.0, reference_lr=0.2),
            "long": ScheduleConfig(epochs=32, lr=1.0, augment="flip-shift", reference_lr=0.4),
        },
        description="budget-fair DP recipes per band of Gaussian ε (docs/recipes.md), each with its non-private and "
        "clip-only references; null = every ε trains with the train section's recipe",
    )
    budget: int = Field(
        32, ge=1, description="the most epochs of examples (views count) any recipe of the grid may process"
    )
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per family, train keys its runs change (e.g. gaussian: {grad_sample_mode: ghost}); "
        "applied after the family's own recipe",
    )

    @field_validator("schedules", mode="before")
    @classmethod
    def _no_schedules(cls, v: Any) -> Any:
        return {} if v is None else v  # null clears the mapping (an empty one would merge under `dvc exp run -S`)

    @field_validator("family_seeds")
    @classmethod
    def _family_seeds(cls, v: dict[str, list[int]]) -> dict[str, list[int]]:
        for family, seeds in v.items():
            if family not in names.FAMILIES:
                raise ValueError(f"unknown family {family!r}; families: {', '.join(names.FAMILIES)}")
            if not seeds or len(set(seeds)) != len(seeds):
                raise ValueError(f"{family}: give one or more distinct seeds")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        fixed = {*names.RUN_KEYS, "dataset", "public", "trainable", "weights"}  # what a run is and starts from
        for family, keys in v.items():
            if family not in names.FAMILIES:
                raise ValueError(f"unknown family {family!r}; families: {', '.join(names.FAMILIES)}")
            for key in keys:
                if key not in TrainConfig.model_fields or key in fixed:
                    raise ValueError(
                        f"{family}: {key!r} is not a train key a family can override; "
                        f"e.g. grad_sample_mode, batch_size, lr, optimizer, epochs, clip"
                    )
            for key, value in keys.items():  # each value as the train section would take it (finite, in range)
                try:
                    setattr(TrainConfig(), key, value)
                except ValidationError as e:
                    msg = e.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
                    raise ValueError(f"{family}.{key} = {value!r}: {msg}") from None
        return v

    def seeds_of(self, family: str) -> list[int]:
        """The seeds a family's runs are trained with."""
        return self.family_seeds.get(family, self.seeds)

    def run_options(self) -> dict[str, Any]:
        """How a stage runs a family's runs: :func:`dpcam.executor.run_jobs`'s keyword arguments."""
        return self.model_dump(include={"executor", "workers", "cpus_per_run", "gpus_per_run"})

    @model_validator(mode="after")
    def _schedules(self) -> GridConfig:
        bounds: dict[float | None, str] = {}
        for name, s in self.schedules.items():
            if not re.fullmatch(r"[a-z0-9]+", name):
                raise ValueError(f"schedules.{name}: a schedule's name is lowercase letters and digits (it names runs)")
            if s.max_epsilon in bounds:
                bound = "no bound" if s.max_epsilon is None else f"max_epsilon {format_eps(s.max_epsilon)}"
                raise ValueError(f"schedules: {bounds[s.max_epsilon]} and {name} both have {bound}; give each its own")
            bounds[s.max_epsilon] = name
            if s.examples() > self.budget:
                raise ValueError(
                    f"schedules.{name}: {s.epochs} epochs × {s.aug_mult} views = {s.examples()} epochs of examples, "
                    f"more than the budget of {self.budget}; shorten it or raise grid.budget"
                )
        missing = [format_eps(e) for e in self.gaussian if self.schedules and self.schedule_of(e) is None]
        if missing:
            raise ValueError(
                f"schedules: no schedule's band holds Gaussian ε {', '.join(missing)}; raise a max_epsilon or add "
                "a schedule with max_epsilon: null"
            )
        if self.nonprivate.epochs > self.budget:
            raise ValueError(f"nonprivate.epochs = {self.nonprivate.epochs} is more than the budget of {self.budget}")
        return self

    def schedule_of(self, epsilon: float | None) -> str | None:
        """The name of the schedule whose band holds Gaussian ``epsilon`` (None: the train section's recipe)."""
        if epsilon is None:
            return None
        bands = sorted(
            self.schedules.items(), key=lambda kv: math.inf if kv[1].max_epsilon is None else kv[1].max_epsilon
        )
        return next((n for n, s in bands if s.max_epsilon is None or epsilon <= s.max_epsilon), None)

    def active_schedules(self) -> list[str]:
        """The schedules that train some ε of grid.gaussian (the others train nothing and need no references)."""
        used = {self.schedule_of(e) for e in self.gaussian}
        return [n for n in self.schedules if n in used]

    @model_validator(mode="after")
    def _gpus_need_ray(self) -> GridConfig:
        if self.gpus_per_run > 0 and self.executor != "ray":
            raise ValueError(
                f"gpus_per_run = {self.gpus_per_run:g} applies to executor: ray only (executor is {self.executor!r}); "
                "set executor: ray, or gpus_per_run: 0"
            )
        return self


# ------------------------------------------------------------------------------------- audit


def _known_attacks(v: list[str]) -> list[str]:
    if not v:
        raise ValueError(f"give at least one attack; known: {', '.join(names.ATTACKS)}")
    unknown = [a for a in v if a not in names.ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; known: {', '.join(names.ATTACKS)}")
    if len(set(v)) != len(v):
        raise ValueError("attacks repeat; list each once")
    return v


class AuditConfig(Section):
    """The ``audit`` section: membership-inference audit of a trained run."""

    max_per_group: int = Field(
        1000, ge=10, description="members and non-members sampled, each (≤ train and test split sizes)"
    )
    attacks: Annotated[list[str], AfterValidator(_known_attacks)] = Field(default_factory=lambda: list(names.ATTACKS))
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="joint Clopper-Pearson level of the ε bound and the check"
    )
    pld_curve: bool = Field(
        True, description="check DP runs against their PLD trade-off curve, not only the (ε, δ) line"
    )
    layer: str | None = Field(
        None, description="Grad-CAM layer (dotted module name); None = the model's registered layer"
    )
    batch_size: int = Field(128, ge=1)
    seed: int = Field(0, description="seed of the member / non-member samples and their halves")
    device: Literal[names.DEVICES] = "auto"  # type: ignore[valid-type]


# ------------------------------------------------------------------------------------- search


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
        if kind == "log":
            _float32(high)
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


def _search_models(v: list | None) -> list | None:
    if v is None:
        return v
    _search_choices(v)
    unknown = [m for m in v if m not in names.MODELS]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; known: {', '.join(sorted(names.MODELS))}")
    return v


def _search_objective(name: str) -> str:
    if name not in names.OBJECTIVES:
        raise ValueError(f"unknown objective metric; known: {', '.join(names.OBJECTIVES)}")
    return name


LogRange = Annotated[list[float], AfterValidator(_search_range("log"))]
IntRange = Annotated[list[int], AfterValidator(_search_range("int"))]


class SearchConfig(Section):
    """``dpcam search``: Optuna multi-objective search (ε ↓, validation accuracy ↑, explanation quality ↑).

    Trials start from the ``train`` section and override what is searched; explanations are scored
    as the ``explain`` section says (method, target, steps, tolerance) on validation images. Ranges
    are ``[low, high]`` (``low == high`` fixes the value); float ranges are searched on a log scale.
    """

    objective: Annotated[str, AfterValidator(_search_objective)] = "masked_score_pct"
    sampler: Literal[names.SEARCH_SAMPLERS] = "nsga2"  # type: ignore[valid-type]
    seed: int = 0
    trials: int = Field(30, ge=0, description="trials this process runs (the mean number for a random count)")
    trials_distribution: Literal["fixed", "poisson", "geometric"] = Field(
        "fixed", description="random number of trials (sampler random only) for the Papernot-Steinke bound"
    )
    max_trials: int | None = Field(None, ge=1, description="stop once the study has this many finished trials")
    timeout: float | None = Field(None, gt=0, description="seconds; stop starting new trials after this")
    storage: str = Field("sqlite:///mlruns/optuna.db", min_length=1, description="any SQLAlchemy URL")
    study_name: str | None = Field(None, pattern=DATASET_NAME, description="default dpcam-<dataset>")
    population: int = Field(8, ge=2, description="NSGA-II generation size; TPE's random start-up trials")
    schemes: Annotated[list[Literal["gaussian", "laplace"]], AfterValidator(_search_choices)] = Field(
        default_factory=lambda: ["gaussian", "laplace"]
    )
    models: Annotated[list[str] | None, AfterValidator(_search_models)] = Field(
        None, description="models to search over (null = train.model)"
    )
    epsilon: LogRange = Field(default_factory=lambda: [0.5, 10], description="target ε")
    clip: LogRange = Field(default_factory=lambda: [0.1, 10], description="L2 clipping bound C (gaussian)")
    lr: LogRange = Field(default_factory=lambda: [0.1, 3], description="learning rate (gaussian)")
    laplace_clip: LogRange = Field(default_factory=lambda: [10, 1000], description="L1 clipping bound C (laplace)")
    laplace_lr: LogRange = Field(default_factory=lambda: [0.05, 2], description="learning rate (laplace)")
    epochs: IntRange = Field(default_factory=lambda: [2, 6])
    batch_size: Annotated[list[Annotated[int, Field(ge=1)]], AfterValidator(_search_choices)] = Field(
        default_factory=lambda: [128, 256, 512], description="expected batch sizes (choices)"
    )
    explain_images: int = Field(256, ge=1, description="validation images scored per trial")
    heartbeat: int = Field(30, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int | None = Field(
        None, ge=1, description="a trial silent this long is failed (default 2 x heartbeat)"
    )
    max_retry: int = Field(2, ge=0, description="retries of a trial whose worker died")
    out: Path = Field(SEARCH_REPORT, description="folder of the front table and plots")

    @model_validator(mode="after")
    def _random_count(self) -> SearchConfig:
        if self.trials_distribution != "fixed" and self.sampler != "random":
            raise ValueError(
                f"trials_distribution = {self.trials_distribution!r} needs sampler 'random' "
                f"(the Papernot-Steinke bound is for random search), not {self.sampler!r}"
            )
        if self.trials_distribution != "fixed" and self.trials < 1:
            raise ValueError(f"trials = {self.trials}: a {self.trials_distribution} number of trials needs a mean >= 1")
        return self


# ------------------------------------------------------------------------------------- verdict

# the largest acceptable loss of each verdict measure (non-inferiority margins; docs/verdict.md, "Margins"): the
# mean absolute difference between two non-private (ε = ∞) models of different seeds on the built-in data (the
# three ε = ∞ runs of a fresh-clone study of commit 2bd02b5, 2026-12-07, scripts/margins.py), rounded up to two
# significant figures; a private model that loses less than another non-private seed would is not called worse
MARGINS: dict[str, float] = {
    "test_accuracy": 0.073,
    "avg_drop_pct": 7.2,
    "increase_conf_pct": 3.0,
    "masked_score_pct": 7.8,
    "masked_accuracy_pct": 8.7,
    "deletion_auc": 0.072,
    "insertion_auc": 0.047,
    "pointing_game": 0.021,
    "energy_pointing_game": 0.0082,
    "road_gap": 0.043,
    "randomisation_agreement": 0.045,
}


class VerdictConfig(Section):
    """How `dpcam report` turns paired differences into words (docs/verdict.md); fixed before the study."""

    marks: Literal["bh", "holm"] = Field(
        "bh",
        description="the correction behind the tables' ▲/▼ over all cells of one table: bh (Benjamini–Hochberg, "
        "false-discovery rate 5 %) or holm (family-wise error 5 %)",
    )
    margins: dict[str, float] = Field(
        default_factory=lambda: dict(MARGINS),
        description="largest acceptable loss per measure (non-inferiority), in the measure's own units",
    )

    @field_validator("margins")
    @classmethod
    def _margins(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in v if k not in MARGINS]
        if unknown:
            raise ValueError(f"unknown measure {unknown[0]!r}; measures: {', '.join(MARGINS)}")
        bad = [k for k, x in v.items() if not (isinstance(x, (int, float)) and math.isfinite(x) and x > 0)]
        if bad:
            raise ValueError(f"{bad[0]} = {v[bad[0]]!r}: a margin is a finite number > 0")
        return {**MARGINS, **{k: float(x) for k, x in v.items()}}  # a measure left out keeps its default


SECTIONS: dict[str, type[Section]] = {
    "prepare": PrepareConfig,
    "ldp": LdpConfig,
    "train": TrainConfig,
    "explain": ExplainConfig,
    "grid": GridConfig,
    "audit": AuditConfig,
    "search": SearchConfig,
    "verdict": VerdictConfig,
}

__all__ = [
    "DATASET_NAME",
    "SECTIONS",
    "AuditConfig",
    "ClipSweepConfig",
    "DpPixConfig",
    "Epsilon",
    "ExplainConfig",
    "FinetuneConfig",
    "FinetuneNonPrivateConfig",
    "GridConfig",
    "LdpConfig",
    "NonPrivateConfig",
    "PrepareConfig",
    "PublicConfig",
    "SearchConfig",
    "Section",
    "ScheduleConfig",
    "SplitConfig",
    "SyntheticConfig",
    "TrainConfig",
    "TrainSizesConfig",
    "VerdictConfig",
    "format_eps",
]
