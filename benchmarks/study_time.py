"""Wall time of `dvc repro` of the default study, per stage: the figures of docs/benchmarks.md.

    .venv/bin/python benchmarks/study_time.py [--clone DIR]

Clones the repository (a fresh checkout, as CI and a new user have it) into DIR (default a temporary
folder), runs `dvc repro` there with this interpreter's environment, timestamps every line DVC
prints, and reports the wall time of each stage (from its "Running stage" line to the next one) and
the total, as a Markdown table. Run it on a quiet machine: other work on the cores inflates it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clone", type=Path, default=None)
    a = p.parse_args()
    clone = a.clone or Path(tempfile.mkdtemp(prefix="dpcam-study-")) / "repo"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(clone / "src"),
    }
    start = time.perf_counter()
    marks: list[tuple[str, float]] = []
    with subprocess.Popen(
        [Path(sys.executable).parent / "dvc", "repro"],
        cwd=clone,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    ) as proc:
        for line in proc.stdout:
            if line.startswith("Running stage '"):
                marks.append((line.split("'")[1], time.perf_counter() - start))
    total = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"dvc repro failed in {clone} (exit {proc.returncode})")
    print("| stage | wall (s) |\n|---|---:|")
    for (name, t), nxt in zip(marks, [*(m[1] for m in marks[1:]), total]):
        print(f"| {name} | {nxt - t:.0f} |")
    print(f"| **total** (`dvc repro`, {clone}) | **{total:.0f}** |")


if __name__ == "__main__":
    main()
