import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dpcam.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, list(args))


def test_python_m_dpcam_lists_the_stage_commands():
    out = subprocess.run([sys.executable, "-m", "dpcam", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("prepare", "ldp", "train", "figure"):
        assert command in out.stdout


COMMANDS = ("prepare", "ldp", "figure", "train", "explain", "audit", "report", "search", "profile")


def test_every_command_is_listed_and_its_help_names_its_own_options():
    import typer.main

    assert sorted(typer.main.get_command(app).commands) == sorted(COMMANDS)
    own = {
        "prepare": "--size",
        "ldp": "--mechanism",
        "figure": "cams",
        "train": "--epsilon",
        "explain": "--target",
        "audit": "--fail-on-violation",
        "report": "--out",
        "search": "--trials",
        "profile": "--dry-run",
    }
    for command in COMMANDS:
        res = invoke(command, "--help")
        assert res.exit_code == 0, (command, res.output)
        assert f"Usage: root {command}" in res.output and own[command] in res.output, (command, res.output)


def test_prepare_then_ldp_then_figure():
    res = invoke("prepare", "--n", "60", "--size", "32", "--workers", "1")
    assert res.exit_code == 0, res.output
    manifest = json.loads(Path("data/prepared/synthetic-fundus/manifest.json").read_text())
    assert manifest["image_size"] == 32 and manifest["count"] == 60
    res = invoke("ldp", "--mechanism", "dp-pix", "--mechanism", "singh-sikka", "--epsilon", "1", "--epsilon", "0.5")
    assert res.exit_code == 0, res.output
    made = sorted(p.name for p in Path("data/ldp/synthetic-fundus").iterdir())
    assert made == ["dp-pix-eps0.5", "dp-pix-eps1", "singh-sikka-eps0.5", "singh-sikka-eps1"]
    res = invoke("figure", "ldp")
    assert res.exit_code == 0 and Path("reports/figures/ldp-synthetic-fundus.png").stat().st_size > 0


def test_params_file_defaults_and_flag_overrides():
    Path("p.yaml").write_text("prepare:\n  dataset: mine\n  size: 24\n  synthetic: {n: 30}\n")
    res = invoke("--params", "p.yaml", "prepare", "--size", "16", "--workers", "1")
    assert res.exit_code == 0, res.output
    m = json.loads(Path("data/prepared/mine/manifest.json").read_text())
    assert m["image_size"] == 16 and m["count"] == 30


def test_bad_input_is_one_line_exit_2_and_writes_nothing():
    cases = [
        (("prepare", "--size", "8"), "--size: prepare.size = 8"),
        (("prepare", "--format", "aptos", "--source", "nowhere"), "prepare.source = 'nowhere': does not exist"),
        (("prepare", "--format", "cifar"), "prepare.format = 'cifar'"),
        (("ldp", "--dataset", "nothing"), "unknown dataset 'nothing'"),
        (("ldp", "--mechanism", "blur"), "--mechanism: ldp.mechanisms[0] = 'blur': unknown mechanism"),
        (("ldp", "--epsilon", "0"), "--epsilon: ldp.epsilons[0] = 0"),
    ]
    for args, message in cases:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (args, res.output)
    assert not Path("data").exists()


def test_broken_params_file_is_one_line():
    Path("params.yaml").write_text("prepare: [\n")
    res = invoke("prepare")
    assert res.exit_code == 2 and res.output.startswith("error: params.yaml:")


def test_search_epochs_option_overrides_the_range(monkeypatch):
    import dpcam.search

    seen = {}
    monkeypatch.setattr(dpcam.search, "search", lambda cfg, base, explain, echo: seen.setdefault("cfg", cfg))
    res = invoke("search", "--trials", "0", "--epochs", "1", "3")
    assert res.exit_code == 0, res.output
    assert seen["cfg"].epochs == [1, 3]
    res = invoke("search", "--epochs", "3", "1")
    assert res.exit_code == 2
    assert res.output.strip().startswith("error: --epochs: search.epochs = [3, 1]: inverted range"), res.output


# ------------------------------------------------------------------------------- issue 25: stores and data


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A folder with tiny data and one run trained (1 epoch), explained and audited through the CLI."""
    import os

    from tests.conftest import make_tiny

    root = tmp_path_factory.mktemp("scored")
    old = os.getcwd()
    os.chdir(root)
    try:
        make_tiny(masks=True)
        flags = ["--scheme", "none", "--epochs", "1", "--batch-size", "32", "--lr", "0.1", "--device", "cpu"]
        for args in (
            ["train", "--dataset", "tiny", *flags, "--name", "r"],
            ["explain", "r", "--device", "cpu", "--max-images", "20", "--steps", "2"],
            ["audit", "r", "--device", "cpu", "--max-per-group", "20", "--attack", "loss"],
        ):
            res = invoke(*args)
            assert res.exit_code == 0, (args, res.output)
    finally:
        os.chdir(old)
    return root


@pytest.fixture
def in_copy(scored, tmp_path, monkeypatch):
    """A copy of the scored folder (each test damages its own), as the current folder."""
    import shutil

    shutil.copytree(scored, tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy")
    return tmp_path / "copy"


def _owned() -> dict[str, tuple[int, bytes]]:
    """Every file of models/, metrics/ and audits/ with its modification time and bytes."""
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes())
        for root in ("models", "metrics", "audits")
        for p in sorted(Path(root).rglob("*"))
        if p.is_file()
    }


STORE_COMMANDS = [
    ("train", "--dataset", "tiny", "--scheme", "none", "--epochs", "1", "--device", "cpu", "--name", "r"),
    ("train", "--dataset", "tiny", "--scheme", "none", "--epochs", "1", "--device", "cpu", "--name", "new"),
    ("explain", "r", "--device", "cpu", "--max-images", "20", "--steps", "2"),
    ("audit", "r", "--device", "cpu", "--max-per-group", "20", "--attack", "loss"),
    ("search", "--trials", "1", "--device", "cpu"),
]


@pytest.mark.parametrize(
    "damage, why",
    [
        ("not a database", "corrupt (not a SQLite database); move it aside with `mv "),
        ("truncated", "corrupt (damaged"),
        ("a half-finished migration", "corrupt (a half-finished migration: it holds _alembic_tmp_experiments"),
    ],
)
def test_a_store_fault_is_one_line_naming_it_and_touches_no_file_dpcam_owns(in_copy, damage, why):
    """Issue 25, case 2: every command that logs to MLflow names a store fault for what it is (exit 2, one line,
    never "make it writable" for a corrupt store) before it changes models/, metrics/ or audits/."""
    import sqlite3

    db = Path("mlruns/mlflow.db")
    if damage == "not a database":
        db.write_bytes(b"<html>not a database</html>\n" * 100)
    elif damage == "truncated":
        with open(db, "r+b") as f:
            f.truncate(db.stat().st_size // 2)
    else:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE _alembic_tmp_experiments (experiment_id INTEGER)")
    before = _owned()
    for args in STORE_COMMANDS:
        res = invoke(*args)
        assert res.exit_code == 2, (args, res.output)
        lines = res.output.strip().splitlines()
        assert len(lines) == 1, (args, lines)
        assert lines[0].startswith(f"error: MLflow tracking store sqlite:///{db.resolve()}: {why}"), (args, lines)
        assert "writable" not in lines[0]
    assert _owned() == before


def test_explain_and_audit_refuse_data_that_changed_since_training_unless_allowed(in_copy):
    """Issue 25, case 6: `dpcam prepare --size 48` (or another --n) after training, then `dpcam explain` / `dpcam
    audit` on the old run scored a 32-px model on 48-px images, and the audit's non-members included members."""
    from tests.conftest import make_tiny

    before = _owned()
    make_tiny(size=24, n=200, masks=True)  # the data folder now holds another draw, of another size
    for stage, extra in (("explain", ["--max-images", "20", "--steps", "2"]), ("audit", ["--attack", "loss"])):
        res = invoke(stage, "r", "--device", "cpu", *extra)
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("error: run r was trained on data/prepared/tiny as it was then"), lines
        assert ", 16 px, 240 images" in lines[0] and ", 24 px, 200 images" in lines[0]
    assert _owned() == before
    res = invoke("explain", "r", "--device", "cpu", "--max-images", "20", "--steps", "2", "--allow-data-change")
    assert res.exit_code == 0, res.output
    record = json.loads(Path("metrics/r/explain.json").read_text())
    assert record["data_change"].startswith("data changed since training (--allow-data-change): run r was trained")
    assert record["data_change"] in record["notes"]
    res = invoke("audit", "r", "--device", "cpu", "--max-per-group", "20", "--attack", "loss", "--allow-data-change")
    assert res.exit_code == 0, res.output
    assert json.loads(Path("audits/r/audit.json").read_text())["data_change"] == record["data_change"]
