"""torchvision-format pretrained weights in dpcam's Opacus-safe models (issue 22, item 1).

The files are torchvision state dicts made here (``weights=None``, BatchNorm statistics and affines
randomised far from identity; nothing is downloaded), for ImageNet's 1000 classes. For each
architecture and each ``trainable`` (head, last-block, all): every tensor of the file is used or
accounted for (the loader's printed count), dpcam's model computes what torchvision's computes in eval
mode (max |Δ| printed), Opacus's validator accepts it, a DP-SGD step moves exactly the trained
parameters, and a saved run reloads through ``saved.load_model``. Bad files are one-line UserErrors.
"""

import logging
from types import SimpleNamespace

import pytest
import torch
import torchvision.models as tvm
from opacus import GradSampleModule
from opacus.grad_sample.utils import get_gsm_class
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchvision.ops import FrozenBatchNorm2d as TVFrozenBatchNorm2d

from dpcam import saved
from dpcam.config import TrainConfig
from dpcam.errors import UserError
from dpcam.layers import IMAGENET_MEAN, IMAGENET_STD, FrozenBatchNorm2d
from dpcam.models import create_model, freeze, frozen_keys, target_layer, trunk_keys
from dpcam.privacy.engine import make_private
from dpcam.train import fit as train_fit
from dpcam.weights import load_weights

CLASSES = 5  # the private task (APTOS's grades)
IMAGENET = 1000
# file kind: (torchvision builder, dpcam model, image size); 32 px where the ImageNet stems allow it
ARCHS = {
    "resnet18": (tvm.resnet18, "resnet18", 32),
    "alexnet": (tvm.alexnet, "alexnet", 64),
    "vgg16": (tvm.vgg16, "vgg16", 32),
    "vgg16_bn": (tvm.vgg16_bn, "vgg16", 32),
    "resnet34": (tvm.resnet34, None, 32),  # another architecture: bad input only
}
# the first module that fine-tuning trains (its input is what the frozen trunk computes): dpcam's, the file's
FIRST_TRAINED = {
    ("resnet18", "head"): ("fc", "fc"),
    ("resnet18", "last-block"): ("layer4", "layer4"),
    ("alexnet", "head"): ("classifier.6", "classifier.6"),
    ("alexnet", "last-block"): ("features.10", "features.10"),
    ("vgg16", "head"): ("classifier.6", "classifier.6"),
    ("vgg16", "last-block"): ("features.24", "features.24"),
    ("vgg16_bn", "head"): ("classifier.6", "classifier.6"),
    ("vgg16_bn", "last-block"): ("features.24", "features.34"),
}
# the file's tensors under what ``trainable`` trains from initialisation (vgg16_bn: its own indices)
TRAINED_IN_FILE = {
    ("vgg16_bn", "last-block"): tuple(f"features.{i}" for i in (34, 35, 37, 38, 40, 41)) + ("classifier",),
}
_MEAN, _STD = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
_HOOK_WARNING = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
_OPACUS_WARNINGS = pytest.mark.filterwarnings("ignore::UserWarning")  # secure RNG off, hooks on a frozen input


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Weights like a trained network's: convs and linear layers He-scaled (torchvision's initialisation gives
    AlexNet and VGG logits of 0.01, where any difference looks small), BatchNorm affines random and statistics
    those of 16 random images, each variance then scaled by a random factor in [0.5, 1.5] (far from identity,
    activations of order 1); a step count to ignore. Eval mode."""
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_((2 / m.weight[0].numel()) ** 0.5 / float(m.weight[:64].std()))
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of the batch below
        if norms:
            model.train()(torch.randn(16, 3, 32, 32, generator=g))
        for m in norms:
            m.momentum = 0.1
            m.running_var.mul_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(1234)
    return model.eval()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """``files(kind)`` → (path, torchvision model): a torchvision state dict saved as a team would, made once."""
    made: dict[str, tuple] = {}
    folder = tmp_path_factory.mktemp("weights")

    def make(kind: str):
        if kind not in made:
            build = ARCHS[kind][0]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = _randomised(build(weights=None), seed=1)
            path = folder / f"{kind}-imagenet.pt"
            torch.save(model.state_dict(), path)
            made[kind] = (path, model)
        return made[kind]

    return make


def _load(kind: str, path, trainable: str, classes: int = IMAGENET):
    """What ``fit._model`` does for ``trainable`` (checked against it below): the model, frozen, and the report."""
    name, size = ARCHS[kind][1], ARCHS[kind][2]
    model = create_model(name, classes, size, small_input=False, seed=0)
    if trainable == "all":
        report = load_weights(model, path, required=trunk_keys(model))
    else:
        trunk = frozen_keys(model, trainable)
        report = load_weights(model, path, required=trunk, only=trunk)
    freeze(model, trainable)
    return model, report


def _reload(model: nn.Module, path, trainable: str):
    """``_load`` into a model already built (VGG, AlexNet: loading changes none of their layers)."""
    keys = trunk_keys(model) if trainable == "all" else frozen_keys(model, trainable)
    report = load_weights(model, path, required=keys, only=None if trainable == "all" else keys)
    freeze(model, trainable)
    return report


def _input_of(model: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """The input of submodule ``name`` on ``x`` (eval mode, no gradients)."""
    seen = {}
    handle = model.get_submodule(name).register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        handle.remove()
    return seen["x"]


def _same_as_torchvision(model, ref, kind: str, trainable: str, x: torch.Tensor) -> tuple[float, float]:
    """Max |Δ| between dpcam's model (pixel input) and torchvision's (normalised input), and max |torchvision's|:
    the logits when the whole file is loaded, else the frozen trunk's output (the first trained module's input);
    equal within 1e-4 of the latter."""
    z = (x - _MEAN) / _STD
    if trainable == "all":
        with torch.no_grad():
            ours, theirs = model.eval()(x), ref(z)
    else:
        here, there = FIRST_TRAINED[(kind, trainable)]
        ours, theirs = _input_of(model, here, x), _input_of(ref, there, z)
    scale = float(theirs.abs().max())
    assert scale > 1  # not a vacuous comparison
    # float32 rounding (BatchNorm as scale and shift, or folded into a conv) grows with the activations' scale
    torch.testing.assert_close(ours / scale, theirs / scale, rtol=1e-4, atol=1e-4)
    return float((ours - theirs).abs().max()), scale


def _dp_step(model: nn.Module, size: int, classes: int, mode: str = "hooks") -> set[str]:
    """One DP-SGD step through dpcam's privacy engine (Opacus per-example clipping, noise σ = 1 set on its
    DPOptimizer: the clip-only setup skips calibrating σ, seconds of accountant time); the state-dict keys it
    changed."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(8, 3, size, size, generator=gen), torch.arange(8) % classes)
    setup = make_private(
        model.train(),
        torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
        DataLoader(data, batch_size=4),
        scheme="clip-only",
        delta=1e-3,
        max_grad_norm=1.0,
        epochs=1,
        grad_sample_mode=mode,
        noise_generator=torch.Generator().manual_seed(1),
    )
    setup.optimizer.noise_multiplier = 1.0
    xb, yb = data.tensors[0][:4], data.tensors[1][:4]  # a fixed batch: Poisson sampling may draw none
    setup.optimizer.zero_grad()
    setup.criterion(setup.module(xb), yb).backward()
    setup.optimizer.step()
    after = setup.release().state_dict()
    return {k for k in before if not torch.equal(before[k], after[k])}


