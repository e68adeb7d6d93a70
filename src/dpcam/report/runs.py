"""The report's inputs: every grid run with its typed stage records (train, explain, audit)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from dpcam import guard, layout, records
from dpcam.config import GridConfig
from dpcam.errors import UserError
from dpcam.families import RunSpec, grid_runs
from dpcam.layout import AUDIT_JSON, EXPLAIN_JSON, TRAIN_JSON
from dpcam.records import AuditRecord, ExplainRecord, Record, TrainRecord

# the Grad-CAM maps of a run (metrics/<family>/<run>/): the CAM figures read them
MAP_FILES = (layout.MAPS, layout.MAP_INDICES)
# where Run.value looks a key up, first record class that has the field wins
LOOKUP: tuple[tuple[str, type[Record]], ...] = (
    ("explain", ExplainRecord),
    ("audit", AuditRecord),
    ("train", TrainRecord),
)


@dataclass(frozen=True)
class Run:
    """One grid run with its stage records: ``train`` (train.json), ``explain`` (explain.json) and
    ``audit`` (audit.json; None when the run has not been audited)."""

    spec: RunSpec
    train: TrainRecord
    explain: ExplainRecord
    audit: AuditRecord | None = None
    folder: Path | None = None  # where ``per_image`` is read (None: the run's metrics folder)
    per_image_file: str = layout.PER_IMAGE

    @property
    def methods(self) -> list[str]:
        """The explanation methods this run was scored with, the headline one first."""
        return self.explain.methods or [self.explain.method]

    def of_method(self, method: str) -> Run:
        """This run as scored by another explanation method (its explain record and per-image values); UserError
        naming the file when that method's files are missing."""
        if method == self.explain.method:
            return self
        folder = layout.method_dir(self.spec.metrics_dir, method, self.explain.method)
        explain = records.read(ExplainRecord, folder / EXPLAIN_JSON, f"grid run {self.spec.name} ({method})")
        return replace(self, explain=explain, folder=folder)

    def method_agreement(self) -> Run:
        """This run whose per-image values are the agreement of its methods' maps (keys ``<a>|<b>``)."""
        return replace(self, folder=self.spec.metrics_dir / layout.METHODS_DIR, per_image_file=layout.METHOD_AGREEMENT)

    def value(self, key: str) -> float | None:
        """Field ``key`` of the explain record, else the audit record, else the train record, as a finite
        float (None when null, NaN, not a number, or an audit field of a run not audited).

        KeyError when no record class has the field (a misspelled table row is an error, not a blank).
        """
        for attr, cls in LOOKUP:
            if key in cls.model_fields:
                record = getattr(self, attr)
                return None if record is None else record.value(key)
        raise KeyError(f"no stage record ({', '.join(c.__name__ for _, c in LOOKUP)}) has a field {key!r}")

    @property
    def degenerate(self) -> bool:
        return bool(self.explain.degenerate or self.train.collapsed)

    @property
    def undertrained(self) -> bool:
        return bool(self.train.undertrained)

    @cached_property
    def per_image(self) -> dict[str, np.ndarray]:
        """Per-image explanation values (``index``: dataset indices; a metric: float, NaN where not valid)."""
        return _npz((self.folder or self.spec.metrics_dir) / self.per_image_file, self.spec.name)

    @cached_property
    def predictions(self) -> dict[str, np.ndarray]:
        """Test-set predictions: ``index`` (dataset indices), ``pred``, ``label``."""
        return _npz(self.spec.model_dir / layout.PREDICTIONS, self.spec.name)


def _npz(path, name: str) -> dict[str, np.ndarray]:
    """A run's per-image arrays, read through :mod:`dpcam.guard`: one line naming the file when it is missing,
    truncated or has arrays of different lengths."""
    fix = "run `dvc repro` (or dpcam train/explain for it) again"
    data = guard.read_npz(path, fix=fix, who=f"grid run {name}: ", keys=("index",))
    n = np.shape(data["index"])[:1]
    odd = sorted(k for k, v in data.items() if np.shape(v)[:1] != n)
    if odd:
        raise guard.problem(
            path, f"has arrays of another length than its {n[0]} images ({', '.join(odd)})", fix, f"grid run {name}: "
        )
    return data


def load_run(spec: RunSpec) -> Run:
    """One grid run's records; UserError naming the first missing or invalid file (audit.json is optional)."""
    who = f"grid run {spec.name}"
    train = records.read(TrainRecord, spec.model_dir / TRAIN_JSON, who)
    explain = records.read(ExplainRecord, spec.metrics_dir / EXPLAIN_JSON, who)
    for name in MAP_FILES:
        if not (spec.metrics_dir / name).is_file():
            raise UserError(
                f"{who}: missing {spec.metrics_dir / name}; run `dvc repro` (or dpcam train/explain for it) first"
            )
    audit_json = spec.audit_dir / AUDIT_JSON
    audit = records.read(AuditRecord, audit_json, who) if audit_json.is_file() else None
    return Run(spec, train, explain, audit)


def load_runs(grid: GridConfig) -> list[Run]:
    """Every run of ``grid`` with its train.json, explain.json and (if present) audit.json; UserError naming
    the first missing required file or the first unreadable one.

    Also checks that each run's ``maps.npy`` and ``map_indices.npy`` exist (the Grad-CAM grids read them).
    """
    return [load_run(spec) for spec in grid_runs(grid)]
