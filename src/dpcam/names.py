"""Leaf registries of names: what config validates against, without importing a stage.

Each stage keeps its own registry of objects (``models.MODELS``, ``data.mechanisms.MECHANISMS``,
``audit.ATTACKS`` ...); the names live here so that ``config`` can check a params value without
importing torch, Opacus or a stage. A test holds every stage registry equal to its names here.
"""

from __future__ import annotations

# prepare: source formats
FORMATS = ("synthetic", "aptos", "catsdogs", "petimages", "imagefolder")

# privacy schemes of a training run (docs/privacy.md)
SCHEMES = ("none", "clip-only", "gaussian", "laplace", "laplace-paper", "ldp")
NOISED_SCHEMES = ("gaussian", "laplace")  # DP-SGD with noise and an accountant: a finite target ε, the ε achieved
# the paper's replica (L2 clipping + Laplace noise of Gaussian σ·C): noise calibrated from a nominal ε, NO guarantee
UNGUARANTEED_SCHEMES = ("laplace-paper",)
CALIBRATED_SCHEMES = NOISED_SCHEMES + UNGUARANTEED_SCHEMES  # noise calibrated from a (target or nominal) ε
CLIPPED_SCHEMES = ("clip-only", "gaussian", "laplace", "laplace-paper")  # per-example clipping: Opacus + Poisson
UNCLIPPED_SCHEMES = ("none", "ldp")  # plain training (for ldp the data carry the guarantee)
# the train keys that name a run (a --family flag never sets them; a family's overrides never change them)
RUN_KEYS = ("scheme", "model", "seed", "name", "ldp", "train_size", "epsilon")
TRAINABLE = ("all", "head", "last-block")  # what a run trains; head / last-block fine-tune a pretrained trunk

GAUSSIAN_ACCOUNTANTS = ("prv", "rdp", "gdp")
GRAD_SAMPLE_MODES = ("hooks", "ew", "functorch", "ghost")
AUGMENTATIONS = ("none", "flip-shift")  # training-time augmentation (dpcam.data.augment)
PRECISIONS = ("fp32", "bf16")  # the dtype of a training step's activations (per-example clipping stays exact)
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "step", "cosine")
DEVICES = ("auto", "cpu", "cuda")

# families.FAMILIES: the run families of the grid
FAMILIES = (
    "baseline",
    "gaussian",
    "laplace",
    "laplace-paper",
    "ldp",
    "clip-sweep",
    "train-size",
    "public",
    "finetune-none",
    "finetune-gaussian",
    "finetune-laplace",
)
FINETUNE_SCHEMES = ("none", "gaussian", "laplace")  # fine-tuning families: finetune-<scheme>
HEADLINE_FAMILIES = ("baseline", "gaussian")  # the ε = ∞ reference and Gaussian DP-SGD: the study's answer

# models.MODELS
MODELS = ("smallcnn", "resnet18", "alexnet", "vgg16")

# data.mechanisms.MECHANISMS: local-DP image mechanisms
MECHANISMS = ("singh-sikka", "pixel-laplace", "pixel-gaussian", "dp-pix")

# explain.methods.METHODS and explain.metrics.METRICS
EXPLAIN_METHODS = ("gradcam", "gradcam++", "scorecam", "guided-gradcam", "integrated-gradients", "occlusion")
EXPLAIN_METRICS = (
    "confidence",
    "masking-baselines",
    "deletion-insertion",
    "road",
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
