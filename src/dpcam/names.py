"""Leaf registries of names: what config validates against, without importing a stage.

Each stage keeps its own registry of objects (``models.MODELS``, ``data.ldp.MECHANISMS``,
``audit.ATTACKS`` ...); the names live here so that ``config`` can check a params value without
importing torch, Opacus or a stage. A test holds every stage registry equal to its names here.
"""

from __future__ import annotations

# prepare: source formats
FORMATS = ("synthetic", "aptos", "catsdogs", "petimages", "imagefolder")

# privacy schemes of a training run (docs/privacy.md)
SCHEMES = ("none", "clip-only", "gaussian", "laplace", "ldp")
NOISED_SCHEMES = ("gaussian", "laplace")  # DP-SGD with noise: a finite target ε
CLIPPED_SCHEMES = ("clip-only", "gaussian", "laplace")  # per-example clipping: Opacus + Poisson sampling
UNCLIPPED_SCHEMES = ("none", "ldp")  # plain training (for ldp the data carry the guarantee)

GAUSSIAN_ACCOUNTANTS = ("prv", "rdp", "gdp")
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# families.FAMILIES: the run families of the grid
FAMILIES = ("baseline", "gaussian", "laplace", "ldp", "clip-sweep", "train-size")
HEADLINE_FAMILIES = ("baseline", "gaussian")  # the ε = ∞ reference and Gaussian DP-SGD: the study's answer

# models.MODELS
MODELS = ("smallcnn", "resnet18", "alexnet", "vgg16")

# data.ldp.MECHANISMS: local-DP image mechanisms
MECHANISMS = ("singh-sikka", "pixel-laplace", "pixel-gaussian", "dp-pix")

# explain.gradcam.METHODS and explain.metrics.METRICS
EXPLAIN_METHODS = ("gradcam", "guided-gradcam")
EXPLAIN_METRICS = (
    "confidence",
    "deletion-insertion",
    "pointing-game",
    "energy-pointing-game",
    "map-agreement",
    "randomisation",
)

# audit.ATTACKS: membership-inference attacks
ATTACKS = ("loss", "loss-calibrated", "gradcam-variance", "gradcam-entropy", "input-gradient")

# search.OBJECTIVES: explanation objectives of `dpcam search`
OBJECTIVES = (
    "masked_score_pct",
    "avg_drop_pct",
    "increase_conf_pct",
    "masked_accuracy_pct",
    "insertion_auc",
    "deletion_auc",
    "pointing_game",
    "energy_pointing_game",
)
SEARCH_SAMPLERS = ("nsga2", "tpe", "random")
