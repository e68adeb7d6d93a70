from pathlib import Path

import pytest
import yaml

from dpcam import families
from dpcam.config import GridConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.families import grid_runs
from tests.conftest import tiny_grid


def cfg(**kw) -> TrainConfig:
    base = dict(dataset="tiny", model="smallcnn", epochs=2, batch_size=32, lr=0.1, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def test_grid_config_applies_what_each_family_varies():
    grid, base = tiny_grid(), cfg(scheme="gaussian", lr=0.5, clip=1.0)
    got = {s.name: families.run_config(s, grid, base) for s in grid_runs(grid)}
    none = got["none-epsinf-smallcnn-s0"]
    assert (none.scheme, none.optimizer, none.lr, none.batch_size) == ("none", "adam", 0.01, 16)
    lap = got["laplace-eps5-smallcnn-s0"]
    assert (lap.scheme, lap.epsilon, lap.clip, lap.lr, lap.optimizer) == ("laplace", 5, 7, 0.05, "sgd")
    sweep = got["gaussian-eps2-clip3-smallcnn-s0"]
    assert (sweep.epsilon, sweep.clip, sweep.lr) == (2, 3, 0.5)
    small = got["gaussian-eps2-n40-smallcnn-s0"]
    assert (small.train_size, small.clip, small.run_name) == (40, 1.0, "gaussian-eps2-n40-smallcnn-s0")


def test_train_size_runs_train_the_epochs_grid_train_sizes_sets_else_their_recipes():
    base = cfg(scheme="gaussian", lr=0.5, clip=1.0, epochs=3)
    for epochs, want in ((None, {"none": 2, "gaussian": 3}), (50, {"none": 50, "gaussian": 50})):
        grid = tiny_grid(train_sizes={"sizes": [40], "gaussian": [2], "none": True, "epochs": epochs})
        got = {s.scheme: families.run_config(s, grid, base).epochs for s in grid_runs(grid) if s.train_size}
        assert got == want
    with pytest.raises(UserError, match="grid.train_sizes.epochs"):
        families.check_flags("train-size", tiny_grid(train_sizes={"sizes": [40], "epochs": 50}), {"epochs": 9})
    with pytest.raises(UserError, match=r"run none-epsinf-n40-smallcnn-s0 .*\(grid.nonprivate.epochs\)"):
        families.check_flags("train-size", tiny_grid(train_sizes={"sizes": [40], "epochs": None}), {"epochs": 9})


def test_a_refused_flag_names_the_dp_schedule_that_sets_it():
    grid = GridConfig(gaussian=[1, 10])  # the shipped schedules: short (ε ≤ 1) and long
    with pytest.raises(
        UserError, match=r"--augment: .* run gaussian-eps1-smallcnn-s0 .*\(grid.schedules.short.augment\)"
    ):
        families.check_flags("gaussian", grid, {"augment": "none"})
    with pytest.raises(UserError, match=r"--lr: .* run none-epsinf-smallcnn-s0 .*\(grid.nonprivate.lr\)"):
        families.check_flags("baseline", grid, {"lr": 0.3})
    refs = GridConfig(gaussian=[1, 10], baselines=["none"], protocol="same")
    with pytest.raises(UserError, match=r"--lr: .*sched-short.* \(grid.schedules.short.reference_lr\)"):
        families.check_flags("baseline", refs, {"lr": 0.3})


def test_every_run_is_named_by_what_it_varies_and_belongs_to_a_registered_family():
    from dpcam import profiles

    runs = grid_runs(GridConfig())
    # the default: ε = ∞ (tuned) and, per DP schedule (short, long), ε = ∞ and clip-only with it; 4 Gaussian ε; on 3
    # seeds; on one, the clipping sweep (2 C × lr fixed / lr·C held) and train-size (none + 2 ε on 1000 images)
    assert len({r.name for r in runs}) == len(runs) == 5 * 3 + 4 * 3 + 4 + 3
    assert [r.name for r in runs][:3] == [
        "none-epsinf-smallcnn-s0",
        "none-epsinf-sched-short-smallcnn-s0",
        "clip-only-epsinf-sched-short-smallcnn-s0",
    ]
    repo = Path(__file__).resolve().parents[1]
    params = profiles.merge(
        yaml.safe_load((repo / "params.yaml").read_text()), profiles.load_overlay("full", repo / "profiles")
    )
    full = grid_runs(GridConfig.model_validate(params["grid"]))
    # full adds, on one seed: laplace, laplace-paper (3 ε), ldp (4), public, finetune-none, finetune-gaussian and
    # -laplace (3 ε)
    assert len({r.name for r in full}) == len(full) == len(runs) + 3 + 3 + 4 + 1 + 1 + 3 + 3
    assert {r.family for r in full} == set(families.FAMILIES)


@pytest.mark.parametrize(
    "family, flag, source",
    [
        ("baseline", "lr", "grid.nonprivate.lr"),
        ("baseline", "batch_size", "grid.nonprivate.batch_size"),
        ("laplace", "lr", "grid.laplace_lr"),
    ],
)
def test_a_flag_the_grid_sets_for_a_run_is_refused_not_lost(family, flag, source):
    with pytest.raises(UserError) as e:
        families.check_flags(family, tiny_grid(), {flag: 0.5})
    msg = str(e.value)
    assert msg.startswith(f"--{flag.replace('_', '-')}: the grid sets {flag} for run") and f"({source})" in msg


def test_flags_the_grid_leaves_alone_are_accepted():
    families.check_flags("gaussian", tiny_grid(), {"lr": 0.5, "batch_size": 64, "device": "cpu"})
    families.check_flags("baseline", tiny_grid(baselines=["clip-only"]), {"lr": 0.5})


def test_unknown_family_is_one_line():
    with pytest.raises(UserError, match="unknown grid family 'gausian'; known: baseline, gaussian"):
        families.family_runs(tiny_grid(), "gausian", families.MODELS_ROOT)


def test_family_seeds_and_the_protocol():
    grid = tiny_grid(seeds=[0, 1], family_seeds={"laplace": [7]}, protocol="same")
    runs = grid_runs(grid)
    assert {r.seed for r in runs if r.family == "laplace"} == {7} and {
        r.seed for r in runs if r.family == "gaussian"
    } == {0, 1}
    none = families.run_config(next(r for r in runs if r.scheme == "none"), grid, cfg(lr=0.5))
    assert none.lr == 0.5 and none.optimizer == "sgd"  # protocol same: the train section's recipe for every ε
    with pytest.raises(ValueError, match="unknown family 'lapalce'"):
        tiny_grid(family_seeds={"lapalce": [0]})


def test_laplace_paper_runs_at_the_laplace_eps_with_the_gaussian_recipe_named_nominal():
    grid, base = tiny_grid(laplace=[1, 5]), cfg(scheme="gaussian", lr=0.5, clip=1.0)
    runs = [r for r in grid_runs(grid) if r.family == "laplace-paper"]
    assert [r.name for r in runs] == ["laplace-paper-nominal1-smallcnn-s0", "laplace-paper-nominal5-smallcnn-s0"]
    c = families.run_config(runs[1], grid, base)
    assert (c.scheme, c.epsilon, c.clip, c.lr, c.delta) == ("laplace-paper", 5, 1.0, 0.5, base.delta)  # gaussian's


def test_public_pretraining_and_fine_tuning_families():
    grid = tiny_grid(
        laplace=[5],
        nonprivate={"optimizer": "sgd", "lr": 0.2, "batch_size": 16, "epochs": 3},
        finetune={
            "schemes": ["none", "gaussian", "laplace"],
            "epochs": 4,
            "batch_size": 64,
            "lr": 3.0,
            "clip": 2.0,
            "laplace_lr": 1.5,
            "laplace_clip": 6.0,
            "nonprivate": {"lr": 0.7, "batch_size": 32, "epochs": 5},
        },
    )
    base = cfg(scheme="gaussian", lr=0.5, clip=1.0)
    got = {s.name: (s, families.run_config(s, grid, base)) for s in grid_runs(grid)}
    trunk_spec, trunk = got["none-epsinf-public-smallcnn-s0"]
    assert trunk_spec.family == "public" and trunk.public and trunk.data_dir == Path("data/prepared/tiny-public")
    assert (trunk.lr, trunk.epochs, trunk.trainable) == (0.2, 3, "all")  # grid.nonprivate
    weights = "models/public/none-epsinf-public-smallcnn-s0/model.pt"
    g = got["gaussian-eps5-ft-head-smallcnn-s0"][1]
    assert (g.trainable, str(g.weights), g.lr, g.clip, g.epochs, g.batch_size) == ("head", weights, 3.0, 2.0, 4, 64)
    lap = got["laplace-eps5-ft-head-smallcnn-s0"][1]
    assert (lap.scheme, lap.lr, lap.clip, lap.epsilon) == ("laplace", 1.5, 6.0, 5)
    none = got["none-epsinf-ft-head-smallcnn-s0"][1]
    assert (none.lr, none.batch_size, none.epochs, none.optimizer) == (0.7, 32, 5, "sgd")
    assert str(none.weights) == weights and not none.public
    # real data: local trunk weights, no public trunk to train
    local = tiny_grid(
        finetune={"schemes": ["none", "gaussian", "laplace"], "weights": "trunk.pt", "trainable": "last-block"}
    )
    names = [r.name for r in grid_runs(local)]
    assert not any(n.endswith("public-smallcnn-s0") for n in names)
    ft = next(r for r in grid_runs(local) if r.family == "finetune-gaussian")
    assert ft.name == "gaussian-eps5-ft-last-block-smallcnn-s0" and ft.weights == "trunk.pt"
    # off
    off = tiny_grid(finetune={"schemes": []})
    assert not [r for r in grid_runs(off) if r.family == "public" or r.family.startswith("finetune-")]
    only = tiny_grid(finetune={"schemes": ["laplace"]})
    assert {r.family for r in grid_runs(only)} >= {"public", "finetune-laplace"}
    assert not [r for r in grid_runs(only) if r.family in ("finetune-gaussian", "finetune-none")]


@pytest.mark.parametrize(
    "family, flag, source",
    [
        ("finetune-gaussian", "lr", "grid.finetune.lr"),
        ("finetune-laplace", "lr", "grid.finetune.laplace_lr"),
        ("finetune-none", "epochs", "grid.finetune.nonprivate.epochs"),
        ("finetune-gaussian", "weights", "grid.finetune.weights"),
        ("public", "lr", "grid.nonprivate.lr"),
    ],
)
def test_a_fine_tuning_flag_the_grid_sets_names_its_key(family, flag, source):
    with pytest.raises(UserError) as e:
        families.check_flags(family, tiny_grid(), {flag: 0.5})
    assert f"({source})" in str(e.value)


def test_per_family_overrides_change_only_that_familys_runs():
    """grid.overrides: the paper profiles give Gaussian DP-SGD ghost clipping while Laplace keeps hooks."""
    grid = tiny_grid(overrides={"gaussian": {"grad_sample_mode": "ghost", "batch_size": 64}})
    base = cfg(scheme="gaussian", grad_sample_mode="hooks")
    got = {s.name: families.run_config(s, grid, base) for s in grid_runs(grid)}
    g = got["gaussian-eps2-smallcnn-s0"]
    assert (g.grad_sample_mode, g.batch_size) == ("ghost", 64)
    lap, sweep = got["laplace-eps5-smallcnn-s0"], got["gaussian-eps2-clip3-smallcnn-s0"]
    assert (lap.grad_sample_mode, lap.batch_size) == ("hooks", 32) and sweep.grad_sample_mode == "hooks"
    with pytest.raises(UserError, match=r"\(grid.overrides.gaussian.batch_size\)"):
        families.check_flags("gaussian", grid, {"batch_size": 16})


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"gausian": {"lr": 1}}, "unknown family 'gausian'"),
        ({"gaussian": {"learning_rate": 1}}, "gaussian: 'learning_rate' is not a train key a family can override"),
        ({"gaussian": {"epsilon": 3}}, "gaussian: 'epsilon' is not a train key a family can override"),
    ],
)
def test_bad_overrides_are_refused(overrides, words):
    with pytest.raises(ValueError, match=words):
        tiny_grid(overrides=overrides)


