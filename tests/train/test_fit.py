"""dpcam.train.fit: DP-SGD fitting, accounting, resume with the same ledger, recipes, fine-tuning."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpcam.errors import UserError
from dpcam.saved import load_model
from dpcam.train import fit as train_fit
from dpcam.train import stage as train_stage
from tests.conftest import make_tiny
from tests.train.conftest import cfg


def test_non_private_fit_learns_and_returns_metrics(tiny):
    res = train_fit.fit(cfg(scheme="none", epochs=4), progress=False)
    m = res.metrics
    assert m["test_accuracy"] > 0.8 and not m["collapsed"]
    assert m["epsilon"] in (None, float("inf")) and m["scheme"] == "none"
    assert sum(m["test_pred_histogram"]) == 48 and len(res.history) == 4
    assert {"test_qwk", "test_macro_f1", "val_accuracy", "best_epoch"} <= set(m)


@pytest.mark.slow
def test_gaussian_epsilon_is_what_the_accountant_says(tiny):
    from dpcam.explain.gradcam import opacus_state
    from dpcam.privacy.accounting import gaussian_epsilon

    res = train_fit.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3), progress=False)
    assert opacus_state(res.model, active_only=False) is None  # a plain model: no hooks, no per-sample attributes
    m = res.metrics
    assert m["steps"] == 2 * round(1 / m["sample_rate"])
    independent = gaussian_epsilon(m["noise_multiplier"], m["sample_rate"], m["steps"], 1e-3, accountant="prv")
    assert m["epsilon"] == pytest.approx(independent, rel=1e-6)
    assert m["epsilon"] <= 2.0 + 1e-6 and m["accountant"] == "prv"
    assert m["epsilon_rdp_check"] >= m["epsilon"] * 0.9


def test_laplace_epsilon_within_target(tiny):
    from dpcam.privacy.accounting import laplace_epsilon

    m = train_fit.fit(cfg(scheme="laplace", epsilon=4.0, delta=1e-3, clip=5.0), progress=False).metrics
    assert m["epsilon"] <= 4.0 * (1 + 1e-6)
    assert m["epsilon"] == pytest.approx(
        laplace_epsilon(m["noise_multiplier"], m["sample_rate"], m["steps"], 1e-3), rel=1e-3
    )


@pytest.mark.parametrize("recipe", [{}, {"ema": 0.9, "augment": "flip-shift", "aug_mult": 2}])
@pytest.mark.slow
def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny, tmp_path, recipe):
    c = cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=3, **recipe)
    whole = train_fit.fit(c, checkpoint=tmp_path / "a.pt", progress=False)

    class Killed(BaseException):
        pass

    def kill_after_first(epoch, row):
        if epoch == 1:
            raise Killed

    with pytest.raises(Killed):
        train_fit.fit(c, checkpoint=tmp_path / "b.pt", on_epoch=kill_after_first, progress=False)
    resumed = train_fit.fit(c, checkpoint=tmp_path / "b.pt", resume=True, progress=False)
    assert resumed.metrics["epsilon"] == whole.metrics["epsilon"]
    assert resumed.metrics["steps"] == whole.metrics["steps"]
    for k, v in whole.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert [r["val_accuracy"] for r in resumed.history] == [r["val_accuracy"] for r in whole.history]


@pytest.mark.slow
def test_checkpoint_from_another_config_or_without_ledger_is_refused(tiny, tmp_path):
    c = cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1)
    train_fit.fit(c, checkpoint=tmp_path / "c.pt", progress=False)
    with pytest.raises(UserError, match=r"another config \(clip: 1\.0 -> 2\.0\)"):
        train_fit.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, clip=2.0),
            checkpoint=tmp_path / "c.pt",
            resume=True,
        )
    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    ckpt["ledger"] = None
    torch.save(ckpt, tmp_path / "c.pt")
    with pytest.raises(UserError, match="no privacy ledger; refusing to resume"):
        train_fit.fit(c, checkpoint=tmp_path / "c.pt", resume=True)


@pytest.mark.slow
def test_ghost_clipping_trains_with_the_same_accounting(tiny):
    m = train_fit.fit(
        cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, grad_sample_mode="ghost"), progress=False
    ).metrics
    hooks = train_fit.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    assert m["epsilon"] == hooks["epsilon"] and m["noise_multiplier"] == hooks["noise_multiplier"]
    assert m["steps"] == hooks["steps"]


@pytest.mark.slow
def test_bf16_trains_with_the_same_accounting_and_says_so(tiny):
    """precision bf16: the same plan and ε (accounting does not depend on dtype), recorded in train.json."""
    bf = train_fit.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, precision="bf16"), progress=False)
    fp = train_fit.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    m = bf.metrics
    assert m["precision"] == "bf16" and fp["precision"] == "fp32"
    assert m["epsilon"] == fp["epsilon"] and m["noise_multiplier"] == fp["noise_multiplier"]
    assert all(p.dtype == torch.float32 for p in bf.model.parameters())  # the saved model stays float32


@pytest.mark.slow
def test_ema_and_augmentation_multiplicity_keep_the_accounting_and_are_recorded(tiny):
    """Averaging views before clipping and averaging the weights are not privacy events: the same plan and ε."""
    plain = train_fit.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=2), progress=False)
    res = train_fit.fit(
        cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=2, ema=0.9, augment="flip-shift", aug_mult=3),
        progress=False,
    )
    m = res.metrics
    assert (m["ema"], m["augment"], m["aug_mult"]) == (0.9, "flip-shift", 3)
    for key in ("epsilon", "noise_multiplier", "sample_rate", "steps"):
        assert m[key] == plain.metrics[key], key
    assert not any(torch.equal(a, b) for a, b in zip(res.model.parameters(), plain.model.parameters()))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"ema": 1.0}, "ema"),
        ({"ema": 0.0}, "ema"),
        ({"aug_mult": 0}, "aug_mult"),
        ({"aug_mult": 2}, "aug_mult = 2 averages augmented views: set augment"),
        ({"aug_mult": 2, "augment": "flip-shift", "grad_sample_mode": "ghost"}, "use grad_sample_mode hooks"),
    ],
)
def test_bad_recipe_keys_are_refused_naming_the_key(tiny, bad, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        cfg(scheme="gaussian", epsilon=2.0, **bad)


@pytest.mark.gpu
def test_a_gaussian_run_on_cuda_is_accounted_as_on_the_cpu(tiny):
    """The Poisson sampler and the ledger live on the CPU: ε and steps do not depend on the device."""
    cpu = train_fit.fit(cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1), progress=False).metrics
    gpu = train_fit.fit(
        cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, device="cuda"), progress=False
    ).metrics
    assert gpu.device == "cuda" and gpu.steps == cpu.steps and gpu.epsilon == cpu.epsilon


def test_a_batch_size_above_n_is_said(tiny):
    with pytest.warns(UserWarning, match=r"batch size 1000 is more than the 144 training images; using 144"):
        m = train_fit.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1, batch_size=1000), progress=False
        ).metrics
    assert m.sample_rate == 1.0


def make_public_tiny(name="tiny-public", n=240, size=16, public=True, seed=1):
    """A public companion of make_tiny: the same task drawn with another generator (no image in common)."""

    from dpcam.data import store

    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    c = size // 4
    images[labels == 1, c : 3 * c, c : 3 * c] += 120
    splits = store.stratified_split(labels, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0)
    with store.DatasetWriter(Path("data/prepared") / name, n, size, size, with_masks=False) as w:
        w.images[:] = images
        w.finish(labels, splits, {"dataset": name, "classes": ["plain", "square"], "public": public})
    return Path("data/prepared") / name


@pytest.fixture
def trunk(tiny):
    """A trunk trained without privacy on the public set, saved as the public family saves it."""
    make_public_tiny()
    c = cfg(scheme="none", public=True, epochs=3, name="trunk")
    train_stage.run(c, progress=False)
    return Path("models/trunk/model.pt")


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("scheme", ["gaussian", "laplace"])
@pytest.mark.slow
def test_head_fine_tuning_trains_only_the_head_and_its_epsilon_is_the_accountants(trunk, scheme, capsys):
    from dpcam.data.store import file_sha256
    from dpcam.explain.gradcam import opacus_state
    from dpcam.models import create_model, target_layer
    from dpcam.privacy.accounting import gaussian_epsilon, laplace_epsilon

    c = cfg(scheme=scheme, epsilon=2.0, delta=1e-3, clip=1.0, lr=0.5, trainable="head", weights=trunk, epochs=2)
    m = train_stage.run(c, progress=False)
    assert m.run_name == f"{scheme}-eps2-ft-head-smallcnn-s0"
    saved, start = _state(f"models/{m.run_name}/model.pt"), _state(trunk)
    # the saved model is the whole model: every tensor, the trunk exactly the public one, the head trained
    whole = create_model("smallcnn", 2, 16)
    assert set(saved) == set(whole.state_dict())
    for k, v in saved.items():
        if k.startswith("classifier."):
            assert not torch.equal(v, start[k]), k
        else:
            assert torch.equal(v, start[k]), k
    # ε: the accountant's for the steps and q that ran (only the fine-tuning: the trunk was public)
    if scheme == "gaussian":
        independent = gaussian_epsilon(m.noise_multiplier, m.sample_rate, m.steps, 1e-3, "prv")
    else:
        independent = laplace_epsilon(m.noise_multiplier, m.sample_rate, m.steps, 1e-3)
    assert m.epsilon == pytest.approx(independent, rel=1e-6) and m.epsilon <= 2.0 + 1e-6
    assert m.steps == 2 * round(1 / m.sample_rate) and m.guarantee == "dp"
    assert m.trainable == "head" and m.trained_parameters == ["classifier.weight", "classifier.bias"]
    assert m.trained_parameter_count == 32 * 2 + 2
    assert m.weights == str(trunk) and m.weights_sha256 == file_sha256(trunk)
    # the file's account, printed and recorded: every trunk tensor used, the file's input normalisation ignored, the
    # head trained from initialisation
    n = len(start)
    assert m.weights_loaded.startswith(f"weights {trunk}: {n} tensors in the file, {n - 4} used; 2 ignored (the file")
    assert "2 not used: trained from initialisation (classifier.weight, classifier.bias)" in m.weights_loaded
    assert f"{m.run_name}: {m.weights_loaded}" in capsys.readouterr().err
    pub = m.public_data
    assert pub["public"] is True and pub["path"] == "data/prepared/tiny-public" and pub["run"] == "trunk"
    assert pub["manifest_sha256"] == file_sha256(Path("data/prepared/tiny-public/manifest.json"))
    assert pub["disjoint_check"]["shared_images"] == 0
    # Grad-CAM reads the reloaded whole model at the usual layer
    model, spec = load_model(m.run_name)
    assert opacus_state(model, active_only=False) is None and spec["config"]["trainable"] == "head"
    assert target_layer(model) is model.features.block3 and model.gradcam_layer == whole.gradcam_layer


def test_the_public_trunk_run_records_its_public_data(trunk):
    m = json.loads(Path("models/trunk/train.json").read_text())
    assert m["data_dir"] == "data/prepared/tiny-public" and m["trainable"] == "all"
    assert m["public_data"]["public"] is True and m["public_data"]["disjoint_check"]["private"] == "data/prepared/tiny"
    assert "guarantee" not in m  # non-private: ε = ∞, no guarantee field


def test_weights_that_do_not_fit_the_trunk_stop_fine_tuning_naming_the_tensors(trunk):
    state = _state(trunk)
    del state["features.block1.0.weight"]
    state["features.block2.0.weight"] = torch.zeros(32, 16, 5, 5)
    torch.save(state, "bad.pt")
    with pytest.raises(UserError) as e:
        train_fit.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, trainable="head", weights="bad.pt"), progress=False
        )
    msg = str(e.value)
    assert "2 tensors of the frozen trunk of SmallCNN do not fit" in msg and "\n" not in msg
    assert "missing 1: features.block1.0.weight" in msg
    assert "another shape (file→model) 1: features.block2.0.weight (32, 16, 5, 5)→(32, 16, 3, 3)" in msg
    # the head may differ (other classes): it is trained from initialisation anyway
    state = _state(trunk)
    state["classifier.weight"], state["classifier.bias"] = torch.zeros(1000, 32), torch.zeros(1000)
    torch.save(state, "other-head.pt")
    ok = train_fit.fit(cfg(scheme="none", trainable="head", weights="other-head.pt", epochs=1), progress=False)
    assert ok.metrics.public_data["source"] == "external"  # no model.json beside it: provenance not checkable


def test_a_trunk_that_saw_private_data_cannot_start_a_private_fine_tune(tiny):
    train_stage.run(cfg(scheme="none", epochs=1, name="private-trunk"), progress=False)  # trained on the private set
    with pytest.raises(UserError, match=r"its trunk cannot start a private fine-tuning: .*does not say public: true"):
        train_fit.fit(
            cfg(scheme="gaussian", epsilon=2.0, delta=1e-3, trainable="head", weights="models/private-trunk/model.pt"),
            progress=False,
        )
    # a "public" set that overlaps the private one is refused both for the trunk and for the fine-tune

    from dpcam.data import store

    pub = make_public_tiny()
    images = np.load(pub / "images.npy")
    images[3] = np.load("data/prepared/tiny/images.npy")[10]
    np.save(pub / "images.npy", images)
    with pytest.raises(UserError, match=r"overlaps the private set data/prepared/tiny: 1 of its 240 images"):
        train_fit.fit(cfg(scheme="none", public=True, epochs=1), progress=False)
    assert store.load_dataset(pub).manifest["public"] is True


def test_fine_tuning_flags_need_weights():
    with pytest.raises(ValueError, match="trainable = 'head' fine-tunes a pretrained trunk: give its weights"):
        cfg(trainable="head")
    with pytest.raises(ValueError, match="public = true trains on the public set"):
        cfg(scheme="ldp", ldp="x", public=True)
    assert cfg(public=True).data_dir == Path("data/prepared/tiny-public")
    assert cfg(scheme="laplace-paper", epsilon=5).run_name == "laplace-paper-nominal5-smallcnn-s0"


@pytest.mark.slow
def test_on_patient_grouped_data_the_guarantee_is_stated_per_patient(tmp_path, monkeypatch):
    import math

    monkeypatch.chdir(tmp_path)
    make_tiny("grouped", per_patient=3)
    base = dict(dataset="grouped", scheme="gaussian", epsilon=2.0, delta=1e-3, epochs=1)
    with pytest.raises(UserError, match=r"groups images by patient .* set train.max_group_images .* largest: 3\)"):
        train_fit.fit(cfg(**base), progress=False)
    with pytest.raises(UserError, match=r"patient patient\d+ has 3 training images, more than .*max_group_images = 2"):
        train_fit.fit(cfg(**base, max_group_images=2), progress=False)
    m = train_fit.fit(cfg(**base, max_group_images=3), progress=False).metrics
    assert (m.privacy_unit, m.group_size) == ("group", 3)
    assert m.group_epsilon == pytest.approx(3 * m.epsilon)
    assert m.group_delta == pytest.approx(3 * math.exp(2 * m.epsilon) * m.delta)
    make_tiny()
    plain = train_fit.fit(cfg(**{**base, "dataset": "tiny"}), progress=False).metrics
    assert plain.privacy_unit == "image" and plain.group_epsilon is None
