from pathlib import Path

import pytest
import yaml

from dpcam import config
from dpcam.errors import UserError


def write_params(data) -> Path:
    p = Path("params.yaml")
    p.write_text(yaml.safe_dump(data))
    return p


def error_of(name, data=None, overrides=None) -> str:
    path = write_params(data or {})
    with pytest.raises(UserError) as e:
        config.load_section(name, overrides, path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


SHIPPED = Path(__file__).resolve().parents[1] / "params.yaml"


def test_defaults_are_the_shipped_params_file():
    """One place per value: a key deleted from params.yaml means what the shipped file says."""
    for name, section in config.SECTIONS.items():
        assert section().model_dump(mode="json") == config.load_section(name, path=SHIPPED).model_dump(mode="json"), (
            name
        )


def test_without_params_yaml_the_shipped_values_apply():
    cfg = config.load_section("prepare")  # no ./params.yaml in the test folder
    assert cfg.dataset == "synthetic-fundus" and cfg.size == 32 and cfg.format == "synthetic"
    assert config.load_section("ldp").epsilons == [0.25, 0.5, 1]


@pytest.mark.parametrize(
    "data, path, expected",
    [
        (None, "missing.yaml", "--params missing.yaml: no such file"),
        ({"prepare": {"size": 32}}, "params.yaml", "params.yaml: has no 'train' section; add it"),
        ({"trian": {"lr": 1}}, "params.yaml", "params.yaml: unknown top-level key 'trian'; sections are prepare"),
    ],
)
def test_a_missing_file_section_or_misspelled_section_is_refused(data, path, expected):
    if data is not None:
        write_params(data)
    with pytest.raises(UserError) as e:
        config.load_section("train", path=Path(path))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_the_shipped_params_file_is_valid():
    for name in config.SECTIONS:
        config.load_section(name, path=SHIPPED)


def test_flags_override_params():
    path = write_params({"prepare": {"size": 32, "synthetic": {"n": 100}}})
    cfg = config.load_section("prepare", {"size": 96, "synthetic.n": None}, path)
    assert cfg.size == 96 and cfg.synthetic.n == 100


@pytest.mark.parametrize(
    "data, overrides, expected",
    [
        ({"prepare": {"size": 8}}, None, "params.yaml: prepare.size = 8: Input should be greater than or equal to 16"),
        ({}, {"size": 8}, "--size: prepare.size = 8"),
        (
            {"prepare": {"split": {"train": 0.5, "val": 0.1, "test": 0.1}}},
            None,
            "prepare.split = {'test': 0.1, 'train': 0.5, 'val': 0.1}: the split fractions "
            "train + val + test must sum to 1 (they sum to 0.7)",
        ),
        ({"prepare": {"format": "cifar"}}, None, "prepare.format = 'cifar'"),
        ({"prepare": {"format": "aptos"}}, None, "prepare.source is required for format 'aptos'"),
        ({"prepare": {"format": "aptos", "source": "nowhere"}}, None, "prepare.source = 'nowhere': does not exist"),
        ({"prepare": {"sise": 64}}, None, "unknown key prepare.sise; allowed keys: dataset"),
        ({"prepare": {"dataset": "../x"}}, None, "prepare.dataset = '../x'"),
        ({"prepare": {"synthetic": {"balance": [1, 2]}}}, None, "give 5 non-negative shares"),
        ({"ldp": {"epsilons": [0.5, -1]}}, None, "ldp.epsilons[1] = -1: ε must be a finite number > 0"),
        ({"ldp": {"epsilons": [0]}}, None, "ε must be a finite number > 0"),
        ({"ldp": {"epsilons": [1.0]}}, None, "write whole numbers without '.0' (1)"),
        ({"ldp": {"mechanisms": ["gauss"]}}, None, "ldp.mechanisms[0] = 'gauss': unknown mechanism; known:"),
        ({"ldp": {"delta": 1.5}}, None, "ldp.delta = 1.5"),
    ],
)
def test_bad_values_give_one_line_naming_key_and_value(data, overrides, expected):
    section = next(iter(data), None) or "prepare"
    assert expected in error_of(section, data, overrides)


def test_invalid_yaml_names_the_line():
    Path("params.yaml").write_text("prepare:\n  size: [1\n")
    with pytest.raises(UserError, match=r"params.yaml:\d+: not valid YAML"):
        config.load_section("prepare", path=Path("params.yaml"))


def test_format_eps_has_no_trailing_zero():
    assert [config.format_eps(e) for e in (0.25, 1, 1.0, 10)] == ["0.25", "1", "1", "10"]


def test_prepared_dir_lists_what_exists():
    Path("data/prepared/a").mkdir(parents=True)
    Path("data/prepared/a/manifest.json").write_text("{}")
    with pytest.raises(UserError, match="unknown dataset 'b'.*prepared datasets: a"):
        config.prepared_dir("b")
    assert config.prepared_dir("a") == Path("data/prepared/a")


def test_bad_flag_values_name_the_flag():
    path = write_params({})
    with pytest.raises(UserError, match=r"^--mechanism: ldp.mechanisms\[0\] = 'nope': unknown mechanism"):
        config.load_section("ldp", {"mechanisms": ["nope"]}, path)
    with pytest.raises(UserError, match=r"^--epsilon: ldp.epsilons\[0\] = -2"):
        config.load_section("ldp", {"epsilons": [-2]}, path)
    with pytest.raises(UserError, match=r"^--n: prepare.synthetic.n = 3"):
        config.load_section("prepare", {"synthetic.n": 3}, path)


@pytest.mark.parametrize(
    "section, data, overrides, expected",
    [
        (
            "grid",
            {"grid": {"ldp": ["singh-sikka-eps1", "../x/y"]}},
            None,
            "params.yaml: grid.ldp[1] = '../x/y': not a plain name; use letters, digits, '_', '.' and '-' "
            "(starting with a letter or digit), not a path",
        ),
        ("grid", {"grid": {"ldp": ["a/b"]}}, None, "params.yaml: grid.ldp[0] = 'a/b': not a plain name"),
        ("train", {"train": {}}, {"scheme": "ldp", "ldp": "../../x"}, "--ldp: train.ldp = '../../x': not a plain name"),
        ("train", {"train": {}}, {"name": "/tmp/run"}, "--name: train.name = '/tmp/run': not a plain name"),
        ("prepare", {"prepare": {"dataset": ".."}}, None, "params.yaml: prepare.dataset = '..': not a plain name"),
        ("search", {"search": {"study_name": "a/b"}}, None, "params.yaml: search.study_name = 'a/b': not a plain"),
    ],
)
def test_a_path_where_a_name_belongs_is_one_clean_line_naming_the_key(section, data, overrides, expected):
    """Failed before: the raw pydantic text "String should match pattern '^[A-Za-z0-9]...'"."""
    msg = error_of(section, data, overrides)
    assert msg.startswith(expected) and "pattern" not in msg


def test_cli_refuses_an_ldp_path_and_an_unknown_model_before_any_run_starts():
    """`dpcam train --ldp ../../x` would write model files outside the project; an unknown model left a FAILED
    MLflow run. Both are refused by config: one line, exit 2, no MLflow store, no model folder."""
    from typer.testing import CliRunner

    from dpcam.cli import app

    for args, message in (
        (["train", "--scheme", "ldp", "--ldp", "../../x"], "--ldp: train.ldp = '../../x': not a plain name"),
        (["train", "--model", "nope"], "--model: train.model = 'nope': unknown model 'nope'; known models: "),
        (["train", "--scheme", "ldp", "--ldp", "/abs/x"], "--ldp: train.ldp = '/abs/x': not a plain name"),
    ):
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 2, res.output
        errors = [line for line in res.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), res.output
    assert sorted(p.name for p in Path(".").iterdir()) == [], "no mlruns/, models/ or data/ was created"


# ------------------------------------------------------------------------------------ numbers that match the maths


@pytest.mark.parametrize(
    "section, data, expected",
    [
        ("train", {"lr": float("inf")}, "params.yaml: train.lr = inf: Input should be a finite number"),
        ("train", {"lr": 1e300}, "train.lr = 1e+300: too large for the float32 arithmetic of training"),
        ("train", {"clip": float("inf")}, "train.clip = inf: Input should be a finite number"),
        ("train", {"epsilon": float("nan")}, "train.epsilon = nan: Input should be a finite number"),
        ("train", {"delta": float("nan")}, "train.delta = nan: Input should be a finite number"),
        ("train", {"momentum": float("nan")}, "train.momentum = nan: Input should be a finite number"),
        ("train", {"weight_decay": float("inf")}, "train.weight_decay = inf: Input should be a finite number"),
        ("grid", {"gaussian": [1, float("inf")]}, "grid.gaussian[1] = inf"),
        ("grid", {"laplace_lr": float("nan")}, "grid.laplace_lr = nan: Input should be a finite number"),
        ("grid", {"nonprivate": {"lr": float("inf")}}, "grid.nonprivate.lr = inf"),
        ("grid", {"clip_sweep": {"clips": [0.1, float("inf")]}}, "grid.clip_sweep.clips[1] = inf"),
        ("grid", {"overrides": {"gaussian": {"lr": float("inf")}}}, "gaussian.lr = inf: Input should be a finite"),
        ("ldp", {"delta": float("inf")}, "ldp.delta = inf: Input should be a finite number"),
        ("search", {"lr": [0.1, 1e300]}, "search.lr = [0.1, 1e+300]: too large for the float32"),
    ],
)
def test_non_finite_and_overflowing_numbers_are_refused(section, data, expected):
    """Issue 25, case 4: `train.lr: .inf` trained and saved NaN weights (FINISHED, exit 0); 1e300 overflowed in
    the optimiser with a traceback."""
    assert expected in error_of(section, {section: data})


def test_an_inf_flag_is_refused_naming_the_flag():
    assert error_of("train", overrides={"lr": float("inf")}).startswith("--lr: train.lr = inf: ")


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"gaussian": [1, 1]}, "grid.gaussian = [1, 1]: 1 is listed twice; list each value once"),
        ({"seeds": [0, 0]}, "grid.seeds = [0, 0]: 0 is listed twice"),
        ({"models": ["smallcnn", "smallcnn"]}, "grid.models = ['smallcnn', 'smallcnn']: 'smallcnn' is listed twice"),
        ({"laplace": [5, 1, 5]}, "grid.laplace = [5, 1, 5]: 5 is listed twice"),
        ({"baselines": ["none", "none"]}, "'none' is listed twice"),
        ({"ldp": ["dp-pix-eps1", "dp-pix-eps1"]}, "'dp-pix-eps1' is listed twice"),
        ({"train_sizes": {"sizes": [100, 100]}}, "grid.train_sizes.sizes = [100, 100]: 100 is listed twice"),
        ({"seeds": []}, "grid.seeds = []: empty; give at least one seed"),
        ({"models": []}, "grid.models = []: empty; give at least one model"),
    ],
)
def test_grid_lists_without_repeats_and_the_lists_every_family_needs_not_empty(data, expected):
    """Issue 25, case 4: `grid.gaussian: [1, 1]` trained one run twice (its sibling's lock failed it, the report
    counted it twice); `grid.seeds: []` made every family empty and `dpcam train --family` deleted its runs."""
    assert expected in error_of("grid", {"grid": data})


def test_a_family_is_dropped_by_emptying_its_own_list():
    grid = config.load_section("grid", None, write_params({"grid": {"gaussian": [], "ldp": [], "baselines": []}}))
    assert grid.gaussian == [] and grid.ldp == [] and grid.baselines == []


def test_the_shipped_recipes_are_the_ones_scripts_recipes_chose():
    import json

    repo = Path(__file__).resolve().parents[1]
    chosen = json.loads((repo / "docs/recipes.json").read_text())
    grid = config.load_section("grid", path=repo / "params.yaml")
    assert set(chosen["chosen"]) == set(grid.schedules)
    for band, keys in chosen["chosen"].items():
        shipped = grid.schedules[band].model_dump()
        assert {k: shipped[k] for k in keys} == keys, band
    np = grid.nonprivate
    assert chosen["nonprivate_chosen"] == f"sgd lr {np.lr:g}, batch {np.batch_size}, {np.epochs} epochs"
