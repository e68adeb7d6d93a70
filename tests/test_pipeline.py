"""dvc.yaml is what dpcam.pipeline writes from the family registry and the code each stage imports."""

from pathlib import Path

import yaml

from dpcam import pipeline
from dpcam.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_current():
    assert (REPO / "dvc.yaml").read_text() == pipeline.render(), "run `python -m dpcam.pipeline --write`"


def test_every_family_has_its_train_and_explain_stage_and_the_audit_covers_it():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, f in FAMILIES.items():
        assert stages[f"train-{name}"]["cmd"] == f"dpcam train --family {name}"
        assert stages[f"explain-{name}"]["outs"] == [f"metrics/{name}"]
        assert f"models/{name}" in stages["audit"]["deps"] and f"audits/{name}" in stages["audit"]["outs"]
        for key in f.grid_keys:
            assert (
                f"grid.{key}" in stages[f"train-{name}"]["params"]
                and f"grid.{key}" in stages[f"explain-{name}"]["params"]
            )


def test_the_import_graph_has_no_cycle():
    assert pipeline.cycles(pipeline.graph()) == []


def test_cycles_are_found():
    g = {"a": frozenset({"b"}), "b": frozenset({"c"}), "c": frozenset({"a"}), "d": frozenset()}
    assert pipeline.cycles(g) == [["a", "b", "c", "a"]]


def test_stage_deps_cover_the_code_each_command_runs():
    """The closure follows function-local imports: the explain stage runs train.load_model and models."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    explain = set(stages["explain-gaussian"]["deps"])
    assert {
        "src/dpcam/train.py",
        "src/dpcam/models.py",
        "src/dpcam/data/store.py",
        "src/dpcam/config/__init__.py",
        "src/dpcam/explain/metrics.py",
        "src/dpcam/cli.py",
    } <= explain
    assert "src/dpcam/report/__init__.py" not in explain and "src/dpcam/search/__init__.py" not in explain
    assert "src/dpcam/tracking.py" not in set(stages["prepare"]["deps"])  # prepare never logs to MLflow
    for name in ("train-gaussian", "audit", "report"):
        deps = set(stages[name]["deps"])
        missing = [p for p in pipeline.import_closure(pipeline.ENTRIES[name.split("-")[0]]) if p not in deps]
        assert not missing, (name, missing)


def test_import_closure_follows_from_imports_of_modules():
    closure = pipeline.import_closure("dpcam.train")
    assert "src/dpcam/privacy/engine.py" in closure and "src/dpcam/tracking.py" in closure  # lazy imports count
    assert "src/dpcam/privacy/__init__.py" in closure  # a package's __init__ runs on import


LAYERS = [
    "dpcam",
    "dpcam.errors",
    "dpcam.names",
    "dpcam.guard",
    "dpcam.layout",
    "dpcam.config",
    "dpcam.families",
    "dpcam.records",
    "dpcam.tracking",
    "dpcam.executor",
    "dpcam.data",
    "dpcam.layers",
    "dpcam.tvmodels",
    "dpcam.models",
    "dpcam.privacy",
    "dpcam.train",
    "dpcam.explain",
    "dpcam.audit",
    "dpcam.search",
    "dpcam.report",
    "dpcam.profiles",
    "dpcam.pipeline",
    "dpcam.cli",
    "dpcam.__main__",
]


def _layer(module: str) -> int:
    return max(i for i, name in enumerate(LAYERS) if module == name or module.startswith(name + "."))


def test_modules_import_only_the_layers_below_them():
    """The README's reading order: config is the ground floor, stages sit on it, the CLI on top."""
    upward = [
        (m, d)
        for m, deps in pipeline.graph().items()
        for d in deps
        if not m.startswith(d + ".") and _layer(d) > _layer(m)
    ]
    assert upward == []


def test_the_public_set_and_the_fine_tuning_families_are_stages():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    pub = stages["prepare-public"]
    assert pub["cmd"] == "dpcam prepare --public" and pub["outs"] == ["data/prepared/${prepare.dataset}-public"]
    assert "data/prepared/${prepare.dataset}" in pub["deps"]  # checked against the private set
    assert stages["train-public"]["deps"][0] == "data/prepared/${prepare.dataset}-public"
    for scheme in ("none", "gaussian", "laplace"):
        train = stages[f"train-finetune-{scheme}"]
        assert train["deps"][:2] == ["data/prepared/${prepare.dataset}", "models/public"]
        assert "grid.finetune" in train["params"] and "grid.laplace" in train["params"]
    assert "src/dpcam/data/public.py" in stages["train-finetune-gaussian"]["deps"]
    params = stages["audit"]["params"]
    assert len(params) == len(set(params)) and "grid.finetune.schemes" not in params  # grid.finetune covers it
