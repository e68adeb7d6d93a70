"""Typed stage records: what train, explain and audit write (train.json, explain.json, audit.json).

The stages build these models and write them; report, CLI and search read them back by attribute,
so renaming a key is a validation error at the writer and an attribute error at every reader, not a
blank table cell. Every record carries ``schema`` (its format version). A file written before the
version field existed loads as version 1; a file that does not validate is refused with one line
naming it and how to make it again.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer

from dpcam import guard
from dpcam.errors import UserError
from dpcam.layout import write_json

SCHEMA = 1  # the record format this dpcam writes


def _finite(v: Any) -> Any:
    """∞ and NaN become None (JSON null) at any depth."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


class Part(BaseModel):
    """A record or a part of one. Attribute access is the typed way to read it; ``r["key"]``,
    ``"key" in r`` and ``r.get`` read its JSON form (what the file holds), for code written against dicts.

    ``_omit_if_none``: fields left out of the JSON when None (a metric that was skipped), as the
    stages always wrote them.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())
    _omit_if_none: tuple[str, ...] = ()

    @model_serializer(mode="wrap")
    def _serialize(self, handler, info):
        d = handler(self)
        for key in self._omit_if_none:
            field = type(self).model_fields[key]
            name = field.alias if (info.by_alias and field.alias) else key
            if d.get(name) is None:
                d.pop(name, None)
        return _finite(d) if info.mode == "json" else d

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def __getitem__(self, key: str) -> Any:
        return self.to_json()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_json()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_json().get(key, default)

    def keys(self):
        return self.to_json().keys()

    def __iter__(self):  # a mapping iterates its keys (pydantic's own (name, value) pairs: model_dump)
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())

    def items(self):
        return self.to_json().items()


class Record(Part):
    """A stage record: a ``schema`` version, written atomically as JSON."""

    schema_version: int = Field(SCHEMA, alias="schema")

    def write(self, path: Path) -> Path:
        """Write the record atomically as JSON."""
        return write_json(path, self.to_json())

    def value(self, key: str) -> float | None:
        """Field ``key`` as a finite float (None when null, NaN or not a number); KeyError for a field it has not."""
        if key not in type(self).model_fields:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        v = getattr(self, key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)


R = TypeVar("R", bound=Record)


def read(cls: type[R], path: Path, what: str = "") -> R:
    """Load a record; a missing, unreadable or invalid file is a one-line UserError naming it."""
    who = f"{what}: " if what else ""
    hint = "run its stage again (`dvc repro`, or the dpcam command that writes it)"
    data = guard.read_json(path, fix=hint, who=who)
    version = data.get("schema", 1)
    if version != SCHEMA:
        raise UserError(f"{who}{path} has record schema {version!r}, this dpcam reads {SCHEMA}; {hint}")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        key = ".".join(str(p) for p in err["loc"])
        raise UserError(f"{who}{path} is not a {cls.__name__} (key {key}: {err['msg']}); {hint}") from None


# ------------------------------------------------------------------------------------ train.json


CALIBRATION_BINS = 15  # equal-width confidence bins of train.json's test_ece (Guo et al. 2017)


def calibration_features(prob: np.ndarray, label: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Per image, in its equal-width confidence bin: (1, confidence, hit) — images × (bins·3). Summed over images
    they give :func:`calibration_error` and the reliability diagram (per bin: count, Σ confidence, Σ hits)."""
    conf = prob.max(1)
    hit = (prob.argmax(1) == label).astype(float)
    at = np.minimum((conf * bins).astype(int), bins - 1)
    out = np.zeros((len(conf), bins, 3))
    out[np.arange(len(conf)), at] = np.stack([np.ones_like(conf), conf, hit], 1)
    return out.reshape(len(conf), bins * 3)


