import os
from pathlib import Path

import pytest

from dpcam import report as rep
from tests.report.fakes import fake_grid, write_fake_runs


@pytest.fixture(scope="package")
def built(tmp_path_factory):
    """The fake grid's report, built once for the tests that only read it (laid out as ``dvc repro`` leaves it)."""
    root = tmp_path_factory.mktemp("report")
    old = os.getcwd()
    os.chdir(root)
    try:
        grid = fake_grid()
        write_fake_runs(grid, audits=("gaussian", "laplace", "baseline"))
        Path("reports/figures").mkdir(parents=True)
        Path("reports/ldp-tiny.png").write_bytes(b"\x89PNG fake")  # the ldp-figure stage's picture
        Path("reports/figures/cams.png").write_bytes(b"\x89PNG mine")  # `dpcam figure cams`'s default output
        summary = rep.report(grid)
    finally:
        os.chdir(old)
    return root, grid, summary


@pytest.fixture
def in_built(built, monkeypatch):
    monkeypatch.chdir(built[0])
    return built[1], built[2]
