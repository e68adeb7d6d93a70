"""Model registry contract: every registered model is Opacus-valid, in-place free, pixel-space,
and names its Grad-CAM layer."""

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample.utils import get_gsm_class
from opacus.validators import ModuleValidator
from torch import nn

from dpcam.errors import UserError
from dpcam.models import MODELS, Normalize, create_model, target_layer

NUM_CLASSES = 3
# name: (batch, forward sizes, per-sample-gradient size); small batches and 32 px keep the big
# torchvision models fast (the per-sample conv gradients cost batch × pixels)
CONTRACT = {
    "smallcnn": (4, (32, 64), 64),
    "resnet18": (2, (64,), 32),
    "alexnet": (2, (64,), 32),
    "vgg16": (2, (64,), 32),
}
# Opacus's hooks warn when the input does not require grad; harmless here

_HOOK_WARNING = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")


def _target_shape(model: nn.Module, x: torch.Tensor) -> torch.Size:
    """Shape of the Grad-CAM target layer's output on x (forward hook)."""
    seen = {}

    def hook(module, inputs, output):
        seen["shape"] = output.shape

    handle = target_layer(model).register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return seen["shape"]


def test_contract_covers_every_registered_model():
    assert set(CONTRACT) == set(MODELS)


@_HOOK_WARNING
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.slow
def test_model_contract(name):
    """Opacus-valid, (B, classes) logits, target ≥ 8×8 at 64 px, per-sample grads through GradSampleModule hooks."""
    batch, sizes, gsm_size = CONTRACT[name]
    model = create_model(name, NUM_CLASSES, 64, seed=0)
    assert ModuleValidator.validate(model, strict=False) == []
    assert not any(getattr(m, "inplace", False) for m in model.modules()), "in-place ops break Opacus hooks/ew"
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    gen = torch.Generator().manual_seed(0)
    for size in sizes:
        x = torch.rand(batch, 3, size, size, generator=gen)
        assert model(x).shape == (batch, NUM_CLASSES)
    shape = _target_shape(model, x)  # sizes end with 64
    assert shape[-2] >= 8 and shape[-1] >= 8, f"{name}: Grad-CAM layer only {tuple(shape[-2:])} at 64 px"

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    try:
        x = torch.rand(batch, 3, gsm_size, gsm_size, generator=gen)
        y = torch.arange(batch) % NUM_CLASSES
        F.cross_entropy(gsm(x), y).backward()
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert trainable and all(p.grad_sample is not None for p in trainable)
        for p in trainable:
            assert p.grad_sample.shape == (batch, *p.shape)
        # per-sample gradients average to the batch gradient (loss_reduction="mean")
        for p in trainable[:3] + trainable[-2:]:
            torch.testing.assert_close(p.grad_sample.mean(0), p.grad, rtol=1e-4, atol=1e-6)
    finally:
        gsm._close()


