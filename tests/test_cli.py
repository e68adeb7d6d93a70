import json
import subprocess
import sys
from pathlib import Path

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