def test_the_paper_profiles_give_gaussian_ghost_and_keep_laplace_on_hooks():
    from dpcam import profiles

    for name in ("paper-aptos", "paper-catsdogs"):
        grid = profiles.load_overlay(name, Path(__file__).resolve().parents[1] / "profiles")["grid"]
        assert grid["overrides"]["gaussian"] == {"grad_sample_mode": "ghost"} and "laplace" not in grid["overrides"]


SCHEDULES = {
    "short": {"max_epsilon": 1, "epochs": 3, "batch_size": 64, "lr": 2.0, "reference_lr": 0.3},
    "long": {"max_epsilon": None, "epochs": 6, "batch_size": 128, "lr": 4.0, "ema": 0.9, "reference_lr": 0.5},
}


def test_each_eps_trains_with_its_schedule_and_each_schedule_has_its_references():
    grid = tiny_grid(gaussian=[1, 2], baselines=["none", "clip-only"], schedules=SCHEDULES, budget=12)
    got = {s.name: families.run_config(s, grid, cfg(scheme="gaussian", lr=0.5)) for s in grid_runs(grid)}
    g1, g2 = got["gaussian-eps1-smallcnn-s0"], got["gaussian-eps2-smallcnn-s0"]
    assert (g1.epochs, g1.batch_size, g1.lr, g1.ema) == (3, 64, 2.0, None)
    assert (g2.epochs, g2.batch_size, g2.lr, g2.ema) == (6, 128, 4.0, 0.9)
    assert got["none-epsinf-smallcnn-s0"].lr == 0.01  # the tuned reference keeps grid.nonprivate
    ref = got["none-epsinf-sched-long-smallcnn-s0"]  # ε = ∞ with the long schedule: its steps, its own lr
    assert (ref.scheme, ref.epochs, ref.batch_size, ref.lr, ref.ema) == ("none", 6, 128, 0.5, 0.9)
    clip = got["clip-only-epsinf-sched-short-smallcnn-s0"]  # clip-only: the DP recipe without noise
    assert (clip.scheme, clip.epochs, clip.batch_size, clip.lr, clip.clip) == ("clip-only", 3, 64, 2.0, 1.0)
    assert "clip-only-epsinf-smallcnn-s0" not in got  # with schedules, clipping is measured per schedule