# ------------------------------------------------------------------------------------------ the layer


@_HOOK_WARNING
def test_frozen_batchnorm_is_eval_batchnorm_with_exact_per_example_gradients():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm2d(6).eval()
    with torch.no_grad():
        for t, v in zip((bn.weight, bn.bias, bn.running_mean, bn.running_var), torch.rand(4, 6, generator=g) + 0.5):
            t.copy_(v)
    bn.num_batches_tracked.fill_(99)
    frozen = FrozenBatchNorm2d(6)
    frozen.load_state_dict(bn.state_dict())  # num_batches_tracked is ignored
    assert set(frozen.state_dict()) == {"weight", "bias", "running_mean", "running_var"}
    assert list(frozen.buffers()) == [] and [n for n, _ in frozen.named_parameters()] == ["weight", "bias"]
    x = torch.randn(3, 6, 5, 5, generator=g)
    tv = TVFrozenBatchNorm2d(6)
    tv.load_state_dict(bn.state_dict())
    for out in (frozen.train()(x), frozen.eval()(x)):  # no batch statistics in training mode either
        torch.testing.assert_close(out, bn(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out, tv(x), rtol=1e-6, atol=1e-6)
    assert torch.equal(frozen.state_dict()["running_mean"], bn.running_mean)  # never updated
    assert frozen.double().running_var.dtype == torch.float64 and frozen.float().running_mean.dtype == torch.float32
    with pytest.raises(RuntimeError, match="running_var"):
        FrozenBatchNorm2d(6).load_state_dict({k: v for k, v in frozen.state_dict().items() if k != "running_var"})

    # per-example gradients of the trained affine (Opacus hooks with dpcam's grad sampler; functorch) equal
    # the gradients of each example alone
    net = nn.Sequential(nn.Conv2d(3, 6, 3), frozen, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 2))
    net.train()  # Opacus records activations in training mode only
    x, y = torch.randn(4, 3, 7, 7, generator=g), torch.tensor([0, 1, 1, 0])
    alone = []
    for i in range(4):
        net.zero_grad()
        nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1], reduction="sum").backward()
        alone.append(torch.stack([frozen.weight.grad.clone(), frozen.bias.grad.clone()]))
    expected = torch.stack(alone)
    assert ModuleValidator.validate(net, strict=False) == [] and GradSampleModule.validate(net, strict=True) == []
    for mode in ("hooks", "functorch"):
        net.zero_grad()
        gsm = get_gsm_class(mode)(net, batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
        try:
            nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
            got = torch.stack([frozen.weight.grad_sample, frozen.bias.grad_sample], 1)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        finally:
            gsm._close()
    # torch's expanded weights cannot multiply per channel: one line, not torch's internal error
    ew = get_gsm_class("ew")(net, batch_first=True, loss_reduction="sum")
    with pytest.raises(UserError, match="grad_sample_mode ew cannot train a frozen BatchNorm layer's affine"):
        ew(x)
    frozen.requires_grad_(False)  # frozen with the trunk, the affine is a constant ew can multiply by
    assert ew(x).shape == (4, 2)


# ------------------------------------------------------------------------------------------ every file


@_HOOK_WARNING
@_OPACUS_WARNINGS
@pytest.mark.parametrize("kind", ["resnet18", "alexnet", "vgg16", "vgg16_bn"])
@pytest.mark.slow
def test_a_torchvision_file_loads_whole_and_computes_what_torchvision_computes(files, kind):
    """For head, last-block and all: every tensor of the file used or accounted for, torchvision's eval-mode
    outputs (allclose 1e-4), Opacus-valid, the Grad-CAM layer where it was, a DP-SGD step on the trained part."""
    path, ref = files(kind)
    state = torch.load(path, weights_only=True, mmap=True)  # its keys
    counters = [k for k in state if k.endswith(".num_batches_tracked")]
    size = ARCHS[kind][2]
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(2))
    model = None
    for trainable in ("head", "last-block", "all"):
        if model is None or kind == "resnet18":  # VGG and AlexNet have no layer to adopt: one model (seconds) serves
            model, report = _load(kind, path, trainable)
        else:
            report = _reload(model, path, trainable)
        # (a) every tensor of the file is used, except the part trained from initialisation and step counters
        trained = TRAINED_IN_FILE.get((kind, trainable)) or (
            () if trainable == "all" else model.finetune_layers[trainable]
        )
        in_trained = [k for k in state if any(k == p or k.startswith(p + ".") for p in trained)]
        assert report.in_file == len(state)
        assert sorted(report.ignored) == sorted(counters)
        assert sorted(report.excluded) == sorted(k for k in in_trained if k not in counters)
        assert sorted(report.used) == sorted(k for k in state if k not in in_trained and k not in counters)
        assert not report.mismatched and not report.unexpected and not report.problems
        assert f"{len(state)} tensors in the file, {len(report.used)} used" in report.summary()
        # the model: no BatchNorm; frozen BatchNorm where the file's BatchNorm is loaded, GroupNorm elsewhere
        frozen_bn = {n for n, m in model.named_modules() if isinstance(m, FrozenBatchNorm2d)}
        assert frozen_bn == set(report.frozen_batchnorm)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if kind == "resnet18":
            norms = {n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)}
            trained_norms = {n for n in norms if trainable == "last-block" and n.startswith("layer4.")}
            assert frozen_bn == norms - trained_norms and len(norms) == 20
            assert all(isinstance(model.get_submodule(n), nn.GroupNorm) for n in trained_norms)
        else:
            assert frozen_bn == set()
        if kind == "vgg16_bn":  # 13 BatchNorm layers folded into the convs before them: vgg16's keys and layers
            assert len({k.rpartition(".")[0] for k in report.folded}) == (10 if trainable == "last-block" else 13)
            with torch.device("meta"):
                assert set(model.state_dict()) - {"normalize.mean", "normalize.std"} == set(tvm.vgg16().state_dict())
        # (b) torchvision's outputs in eval mode
        delta, scale = _same_as_torchvision(model, ref, kind, trainable, x)
        print(f"{kind} {trainable}: max |Δ| = {delta:.2e} of max {scale:.3g} ({report.summary()})")
        # (c) Opacus accepts it; Grad-CAM's layer and the fine-tuning names are where they were
        model.train()
        assert ModuleValidator.validate(model, strict=False) == []
        assert GradSampleModule.validate(model, strict=True) == []  # no trainable layer with buffers
        assert model.gradcam_layer == type(model).gradcam_layer and model.finetune_layers == type(model).finetune_layers
        assert target_layer(model) is model.get_submodule(type(model).gradcam_layer)
        # (d) a DP-SGD step moves exactly the trained parameters (never a frozen statistic)
        if trainable == "head" or kind == "resnet18":
            changed = _dp_step(model, size, IMAGENET)
            assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
            assert not any(k.endswith(("running_mean", "running_var")) for k in changed)


