"""Who is attacked and with what: the member / non-member samples, per-image signals and attack scores.

:data:`ATTACKS` is the audit's registry of attacks (their names are :data:`dpcam.names.ATTACKS`);
the method is described in :mod:`dpcam.audit`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dpcam.errors import UserError
from dpcam.registry import Registry

Signals = dict[str, np.ndarray]  # compute_signals output: name -> float64 (N,)


# ------------------------------------------------------------------------------------ the attacks


@dataclass(frozen=True)
class Attack:
    """A membership-inference attack: its score per image from the signals (higher = member, before any
    learned flip), the signal group it needs computed, and its fixed direction (None: learned)."""

    name: str
    score: Callable[[Signals, np.ndarray], np.ndarray]  # (signals, calibration mask) -> scores (N,)
    needs: str | None = None  # "gradcam" | "input_gradient": computed only when an attack needs it
    member_when: str | None = None  # fixed direction; None = chosen on the selection half

    @property
    def learned(self) -> bool:
        return self.member_when is None


def _loss_score(signals: Signals, calibration: np.ndarray) -> np.ndarray:
    return -signals["loss"]


def _calibrated_score(signals: Signals, calibration: np.ndarray) -> np.ndarray:
    """φ standardised by the mean and spread of the calibration images of each class (all of them for a
    class with fewer than 2 or no spread)."""
    phi, labels = signals["confidence"], signals["label"]
    ref = phi[calibration]
    mu0, sd0 = ref.mean(), ref.std()
    mu = np.full(phi.shape, mu0)
    sd = np.full(phi.shape, sd0 if sd0 > 0 else 1.0)
    for c in np.unique(labels):
        mine = phi[calibration & (labels == c)]
        if mine.size >= 2 and mine.std() > 0:
            mu[labels == c], sd[labels == c] = mine.mean(), mine.std()
    return (phi - mu) / sd


def _signal_score(key: str) -> Callable[[Signals, np.ndarray], np.ndarray]:
    return lambda signals, calibration: signals[key].copy()


ATTACKS: Registry[Attack] = Registry(
    "attack",
    (
        Attack("loss", _loss_score, member_when="lower loss"),
        Attack("loss-calibrated", _calibrated_score, member_when="higher class-standardised confidence"),
        Attack("gradcam-variance", _signal_score("gradcam_variance"), needs="gradcam"),
        Attack("gradcam-entropy", _signal_score("gradcam_entropy"), needs="gradcam"),
        Attack("input-gradient", _signal_score("input_gradient"), needs="input_gradient"),
    ),
)


def attack_scores(signals: Signals, attack: str, calibration: np.ndarray) -> np.ndarray:
    """Scores (N,) of ``attack`` from ``compute_signals`` output; higher = member (before any learned flip).

    ``calibration``: bool (N,), the images whose statistics calibrate (the selection-half
    non-members); used by ``loss-calibrated`` only.
    """
    return ATTACKS[attack].score(signals, calibration)


def directed_scores(
    signals: Signals, attack: str, is_member: np.ndarray, selection: np.ndarray
) -> tuple[np.ndarray, str | None]:
    """``attack``'s scores turned so that higher means member, and what "member" means in words.

    A learned-direction attack keeps its signal or takes its negative, whichever has AUC ≥ 0.5 on the
    ``selection`` half (bool (N,)); ``is_member`` bool (N,). Non-finite scores are returned as they are.
    """
    from sklearn.metrics import roc_auc_score

    a = ATTACKS[attack]
    s = attack_scores(signals, attack, selection & ~is_member)
    if not a.learned or not np.isfinite(s).all():
        return s, a.member_when
    flip = bool(np.ptp(s[selection]) > 0 and roc_auc_score(is_member[selection], s[selection]) < 0.5)
    return (-s if flip else s), f"{'lower' if flip else 'higher'} {attack.replace('-', ' ')}"


# ------------------------------------------------------------------------------------ the signals


def compute_signals(
    model,
    data,
    attacks: list[str],
    *,
    batch_size: int,
    device,
    layer: str | None = None,
    progress: bool = True,
    desc: str = "audit",
) -> Signals:
    """Per-image attack signals of ``data`` (an ``ImageDataset``) on the plain ``model``, batched.

    Returns float64 (N,) arrays: ``loss`` (cross-entropy of the true label), ``confidence`` (logit-
    scaled φ = z_y − logsumexp_{k≠y} z_k), ``correct`` (1.0 where the prediction is the label),
    ``label``; with a Grad-CAM attack also ``gradcam_variance`` and ``gradcam_entropy`` (of the
    true label's [0, 1] map, entropy in nats of L / ΣL; a constant map counts as uniform); with
    ``input-gradient`` ``input_gradient`` (‖∂loss/∂x‖₂ in pixel space). ``model`` is used in eval
    mode with frozen parameters (restored afterwards); no Opacus hooks are allowed (``gradcam``
    checks). One forward + backward pass for the loss and input gradient, and Captum's for Grad-CAM.
    """
    from tqdm.auto import tqdm

    from dpcam.explain.gradcam import check_plain

    check_plain(model, what="the membership-inference audit")
    needs = {ATTACKS[a].needs for a in attacks}
    keys = ["loss", "confidence", "correct", "label"]
    keys += ["gradcam_variance", "gradcam_entropy"] if "gradcam" in needs else []
    keys += ["input_gradient"] if "input_gradient" in needs else []
    out = {k: np.empty(len(data), np.float64) for k in keys}
    bar = tqdm(total=len(data), desc=desc, disable=None if progress else True, leave=False)
    for start in range(0, len(data), batch_size):
        pos = np.arange(start, min(len(data), start + batch_size))
        x, y = (t.to(device) for t in data.batch(pos))
        for key, values in _batch_signals(model, x, y, needs, layer).items():
            out[key][pos] = values
        bar.update(len(pos))
    bar.close()
    return out


def _batch_signals(model, x, y, needs: set[str | None], layer: str | None) -> Signals:
    """One batch's signals (``compute_signals``), as float64 numpy arrays."""
    import torch
    import torch.nn.functional as F

    from dpcam.explain.gradcam import evaluating

    want_grad = "input_gradient" in needs
    got = {}
    with evaluating(model, freeze=True), torch.set_grad_enabled(want_grad):
        xg = x.clone().requires_grad_(want_grad)
        logits = model(xg)
        loss = F.cross_entropy(logits, y, reduction="none")
        if want_grad:
            (grad,) = torch.autograd.grad(loss.sum(), xg)  # x_i only reaches loss_i in eval mode
            got["input_gradient"] = grad.flatten(1).norm(dim=1).double()
    logits, loss = logits.detach().double(), loss.detach().double()
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.scatter(1, y[:, None], float("-inf"))
    got.update(
        loss=loss,
        confidence=own - torch.logsumexp(others, dim=1),
        correct=(logits.argmax(1) == y).double(),
        label=y.double(),
    )
    if "gradcam" in needs:
        got.update(_gradcam_signals(model, x, y, layer))
    return {k: v.cpu().numpy() for k, v in got.items()}


def _gradcam_signals(model, x, y, layer: str | None):
    """Variance and entropy (nats, of L / ΣL; uniform for a constant map) of the true label's Grad-CAM maps."""
    import torch

    from dpcam.explain.gradcam import gradcam

    maps = gradcam(model, x, target=y, layer=layer)[0].flatten(1).double()
    mass = maps.sum(dim=1, keepdim=True)
    p = torch.where(mass > 0, maps / mass.clamp_min(1e-300), torch.full_like(maps, 1.0 / maps.shape[1]))
    return {
        "gradcam_variance": maps.var(dim=1, unbiased=False),
        "gradcam_entropy": -(p * torch.log(p.clamp_min(1e-300))).sum(dim=1),
    }


# ------------------------------------------------------------------------------------ the samples


def sample_groups(data, max_per_group: int, seed: int, train_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class-matched members and non-members of a ``PreparedDataset``: two sorted int64 index arrays of one size n.

    Members: up to ``max_per_group`` training images drawn at random (from the ``train_size``
    subset ``train.fit`` used, seed 0, when set). Non-members: for each class, as many test images
    of that class as there are members of it (members of a class the test split holds fewer of
    are dropped at random). Matching the class mix keeps a label-dependent signal (e.g. the loss of
    an untrained model) from passing for membership. UserError when n < 10.
    """
    train, test = data.split("train"), data.split("test")
    if train_size is not None:
        train = train.subset(train_size)  # exactly the images train.fit used (seed 0)
    rng = np.random.default_rng(seed)
    first = rng.permutation(train.indices)[: min(max_per_group, len(train))]
    labels = np.asarray(data.labels)
    members, nonmembers = [], []
    for c in np.unique(labels[first]):
        mine = first[labels[first] == c]
        pool = test.indices[labels[test.indices] == c]
        k = min(mine.size, pool.size)
        members.append(mine[:k])
        nonmembers.append(rng.choice(pool, k, replace=False))
    members, nonmembers = np.sort(np.concatenate(members)), np.sort(np.concatenate(nonmembers))
    if members.size < 10:
        raise UserError(
            f"{data.path}: the audit needs at least 10 class-matched training and test images "
            f"(train {len(train)}, test {len(test)}, matched {members.size}); prepare a larger dataset"
        )
    return members.astype(np.int64), nonmembers.astype(np.int64)
