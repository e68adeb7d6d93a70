"""Constructed runs for the verdict's rule tests: per-image values and predictions chosen by hand, in memory.

A run's explanation metrics are ``base(image) + quality`` in each metric's better direction and in units of the
metric's non-inferiority margin (so ``quality = -10`` is 10 margins worse on every metric, whichever way "better"
points), plus per-seed and per-image noise in the same units; its
predictions are right on the images whose shared difficulty lies below its accuracy (plus a per-seed offset), so
two runs' accuracies differ by the chosen amount on consistent images.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np

from dpcam.config.sections import MARGINS
from dpcam.errors import UserError
from dpcam.families import spec
from dpcam.report.compare import MEASURES

N = 200
IMAGES = np.arange(N) * 3 + 7  # dataset indices of the scored test images
_base = np.random.default_rng(0)
BASE = {m.key: _base.normal(50, 10, N) for m in MEASURES if m.source == "explain"}
SIGN = {m.key: 1.0 if m.better == "higher" else -1.0 for m in MEASURES}
DIFFICULTY = _base.random(N)  # shared by every run: hard images are hard for all
LABELS = np.arange(N) % 5


@dataclass
class FakeRun:
    spec: object
    quality: float
    accuracy: float
    seed_sd: float
    image_sd: float
    degenerate: bool = False
    undertrained: bool = False
    unreadable: str = ""  # "per_image" or "predictions": that file "cannot be read"
    index: np.ndarray = field(default_factory=lambda: IMAGES)
    train: SimpleNamespace = field(default_factory=SimpleNamespace)
    methods: tuple = ("gradcam",)  # explanation methods scored, the headline first
    # method -> {"quality": its quality, "fixed": {key: per-image value}}: how another method's maps score
    by_method: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)  # key -> value every image gets (plus small noise)
    agreement: dict | None = None  # "<a>|<b>" -> the methods' per-image agreement: this is a method_agreement() view

    def of_method(self, method: str) -> FakeRun:
        how = self.by_method.get(method, {})
        return replace(self, quality=how.get("quality", self.quality), fixed=how.get("fixed", {}))

    def method_agreement(self) -> FakeRun:
        return replace(self, agreement=self.by_method.get("agreement", {}))

    def _rng(self, salt: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, salt, zlib.crc32(self.spec.name.encode())])

    @property
    def per_image(self) -> dict[str, np.ndarray]:
        if self.unreadable == "per_image":
            raise UserError(f"grid run {self.spec.name}: metrics/x/{self.spec.name}/per_image.npz is truncated")
        rng = self._rng(1)
        if self.agreement is not None:
            return {
                "index": self.index,
                **{k: v + rng.normal(0, 0.05, self.index.size) for k, v in self.agreement.items()},
            }
        shift = self.quality + rng.normal(0, self.seed_sd)
        pos = np.searchsorted(IMAGES, self.index)
        out = {
            k: MARGINS.get(k, 0.05) * (BASE[k] + SIGN[k] * shift + rng.normal(0, self.image_sd, N))[pos] for k in BASE
        }
        out["confidence_y"] = np.full(self.index.size, 0.5)  # every image matched on both calipers
        out["mask_sensitivity_pct"] = np.full(self.index.size, 10.0)
        out |= {k: v + rng.normal(0, 0.05, self.index.size) for k, v in self.fixed.items()}
        return {"index": self.index, **out}

    @property
    def predictions(self) -> dict[str, np.ndarray]:
        if self.unreadable == "predictions":
            raise UserError(f"grid run {self.spec.name}: models/x/{self.spec.name}/predictions.npz is truncated")
        acc = self.accuracy + self._rng(2).normal(0, self.seed_sd / 100)
        right = DIFFICULTY < acc
        pos = np.searchsorted(IMAGES, self.index)
        pred = np.where(right, LABELS, (LABELS + 1) % 5)[pos]
        return {"index": self.index, "pred": pred, "label": LABELS[pos]}


def make(family, scheme, seeds, *, quality=0.0, accuracy=0.8, seed_sd=0.3, image_sd=1.0, degenerate=False, **varies):
    """The runs of one configuration, one per seed."""
    runs = []
    for s in seeds:
        sp = spec(family, scheme, "smallcnn", s, **varies)
        train = SimpleNamespace(test_accuracy=accuracy, max_grad_norm=1.0, device="cpu", versions={})
        runs.append(FakeRun(sp, quality, accuracy, seed_sd, image_sd, degenerate, train=train))
    return runs


def reference(seeds=(0, 1, 2), **kw):
    return make("baseline", "none", seeds, **kw)


def gaussian(eps, seeds=(0, 1, 2), **kw):
    return make("gaussian", "gaussian", seeds, epsilon=eps, **kw)