def test_vgg16_bn_is_folded_into_vgg16_conv_by_conv(files):
    """dpcam's vgg16 is torchvision's vgg16 (no BatchNorm): a vgg16_bn file's i-th conv and the BatchNorm after
    it are its i-th conv; the classifier is the same."""
    from dpcam.tvmodels import VGG16

    _, ref = files("vgg16_bn")
    with torch.device("meta"):
        here = VGG16(IMAGENET, small_input=False)
    new, sources = here.translate_state_dict(ref.state_dict())
    assert (
        sources["features.24.weight"]
        == sources["features.24.bias"]
        == [
            "features.34.weight",
            "features.34.bias",
            "features.35.weight",
            "features.35.bias",
            "features.35.running_mean",
            "features.35.running_var",
        ]
    )
    conv = nn.Conv2d(512, 512, 3, padding=1)
    conv.load_state_dict({"weight": new["features.24.weight"], "bias": new["features.24.bias"]})
    z = torch.randn(1, 512, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(conv(z), ref.features[35](ref.features[34](z)), rtol=1e-4, atol=1e-4)
    assert new["classifier.0.weight"] is ref.classifier[0].weight.data or torch.equal(
        new["classifier.0.weight"], ref.classifier[0].weight
    )
    # a file without the statistics is no vgg16_bn file: not translated (the loader then names what misses)
    assert here.translate_state_dict({k: v for k, v in ref.state_dict().items() if "running" not in k}) is None


# ------------------------------------------------------------------------------------------ the doors


def _cfg(path, trainable: str) -> TrainConfig:
    return TrainConfig(model="resnet18", weights=path, trainable=trainable, small_input=False, seed=0)


def _same_model(a: nn.Module, b: nn.Module) -> None:
    assert [(n, type(m)) for n, m in a.named_modules()] == [(n, type(m)) for n, m in b.named_modules()]
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert [n for n, p in a.named_parameters() if p.requires_grad] == [
        n for n, p in b.named_parameters() if p.requires_grad
    ]


def test_train_builds_the_same_models_and_prints_the_count(files, caplog):
    """``fit._model`` (and ``create_model(weights=...)`` for all) build what the tests above check; the loader's
    line says how many of the file's tensors were used."""
    path, _ = files("resnet18")
    data = SimpleNamespace(num_classes=IMAGENET, image_size=32)
    lines = {}
    for trainable in ("head", "last-block", "all"):
        with caplog.at_level(logging.INFO, logger="dpcam.weights"):
            caplog.clear()
            model, trained, loaded = train_fit._model(_cfg(path, trainable), data)
        ours, report = _load("resnet18", path, trainable)
        _same_model(model, ours)
        assert trained == [n for n, p in ours.named_parameters() if p.requires_grad]
        [lines[trainable]] = [r.getMessage() for r in caplog.records if r.name == "dpcam.weights"]
        assert lines[trainable] == report.summary() == loaded  # logged, and returned for train.json and stderr
    assert lines["head"] == (
        f"weights {path}: 122 tensors in the file, 100 used (BatchNorm of 20 layers as frozen statistics and "
        "affine); 20 ignored (BatchNorm's num_batches_tracked: a step counter); 2 not used: trained from "
        "initialisation (fc.weight, fc.bias)"
    )
    assert "122 tensors in the file, 75 used (BatchNorm of 15 layers" in lines["last-block"]
    assert "122 tensors in the file, 102 used (BatchNorm of 20 layers" in lines["all"]
    _same_model(create_model("resnet18", IMAGENET, 32, weights=path, small_input=False, seed=0), ours)


def test_the_imagenet_head_is_trained_from_initialisation_for_other_classes(files):
    """The use case: a 1000-class ImageNet file fine-tuned onto 5 grades. The head's tensors are not used (for
    head and last-block they never are; for all they do not fit): reported, never an error."""
    path, ref = files("resnet18")
    fresh = create_model("resnet18", CLASSES, 32, small_input=False, seed=0)
    for trainable in ("head", "all"):
        model, report = _load("resnet18", path, trainable, classes=CLASSES)
        assert torch.equal(model.fc.weight, fresh.fc.weight)  # the seed's initialisation
        assert len(report.used) == 100 and not report.problems
        if trainable == "head":
            assert report.excluded == ["fc.weight", "fc.bias"]
            assert "2 not used: trained from initialisation (fc.weight, fc.bias)" in report.summary()
        else:
            assert report.mismatched == ["fc.weight", "fc.bias"] and report.missing == ["fc.weight", "fc.bias"]
            assert "2 not used: the head is for another class count" in report.summary()
        x = torch.rand(2, 3, 32, 32)
        ours, theirs = _input_of(model, "fc", x), _input_of(ref, "fc", (x - _MEAN) / _STD)
        assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


@pytest.mark.parametrize("trainable", ["head", "last-block", "all"])
def test_a_saved_fine_tuned_resnet_reloads_through_load_model(files, trainable, tmp_path):
    """model.pt's BatchNorm keys say which layers are frozen BatchNorm: load_model rebuilds the run from
    model.json as for any model (no new field), with Grad-CAM's layer where it was."""
    path, _ = files("resnet18")
    model, _ = _load("resnet18", path, trainable, classes=CLASSES)
    with torch.no_grad():
        for p in model.parameters():  # as if trained
            if p.requires_grad:
                p.add_(0.01)
    data = SimpleNamespace(num_classes=CLASSES, image_size=32, classes=[f"grade{i}" for i in range(CLASSES)])
    saved.save_model(model, _cfg(path, trainable), data, tmp_path / "run")
    loaded, spec = saved.load_model(tmp_path / "run")
    assert set(spec) >= {"model", "num_classes", "image_size", "small_input"}
    assert [(n, type(m)) for n, m in loaded.named_modules()] == [(n, type(m)) for n, m in model.named_modules()]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded.gradcam_layer == "layer4" and target_layer(loaded) is loaded.layer4


# ------------------------------------------------------------------------------------------ bad input


def _one_line_error(build) -> str:
    with pytest.raises(UserError) as e:
        build()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_weights_of_another_architecture_are_refused_in_one_line(files):
    r34, _ = files("resnet34")
    alex, _ = files("alexnet")
    r18, _ = files("resnet18")
    for trainable in ("head", "all"):
        # a resnet34 holds every tensor a resnet18 has, and more: its extra blocks have no place here
        msg = _one_line_error(lambda t=trainable: _load("resnet18", r34, t))
        assert str(r34) in msg and "unknown to the model 80: layer1.2.conv1.weight" in msg
        assert "the file looks like torchvision's resnet34 (1000 classes)" in msg
        msg = _one_line_error(lambda t=trainable: _load("resnet18", alex, t))
        assert str(alex) in msg and "missing" in msg and "torchvision's alexnet (1000 classes)" in msg
    msg = _one_line_error(lambda: create_model("alexnet", CLASSES, 64, weights=r18, small_input=False))
    assert "of the trunk of AlexNet do not fit" in msg and "torchvision's resnet18" in msg
    # the same through create_model (trainable all) and train's fine-tuning door
    msg = _one_line_error(lambda: create_model("resnet18", CLASSES, 32, weights=r34, small_input=False))
    assert "resnet34" in msg
    data = SimpleNamespace(num_classes=CLASSES, image_size=32)
    assert "resnet34" in _one_line_error(lambda: train_fit._model(_cfg(r34, "head"), data))


def test_a_file_that_does_not_fit_the_trunk_leaves_the_model_as_it_was(files, tmp_path):
    path, _ = files("resnet18")
    state = torch.load(path, weights_only=True)
    del state["layer1.0.bn1.running_var"]
    torch.save(state, tmp_path / "damaged.pt")
    model = create_model("resnet18", CLASSES, 32, small_input=False, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trunk = frozen_keys(model, "head")
    msg = _one_line_error(lambda: load_weights(model, tmp_path / "damaged.pt", required=trunk, only=trunk))
    assert "1 tensors of the frozen trunk of ResNet18 do not fit (missing 1: layer1.0.bn1.running_var)" in msg
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())  # GroupNorm restored
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_small_input_stem_is_named_as_what_does_not_fit(files):
    """At 96 px or less resnet18 defaults to a 3×3 stem, which an ImageNet file cannot fill."""
    path, _ = files("resnet18")
    msg = _one_line_error(lambda: create_model("resnet18", CLASSES, 32, weights=path))
    assert "conv1.weight (64, 3, 7, 7)→(64, 3, 3, 3)" in msg and "set train.small_input: false" in msg


# ------------------------------------------------------------------------------------------ the hospital's setting


@_OPACUS_WARNINGS
@pytest.mark.slow  # 224 px end to end: about 30 s
def test_dpcam_fine_tunes_explains_and_audits_an_imagenet_resnet18_head_with_dp_at_224_px_on_cpu(files):
    """The CLI end to end as a hospital team runs it: a tiny ImageFolder prepared at 224 px, a torchvision ResNet18
    state dict (local file), Gaussian DP-SGD on the head with flip-and-shift augmentation; every tensor of the file
    accounted for, printed; then Grad-CAM scored on its test images and the membership audit checked against ε."""
    import json
    from pathlib import Path

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from dpcam.cli import app

    path, _ = files("resnet18")
    rng = np.random.default_rng(0)
    for c in ("grade0", "grade1"):
        Path("raw", c).mkdir(parents=True)
        for i in range(25):  # 35 / 5 / 10 images: the audit needs 10 class-matched members and non-members
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(f"raw/{c}/{c}-{i}.png")
    run = CliRunner().invoke
    prepared = run(
        app,
        [
            "prepare",
            "--dataset",
            "eyes",
            "--format",
            "imagefolder",
            "--source",
            "raw",
            "--size",
            "224",
            "--workers",
            "1",
        ],
    )
    assert prepared.exit_code == 0, prepared.output
    args = [
        "train",
        "--dataset",
        "eyes",
        "--model",
        "resnet18",
        "--weights",
        str(path),
        "--trainable",
        "head",
        "--scheme",
        "gaussian",
        "--epsilon",
        "5",
        "--delta",
        "1e-3",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--lr",
        "0.5",
        "--augment",
        "flip-shift",
        "--device",
        "cpu",
    ]
    trained = run(app, args)
    assert trained.exit_code == 0, trained.output
    name = "gaussian-eps5-ft-head-resnet18-s0"
    m = json.loads(Path(f"models/{name}/train.json").read_text())
    count = (
        f"weights {path}: 122 tensors in the file, 100 used (BatchNorm of 20 layers as frozen statistics and "
        "affine); 20 ignored (BatchNorm's num_batches_tracked: a step counter); 2 not used: trained from "
        "initialisation (fc.weight, fc.bias)"
    )
    assert m["weights_loaded"] == count and count in trained.output
    assert m["trained_parameters"] == ["fc.weight", "fc.bias"] and 0 < m["epsilon"] <= 5 + 1e-6
    assert json.loads(Path(f"models/{name}/model.json").read_text())["image_size"] == 224
    assert m["augment"] == "flip-shift"
    explained = run(
        app,
        [
            "explain",
            name,
            "--method",
            "gradcam",
            "--metric",
            "confidence",
            "--metric",
            "deletion-insertion",
            "--steps",
            "2",
        ],
    )
    assert explained.exit_code == 0, explained.output
    e = json.loads(Path(f"metrics/{name}/explain.json").read_text())
    assert e["images"] == 10 and 0 <= e["deletion_auc"] <= 1 and e["avg_drop_pct"] is not None
    assert np.load(f"metrics/{name}/maps.npy").shape == (10, 224, 224)  # layer4's 7×7 maps, upsampled
    audited = run(app, ["audit", name, "--attack", "loss"])
    assert audited.exit_code == 0, audited.output
    a = json.loads(Path(f"audits/{name}/audit.json").read_text())
    assert a["members"] == 10 and a["check"]["done"] and not a["violation"]