@_HOOK_WARNING
def test_smallcnn_expanded_weights_mode():
    """grad_sample_mode="ew" (torch expanded weights) needs an in-place-free model; per-sample grads match hooks."""
    gen = torch.Generator().manual_seed(1)
    x, y = torch.rand(4, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0])
    grads = {}
    for mode in ("hooks", "ew"):
        model = create_model("smallcnn", NUM_CLASSES, 32, seed=0)
        gsm = get_gsm_class(mode)(model, batch_first=True, loss_reduction="sum")
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
        grads[mode] = [p.grad_sample.clone() for p in model.parameters()]
        assert all(g.shape[0] == 4 for g in grads[mode])
    for a, b in zip(grads["hooks"], grads["ew"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_resnet_stem_follows_small_input():
    small = create_model("resnet18", NUM_CLASSES, 64, seed=0)  # default: small_input since 64 <= 96
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1) and isinstance(small.maxpool, nn.Identity)
    big = create_model("resnet18", NUM_CLASSES, 128, seed=0)  # default: ImageNet stem
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert _target_shape(big, torch.rand(1, 3, 128, 128)) == (1, 512, 4, 4)
    forced = create_model("resnet18", NUM_CLASSES, 64, small_input=False, seed=0)
    assert _target_shape(forced, torch.rand(1, 3, 64, 64)) == (1, 512, 2, 2)


def test_normalisation_is_inside_the_model():
    """The first conv sees (x - mean) / std: the model takes pixel-space input."""
    model = create_model("smallcnn", NUM_CLASSES, 32, seed=0)
    norm = model.normalize
    assert isinstance(norm, Normalize)
    assert [n for n, _ in norm.named_parameters()] == [] and not norm.mean.requires_grad
    assert {"normalize.mean", "normalize.std"} <= set(model.state_dict())
    conv = model.features.block1[0]
    seen = {}
    handle = conv.register_forward_hook(lambda m, i, o: seen.update(out=o))
    x = torch.rand(2, 3, 32, 32)
    model(x)
    handle.remove()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = F.conv2d((x - mean) / std, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(seen["out"], expected)
    # and not on the raw pixels
    assert not torch.allclose(seen["out"], F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-3)


def test_custom_normalisation_and_bad_std():
    model = create_model("smallcnn", NUM_CLASSES, 32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    torch.testing.assert_close(model.normalize(torch.ones(1, 3, 1, 1)), torch.ones(1, 3, 1, 1))
    with pytest.raises(UserError, match="std"):
        create_model("smallcnn", NUM_CLASSES, 32, std=(0.2, 0.0, 0.2))


def test_seed_determinism_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = create_model("smallcnn", NUM_CLASSES, 32, seed=7).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    b = create_model("smallcnn", NUM_CLASSES, 32, seed=7).state_dict()
    c = create_model("smallcnn", NUM_CLASSES, 32, seed=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["classifier.weight"], c["classifier.weight"])


def test_smallcnn_widths_and_target_name():
    model = create_model("smallcnn", NUM_CLASSES, 64, widths=(8, 16, 16), seed=0)
    assert model.gradcam_layer == "features.block3"
    assert _target_shape(model, torch.rand(1, 3, 64, 64)) == (1, 16, 16, 16)
    assert sum(p.numel() for p in create_model("smallcnn", NUM_CLASSES, 64).parameters()) < 60_000


def test_unknown_model_and_bad_sizes_are_user_errors():
    with pytest.raises(UserError, match="unknown model .resnet50.; known: smallcnn, resnet18, alexnet, vgg16"):
        create_model("resnet50", NUM_CLASSES)
    with pytest.raises(UserError, match="at least 2 classes"):
        create_model("smallcnn", 1)
    with pytest.raises(UserError, match="too small.*at least 8 px"):
        create_model("smallcnn", NUM_CLASSES, 2)  # three blocks: 4 px still leaves a 1×1 map
    with pytest.raises(UserError, match="too small.*at least 64 px"):
        create_model("alexnet", NUM_CLASSES, 48, small_input=False)


@_HOOK_WARNING
def test_register_model_and_target_layer():
    @MODELS.register("_test_tiny")
    def _tiny(num_classes, image_size, *, small_input, **kwargs):
        model = nn.Sequential(
            Normalize(),
            nn.Conv2d(3, 4, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, num_classes),
        )
        model.gradcam_layer = "2"
        return model

    try:
        model = create_model("_test_tiny", 2, 16)
        assert target_layer(model) is model[2]
        assert target_layer(GradSampleModule(model)) is model[2]  # unwraps Opacus
        with pytest.raises(ValueError, match="already registered"):
            MODELS.register("_test_tiny")(_tiny)
    finally:
        MODELS.pop("_test_tiny")
    with pytest.raises(UserError, match="names no Grad-CAM layer"):
        target_layer(nn.Linear(2, 2))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_names_its_head_and_last_block(name):
    """Fine-tuning: ``finetune_layers`` are submodules; head ⊂ last-block; the Grad-CAM layer is never frozen by
    last-block fine-tuning's choice alone, and frozen_keys + trained parameters cover the model."""
    from dpcam.models import freeze, frozen_keys, trained_prefixes

    model = create_model(name, NUM_CLASSES, 64, seed=0)
    head, last = trained_prefixes(model, "head"), trained_prefixes(model, "last-block")
    for p in head + last:
        model.get_submodule(p)
    assert all(any(h == la or h.startswith(la + ".") for la in last) for h in head)
    trained = freeze(model, "head")
    assert trained and all(any(n.startswith(p + ".") for p in head) for n in trained)
    assert sum(p.requires_grad for p in model.parameters()) == len(trained)
    frozen = set(frozen_keys(model, "head"))
    assert frozen.isdisjoint(trained) and frozen | set(trained) | {
        k for k in model.state_dict() if k.startswith("normalize.")
    } == set(model.state_dict())
    assert freeze(model, "all") == [n for n, _ in model.named_parameters()]


def test_smallcnn_head_is_the_linear_classifier():
    from dpcam.models import freeze

    model = create_model("smallcnn", 5, 32)
    assert freeze(model, "head") == ["classifier.weight", "classifier.bias"]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 165
    assert freeze(model, "last-block")[:2] == ["features.block3.0.weight", "features.block3.0.bias"]