def test_a_schedule_trains_its_band_and_a_schedule_no_eps_falls_in_has_no_references():
    bands = {"low": {"max_epsilon": 1}, "mid": {"max_epsilon": 4}, "high": {}}
    grid = tiny_grid(gaussian=[0.5, 1, 3, 10], baselines=["none", "clip-only"], schedules=bands)
    assert [grid.schedule_of(e) for e in (0.5, 1, 1.5, 4, 10, None)] == ["low", "low", "mid", "mid", "high", None]
    assert grid.active_schedules() == ["low", "mid", "high"]
    few = tiny_grid(gaussian=[0.5], baselines=["none", "clip-only"], schedules=bands)
    assert few.active_schedules() == ["low"]
    names = {s.name: families.schedule_of_run(s, grid) for s in grid_runs(grid)}
    assert names["gaussian-eps2-clip3-smallcnn-s0"] == "mid"  # the clipping sweep at ε = 2 trains the mid band's recipe
    assert names["laplace-eps5-smallcnn-s0"] is None and names["none-epsinf-sched-low-smallcnn-s0"] == "low"
    refs = {s.name for s in grid_runs(few) if s.family == "baseline"}
    assert refs == {
        "none-epsinf-smallcnn-s0",
        "none-epsinf-sched-low-smallcnn-s0",
        "clip-only-epsinf-sched-low-smallcnn-s0",
    }