def calibration_error(sums: np.ndarray, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """Expected calibration error from summed :func:`calibration_features` ``(..., bins·3)``: Σ_bins |Σ confidence −
    Σ hits| / images."""
    c = sums.reshape(*sums.shape[:-1], bins, 3)
    return np.abs(c[..., 1] - c[..., 2]).sum(-1) / np.maximum(c[..., 0].sum(-1), 1e-12)


class TrainRecord(Record):
    """One training run: its data, scheme and privacy accounting, its training and test metrics."""

    _omit_if_none = (
        "run_name",
        "profile",
        "poisson_rate",
        "grad_sample_mode",
        "mlflow_run_id",
        "mlflow_model_uri",
        "data_dir",
        "guarantee",
        "guarantee_reason",
        "noise_scale",
        "nominal_epsilon",
        "nominal_delta",
        "nominal_accountant",
        "epsilon_l1_bound",
        "trainable",
        "trained_parameter_count",
        "trained_parameters",
        "weights",
        "weights_sha256",
        "weights_loaded",
        "group_size",
        "group_epsilon",
        "group_delta",
        "public_data",
        "data_fingerprint",
    )

    run_name: str | None = None
    profile: str | None = None
    dataset: str
    data_dir: str | None = None  # the folder trained on (data/prepared/<dataset>-public for the public trunk)
    # what that folder held (data.store.fingerprint): explain and audit refuse other data (data.store.data_change)
    data_fingerprint: dict[str, Any] | None = None
    ldp: str | None = None
    ldp_guarantee: dict[str, Any] | None = None
    model: str
    scheme: str
    # privacy (privacy.accounting.PrivacyReport; docs/privacy.md)
    target_epsilon: float | None = None
    epsilon: float | None = None  # achieved, at delta; None = ∞ (not private)
    delta: float | None = None
    noise_multiplier: float | None = None
    max_grad_norm: float | None = None
    sample_rate: float | None = None
    steps: int
    accountant: str | None = None
    epsilon_rdp_check: float | None = None
    epsilon_composition_bound: float | None = None
    step_epsilon: float | None = None
    step_epsilon_amplified: float | None = None
    steps_planned: int | None = None
    poisson_rate: float | None = None
    grad_sample_mode: str | None = None
    precision: str = "fp32"  # fp32 | bf16: the dtype of the steps' activations (clipping and noise: float32)
    ema: float | None = None  # decay of the moving average of the weights that was released (None: last iterate)
    augment: str = "none"  # training-time augmentation
    aug_mult: int = 1  # augmented views per example, averaged before clipping
    # "dp" (gaussian, laplace: ε by the accountant) or "none" (laplace-paper: noise without a guarantee, so
    # epsilon, target_epsilon and delta are null; the ε its σ was calibrated from is nominal_epsilon)
    guarantee: str | None = None
    guarantee_reason: str | None = None
    noise_scale: float | None = None  # per coordinate: Gaussian std σC, Laplace scale λC (laplace-paper: σC)
    nominal_epsilon: float | None = None
    nominal_delta: float | None = None
    nominal_accountant: str | None = None
    epsilon_l1_bound: float | None = None  # laplace-paper: the valid ε for L1 sensitivity C·√d
    # what was trained (a DP run's private parameters) and what it started from
    trainable: str | None = None  # all | head | last-block
    trained_parameter_count: int | None = None  # d; in a DP run the private parameters, clipped and noised
    trained_parameters: list[str] | None = None  # their names, when not all of the model's
    weights: str | None = None  # the pretrained weights (trunk) the run started from
    weights_sha256: str | None = None
    # the privacy unit: "image", or "group" (a patient, prepare.groups) with the per-image guarantee converted by
    # group privacy for at most group_size images: (k·ε, k·e^((k−1)ε)·δ)
    privacy_unit: str = "image"
    group_size: int | None = None
    group_epsilon: float | None = None
    group_delta: float | None = None
    weights_loaded: str | None = None  # the file's account: its tensors, how many used, what became of the others
    public_data: dict[str, Any] | None = None  # the public data the model learnt from without privacy
    # training
    epochs: int
    train_size: int
    best_epoch: int
    val_accuracy: float
    test_accuracy: float
    test_macro_f1: float
    test_qwk: float
    test_pred_histogram: list[int]
    test_majority_share: float
    test_recall: list[float | None] | None = None  # per class: the share of its test images predicted as it
    test_ece: float | None = None  # expected calibration error (15 equal-width confidence bins)
    test_confidence: float | None = None  # mean probability of the predicted class
    train_seconds: float
    device: str
    collapsed: bool
    val_curve: list[float] = Field(default_factory=list)  # validation accuracy after each epoch
    undertrained: bool | None = None  # validation accuracy still rising at the end (train.undertrained)
    versions: dict[str, str] = Field(default_factory=dict)  # torch, opacus, ... the run was trained with
    # tracking
    mlflow_run_id: str | None = None
    mlflow_model_uri: str | None = None


# ------------------------------------------------------------------------------------ explain.json


class Degeneracy(Part):
    """The degenerate-model check (explain.degeneracy.DegeneracyStats; docs/metrics.md)."""

    n: int
    accuracy: float
    chance: float
    majority_class: int
    majority_share: float
    pred_entropy: float
    pred_histogram: list[int]
    input_sensitivity: float
    degenerate: bool
    reasons: list[str]


class ExplainRecord(Record):
    """One run's explanations scored on its test images: metric means, the degeneracy check beside them."""

    _omit_if_none = (
        "avg_drop_pct",
        "increase_conf_pct",
        "masked_score_pct",
        "masked_accuracy_pct",
        "confidence_y",
        "mask_sensitivity_pct",
        "avg_drop_random_pct",
        "increase_conf_random_pct",
        "masked_score_random_pct",
        "deletion_auc",
        "insertion_auc",
        "road_morf_auc",
        "road_lerf_auc",
        "road_gap",
        "pointing_game",
        "pointing_game_random",
        "energy_pointing_game",
        "map_agreement",
        "randomisation_agreement",
        "reference_run",
        "data_change",
        "methods",
    )

    run_name: str
    dataset: str
    data_dir: str
    data_change: str | None = None  # scored on other data than it was trained on (--allow-data-change)
    method: str
    target: str
    images: int
    reference_run: str | None = None  # the run map agreement compared with
    # the headline method's record: every explain.methods entry scored with it (None: this method alone)
    methods: list[str] | None = None
    avg_drop_pct: float | None = None
    increase_conf_pct: float | None = None
    masked_score_pct: float | None = None
    masked_accuracy_pct: float | None = None
    confidence_y: float | None = None  # mean p(c | x): the confidence the paper's metrics start from
    mask_sensitivity_pct: float | None = None  # Average Drop of a constant map of the map's mass
    avg_drop_random_pct: float | None = None  # the paper's metrics of the map's pixels in random order
    increase_conf_random_pct: float | None = None
    masked_score_random_pct: float | None = None
    deletion_auc: float | None = None
    insertion_auc: float | None = None
    road_morf_auc: float | None = None  # ROAD (Rong et al. 2022): most relevant first, lower is better
    road_lerf_auc: float | None = None  # least relevant first, higher is better
    road_gap: float | None = None  # LeRF − MoRF, higher is better
    pointing_game: float | None = None
    pointing_game_random: float | None = None  # the pointing game of a random map: the chance level
    energy_pointing_game: float | None = None
    map_agreement: float | None = None
    randomisation_agreement: float | None = None
    degeneracy: Degeneracy
    notes: list[str] = Field(default_factory=list)
    degenerate: bool
    accuracy: float


# ------------------------------------------------------------------------------------ audit.json


class AuditPrivacy(Part):
    """The guarantee train.json records: ε at δ for add-or-remove-one neighbours (``relation``)."""

    scheme: str | None
    epsilon: float | None
    delta: float
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    accountant: str | None = None
    relation: str = "add-or-remove-one"  # the relation train.json's ε is stated for (Opacus, dp_accounting)


class AttackMetrics(Part):
    """One attack's metrics on the evaluation half (audit module docstring)."""

    auc: float
    balanced_accuracy: float
    balanced_accuracy_oracle: float
    tpr_at_fpr_0_01: float = Field(alias="tpr_at_fpr_0.01")
    tpr_at_fpr_0_001: float = Field(alias="tpr_at_fpr_0.001")
    epsilon_lb: float
    threshold: float | None
    tp: int
    fp: int
    tpr: float
    fpr: float
    tpr_lo: float
    fpr_hi: float
    member_when: str | None = None


class CheckRow(Part):
    """One attack's checked point against the bounds of ``AuditCheck.relation`` (audit module docstring)."""

    _omit_if_none = ("allowed_tpr_add_remove",)

    allowed_tpr_line: float  # the (ε, δ) line of the checked relation
    within_line: bool
    allowed_tpr_pld: float | None  # the trade-off curve of the checked relation
    within_pld: bool | None
    violation: bool
    allowed_tpr_add_remove: float | None = None  # what the add/remove curve would allow: for comparison only


class AuditCheck(Part):
    """The check of every attack against the run's guarantee, for the neighbouring relation of the experiment."""

    _omit_if_none = (
        "pld_epsilon_at_delta",
        "violations",
        "reason",
        "relation",
        "relation_reason",
        "epsilon_replace_one",
        "delta_replace_one",
        "curve",
        "lines",
    )

    done: bool
    bound: str | None
    per_attack: dict[str, CheckRow]
    confidence: float
    pld_epsilon_at_delta: float | None = None  # the add/remove PLD's ε at δ, beside train.json's ε
    violations: list[str] | None = None
    reason: str | None = None
    relation: str | None = None  # the neighbouring relation the bounds are for: "replace-one"
    relation_reason: str | None = None
    epsilon_replace_one: float | None = None  # the ε of the checked (ε, δ) line
    delta_replace_one: float | None = None  # its δ (the run's δ; (1 + e^ε)·δ under plain group privacy)
    curve: str | None = None  # how the checked trade-off curve (or line) was obtained
    lines: list[list[float]] | None = None  # every replace-one (ε, δ) pair of the checked line


class AuditRecord(Record):
    """One run's membership-inference audit and its check against the run's guarantee."""

    _omit_if_none = (
        "mia_auc_loss",
        "mia_auc_loss_calibrated",
        "mia_auc_gradcam_variance",
        "mia_auc_gradcam_entropy",
        "mia_auc_input_gradient",
        "mia_epsilon_lb_loss",
        "mia_epsilon_lb_loss_calibrated",
        "mia_epsilon_lb_gradcam_variance",
        "mia_epsilon_lb_gradcam_entropy",
        "mia_epsilon_lb_input_gradient",
        "data_change",
    )

    run_name: str
    dataset: str
    data_dir: str
    data_change: str | None = None  # audited on other data than it was trained on (--allow-data-change)
    privacy: AuditPrivacy
    members: int
    non_members: int
    selection_members: int
    selection_non_members: int
    evaluation_members: int
    evaluation_non_members: int
    fpr_resolution: float
    member_accuracy: float
    non_member_accuracy: float
    member_loss: float
    non_member_loss: float
    seed: int
    confidence: float
    per_attack_confidence: float
    explained_class: str
    attacks: dict[str, AttackMetrics]
    mia_auc: float
    mia_auc_loss: float | None = None
    mia_auc_loss_calibrated: float | None = None
    mia_auc_gradcam_variance: float | None = None
    mia_auc_gradcam_entropy: float | None = None
    mia_auc_input_gradient: float | None = None
    mia_epsilon_lb: float
    mia_epsilon_lb_loss: float | None = None
    mia_epsilon_lb_loss_calibrated: float | None = None
    mia_epsilon_lb_gradcam_variance: float | None = None
    mia_epsilon_lb_gradcam_entropy: float | None = None
    mia_epsilon_lb_input_gradient: float | None = None
    epsilon_lb_max_detectable: float
    check: AuditCheck
    violation: bool
    notes: list[str] = Field(default_factory=list)
