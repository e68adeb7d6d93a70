"""The statistic behind the default non-inferiority margins (params.yaml ``verdict.margins``).

For each verdict measure: the mean absolute difference between two non-private (ε = ∞) models of
different training seeds — the baseline family's ``none`` runs of the grid — on the test metrics
their train.json and explain.json record. A private model that loses less than retraining the
non-private model with another seed would is not called worse (docs/verdict.md, "Margins").

Run it in a study folder after the ε = ∞ runs are trained and explained, **before** looking at the
private comparisons, and copy the values (rounded up) into params.yaml:

    .venv/bin/python scripts/margins.py [--params params.yaml]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

from dpcam import config
from dpcam.config.sections import MARGINS
from dpcam.families import grid_runs, pick
from dpcam.report.runs import load_run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=None)
    a = p.parse_args()
    grid = config.load_section("grid", None, a.params)
    for model in grid.models:
        runs = pick([load_run(s) for s in grid_runs(grid) if s.family == "baseline"], scheme="none", model=model)
        specs = [r.spec for r in runs]
        print(f"{model}: mean |difference| between two ε = ∞ seeds ({', '.join(s.name for s in specs)})")
        print("| measure | mean |Δ| over seed pairs | shipped margin |\n|---|---:|---:|")
        for key, shipped in MARGINS.items():
            values = [r.value(key) for r in runs]
            if any(v is None for v in values) or len(values) < 2:
                print(f"| {key} | — | {shipped:g} |")
                continue
            spread = statistics.mean(abs(x - y) for x, y in itertools.combinations(values, 2))
            print(f"| {key} | {spread:.4g} | {shipped:g} |")


if __name__ == "__main__":
    main()