def test_the_held_clipping_sweep_keeps_lr_times_c():
    grid = tiny_grid(clip_sweep={"epsilon": 2, "clips": [4]})
    got = {s.name: families.run_config(s, grid, cfg(scheme="gaussian", lr=0.5, clip=1.0)) for s in grid_runs(grid)}
    fixed, held = got["gaussian-eps2-clip4-smallcnn-s0"], got["gaussian-eps2-clip4-held-smallcnn-s0"]
    assert (fixed.clip, fixed.lr) == (4, 0.5) and (held.clip, held.lr) == (4, 0.125)


@pytest.mark.parametrize(
    "schedules, message",
    [
        ({"a": {"max_epsilon": 1}, "b": {"max_epsilon": 1}}, "a and b both have max_epsilon 1"),
        ({"a": {}, "b": {"max_epsilon": None}}, "a and b both have no bound"),
        ({"a": {"max_epsilon": 1}}, "no schedule's band holds Gaussian ε 2"),
        ({"a": {"epochs": 7, "aug_mult": 4, "augment": "flip-shift"}}, "more than the budget"),
        ({"a": {"aug_mult": 2}}, "aug_mult = 2 averages augmented views"),
        ({"a": {"ema": 1.5}}, "ema"),
        ({"a": {"ema": 0}}, "ema"),
        ({"a": {"aug_mult": 0}}, "aug_mult"),
        ({"Long!": {}}, "lowercase letters and digits"),
    ],
)
def test_bad_schedules_are_refused_before_any_training(schedules, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        tiny_grid(gaussian=[1, 2], schedules=schedules, budget=24)
