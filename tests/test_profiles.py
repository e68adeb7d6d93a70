from pathlib import Path

import pytest
import yaml

from dpcam import config, profiles
from dpcam.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def _write(name: str, overlay) -> Path:
    Path("profiles").mkdir(exist_ok=True)
    path = Path("profiles") / f"{name}.yaml"
    path.write_text(yaml.safe_dump(overlay))
    return path


def test_an_overlay_becomes_dvc_set_params_for_exactly_its_keys():
    _write(
        "small",
        {
            "grid": {"seeds": [0, 1], "train_sizes": {"sizes": []}},
            "prepare": {"masks": None},
            "train": {"lr": 0.5, "delta": 1.0e-4},
        },
    )
    cmd = profiles.command("small")
    assert cmd[:5] == ["dvc", "exp", "run", "-n", "small"]
    sets = cmd[5:]
    assert sets[::2] == ["-S"] * (len(sets) // 2)
    assert sets[1::2] == [
        "profile=small",
        "grid.seeds=[0, 1]",
        "grid.train_sizes.sizes=[]",
        "prepare.masks=null",
        "train.delta=0.0001",
        "train.lr=0.5",
    ]


def test_the_merged_params_are_validated_before_anything_runs():
    _write("bad", {"train": {"lr": -1}})
    with pytest.raises(UserError, match=r"^profile bad: profiles/bad.yaml on top of params.yaml: train.lr = -1"):
        profiles.command("bad")
    _write("typo", {"trian": {"lr": 1}})
    with pytest.raises(UserError, match="unknown section 'trian'"):
        profiles.command("typo")
    with pytest.raises(UserError, match="no profile 'nope'.*profiles: bad, typo"):
        profiles.command("nope")


def test_merge_keeps_every_key_the_overlay_does_not_name():
    base = {"grid": {"seeds": [0], "name": "mine"}, "search": {"trials": 5}}
    assert profiles.merge(base, {"grid": {"seeds": [0, 1]}}) == {
        "grid": {"seeds": [0, 1], "name": "mine"},
        "search": {"trials": 5},
    }


@pytest.mark.parametrize("name", ["paper-aptos", "paper-catsdogs", "hospital-aptos", "quick", "full"])
def test_the_shipped_profiles_are_valid_overlays_of_the_shipped_params(name, tmp_path):
    overlay = profiles.load_overlay(name, REPO / "profiles")
    source = (overlay.get("prepare") or {}).get("source")
    if source:
        Path(source).mkdir(parents=True)  # the real dataset's folder (checked to exist)
    Path("params.yaml").write_text((REPO / "params.yaml").read_text())
    cmd = profiles.command(name, folder=REPO / "profiles")
    assert f"profile={name}" in cmd
    merged = profiles.merge(config.read_params(), overlay)
    for section in merged:
        if section in config.SECTIONS:
            assert merged[section].keys() <= config.SECTIONS[section].model_fields.keys()


def test_an_empty_mapping_is_refused_and_null_clears_one_as_dvc_exp_run_does():
    from dvc.utils.hydra import apply_overrides

    _write("empty", {"grid": {"schedules": {}}})
    with pytest.raises(UserError, match=r"empty.yaml: grid.schedules: \{\} keeps params.yaml's mapping.*write null"):
        profiles.command("empty")
    _write("off", {"grid": {"schedules": None}})
    Path("params.yaml").write_text((REPO / "params.yaml").read_text())
    sets = profiles.command("off")[5:]
    assert "grid.schedules=null" in sets
    apply_overrides("params.yaml", [s for s in sets[1::2] if s.startswith("grid.")])  # what `dvc exp run -S` does
    assert config.load_section("grid").schedules == {}
    assert (
        profiles.merge(config.read_params(REPO / "params.yaml"), {"grid": {"schedules": None}})["grid"]["schedules"]
        is None
    )


def test_the_paper_profiles_train_every_eps_with_the_papers_one_recipe():
    for name in ("paper-aptos", "paper-catsdogs"):
        assert profiles.load_overlay(name, REPO / "profiles")["grid"]["schedules"] is None
