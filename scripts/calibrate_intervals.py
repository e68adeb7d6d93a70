"""Compute the table of :mod:`dpcam.report.coverage`: the inflation c(k, α) of the seed part in ν.

For each seed degrees of freedom k = S − 1 (1 … 9) and each level α of ``coverage.ALPHAS``, find
the smallest c whose interval errs at most α at every seed share (exact integration under the
normal model, :func:`dpcam.report.coverage.calibrate`), and write the table into
src/dpcam/report/coverage.py (the ``INFLATION = {...}`` literal). Prints the error rate range
over seed shares at each entry.

    .venv/bin/python scripts/calibrate_intervals.py          # a few minutes on one core
"""

from __future__ import annotations

import re
from pathlib import Path

from dpcam.report import coverage

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    rows = {}
    for k in range(1, 10):
        rows[k] = tuple(round(coverage.calibrate(k, a), 3) for a in coverage.ALPHAS)
        errs = [
            (a, [coverage.error_rate(w, k, c, a) / a for w in coverage.SHARES])
            for a, c in zip(coverage.ALPHAS, rows[k])
        ]
        print(f"k = {k}: c = {rows[k]}")
        for a, e in errs:
            print(f"    α = {a:g}: error / α from {min(e):.3f} to {max(e):.3f} over seed shares")
    body = "".join(f"    {k}: {v},\n" for k, v in rows.items())
    path = ROOT / "src/dpcam/report/coverage.py"
    text = path.read_text()
    new = re.sub(
        r"INFLATION: dict\[int, tuple\[float, \.\.\.\]\] = \{.*?\}\n",
        "INFLATION: dict[int, tuple[float, ...]] = {\n" + body + "}\n",
        text,
        count=1,
        flags=re.S,
    )
    path.write_text(new)
    print(f"wrote the table into {path}")


if __name__ == "__main__":
    main()
