import pytest

from dpcam import families
from dpcam.config import GridConfig, TrainConfig
from dpcam.errors import UserError
from dpcam.families import grid_runs


def cfg(**kw) -> TrainConfig:
    base = dict(dataset="tiny", model="smallcnn", epochs=2, batch_size=32, lr=0.1, device="cpu", seed=0)
    return TrainConfig(**{**base, **kw})


def _grid(**kw):
    base = dict(
        name="t",
        models=["smallcnn"],
        seeds=[0],
        gaussian=[2],
        laplace=[5],
        laplace_clip=7,
        laplace_lr=0.05,
        baselines=["none"],
        ldp=[],
        clip_sweep={"epsilon": 2, "clips": [3]},
        train_sizes={"sizes": [40], "gaussian": [2], "none": False},
        nonprivate={"optimizer": "adam", "lr": 0.01, "batch_size": 16},
    )
    return GridConfig.model_validate({**base, **kw})


def test_grid_config_applies_what_each_family_varies():
    grid, base = _grid(), cfg(scheme="gaussian", lr=0.5, clip=1.0)
    got = {s.name: families.run_config(s, grid, base) for s in grid_runs(grid)}
    none = got["none-epsinf-smallcnn-s0"]
    assert (none.scheme, none.optimizer, none.lr, none.batch_size) == ("none", "adam", 0.01, 16)
    lap = got["laplace-eps5-smallcnn-s0"]
    assert (lap.scheme, lap.epsilon, lap.clip, lap.lr, lap.optimizer) == ("laplace", 5, 7, 0.05, "sgd")
    sweep = got["gaussian-eps2-clip3-smallcnn-s0"]
    assert (sweep.epsilon, sweep.clip, sweep.lr) == (2, 3, 0.5)
    small = got["gaussian-eps2-n40-smallcnn-s0"]
    assert (small.train_size, small.clip, small.run_name) == (40, 1.0, "gaussian-eps2-n40-smallcnn-s0")


def test_every_run_is_named_by_what_it_varies_and_belongs_to_a_registered_family():
    grid = GridConfig()
    runs = grid_runs(grid)
    assert len({r.name for r in runs}) == len(runs) == 2 * 3 + 4 * 3 + 3 + 4 + 2 + 3  # headline families: 3 seeds
    assert {r.family for r in runs} == set(families.FAMILIES)
    assert [r.name for r in runs][:3] == [
        "none-epsinf-smallcnn-s0",
        "clip-only-epsinf-smallcnn-s0",
        "none-epsinf-smallcnn-s1",
    ]


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
        families.check_flags(family, _grid(), {flag: 0.5})
    msg = str(e.value)
    assert msg.startswith(f"--{flag.replace('_', '-')}: the grid sets {flag} for run") and f"({source})" in msg


def test_flags_the_grid_leaves_alone_are_accepted():
    families.check_flags("gaussian", _grid(), {"lr": 0.5, "batch_size": 64, "device": "cpu"})
    families.check_flags("baseline", _grid(baselines=["clip-only"]), {"lr": 0.5})


def test_unknown_family_is_one_line():
    with pytest.raises(UserError, match="unknown grid family 'gausian'; families: baseline, gaussian"):
        families.family_runs(_grid(), "gausian", families.MODELS_ROOT)


def test_family_seeds_and_the_protocol():
    grid = _grid(seeds=[0, 1], family_seeds={"laplace": [7]}, protocol="same")
    runs = grid_runs(grid)
    assert {r.seed for r in runs if r.family == "laplace"} == {7} and {
        r.seed for r in runs if r.family == "gaussian"
    } == {0, 1}
    none = families.run_config(next(r for r in runs if r.scheme == "none"), grid, cfg(lr=0.5))
    assert none.lr == 0.5 and none.optimizer == "sgd"  # protocol same: the train section's recipe for every ε
    with pytest.raises(ValueError, match="unknown family 'lapalce'"):
        _grid(family_seeds={"lapalce": [0]})
