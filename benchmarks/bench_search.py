"""Where a `dpcam search` trial's time goes, and a 20-trial search of the quick profile.

Part 1 (``--overhead``): a search of ``--trials`` trials on a tiny dataset (1 epoch, so the trial
itself is short and the overhead shows), once on sqlite and once on a throw-away PostgreSQL server
(Debian's binaries, started like the tests do; skipped when absent). Per trial: training,
explanation scoring, dpcam's bookkeeping inside the objective (MLflow nested run, model save,
trial attributes), and Optuna + storage outside the objective (sampler, trial creation, heartbeat
thread start, result write), = (wall of ``study.optimize`` − Σ objective time) / trials.

Part 2 (``--quick``): ``dpcam prepare`` of params.yaml's quick profile, then ``dpcam search`` with
``--trials`` trials (default 20), epochs reduced to ``--epochs LO HI`` to keep it near 15 minutes
on 2 cores; prints wall time and front size.

    python benchmarks/bench_search.py --overhead --trials 10
    python benchmarks/bench_search.py --quick --trials 20 --epochs 1 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _tiny(folder: Path) -> None:
    from tests.conftest import make_tiny

    make_tiny(n=600, size=16, root=folder / "data/prepared", masks=True)


def overhead(storage: str, trials: int, workdir: Path) -> dict:
    import optuna

    from dpcam import search as S
    from dpcam.config import ExplainConfig, SearchConfig, TrainConfig

    os.chdir(workdir)
    base = TrainConfig(
        dataset="tiny", model="smallcnn", delta=1e-3, accountant="gdp", device="cpu", epochs=1, batch_size=64
    )
    cfg = SearchConfig(
        trials=trials,
        storage=storage,
        study_name=f"bench-{int(time.time())}",
        schemes=["laplace"],
        epsilon=[2, 8],
        epochs=[1, 1],
        batch_size=[64],
        laplace_clip=[2, 20],
        laplace_lr=[0.1, 1],
        explain_images=64,
        population=4,
        sampler="nsga2",
        heartbeat=30,
    )
    explain = ExplainConfig(batch_size=64)
    calls = []
    orig = optuna.study.Study.optimize

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return orig(self, *a, **k)
        finally:
            calls.append(time.perf_counter() - t0)

    optuna.study.Study.optimize = timed
    try:
        res = S.search(cfg, base, explain, progress=False, report=False, echo=lambda m: None)
    finally:
        optuna.study.Study.optimize = orig
    t = res.timings
    n = len(t)
    obj = sum(r["objective"] for r in t)
    return {
        "storage": storage.split(":")[0],
        "trials": n,
        "train": sum(r["train"] for r in t) / n,
        "explain": sum(r["explain"] for r in t) / n,
        "bookkeeping": (obj - sum(r["train"] + r["explain"] for r in t)) / n,
        "optuna_storage": (calls[0] - obj) / n,
        "wall_per_trial": calls[0] / n,
    }


def postgres() -> tuple[str, callable]:
    import shutil
    import socket

    from tests.conftest import postgres_bindir

    bindir = postgres_bindir()
    if bindir is None:
        return None, lambda: None
    root = Path(tempfile.mkdtemp(prefix="dpcam-pg-bench-"))
    as_user = []
    if os.geteuid() == 0:
        os.chmod(root, 0o755)
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    run = lambda *c: subprocess.run([*as_user, *c], check=True, capture_output=True, timeout=120)
    run("mkdir", str(root / "sock"))
    run(str(bindir / "initdb"), "-D", str(root / "data"), "-U", "dpcam", "--auth=trust", "--no-sync")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run(
        str(bindir / "pg_ctl"),
        "-D",
        str(root / "data"),
        "-o",
        f"-p {port} -k {root / 'sock'} -c listen_addresses=127.0.0.1",
        "-l",
        str(root / "log"),
        "-w",
        "start",
    )

    def stop():
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(root / "data"), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql://dpcam@127.0.0.1:{port}/postgres", stop


def part_overhead(trials: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        _tiny(work)
        rows.append(overhead("sqlite:///mlruns/optuna.db", trials, work))
        url, stop = postgres()
        try:
            if url:
                rows.append(overhead(url, trials, work))
            else:
                print("PostgreSQL binaries not installed: PostgreSQL row skipped")
        finally:
            stop()
    print("| storage | trials | train s | explain s | bookkeeping s | Optuna + storage s | wall per trial s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['storage']} | {r['trials']} | {r['train']:.2f} | {r['explain']:.3f} | {r['bookkeeping']:.3f} | "
            f"{r['optuna_storage']:.3f} | {r['wall_per_trial']:.2f} |"
        )


def part_quick(trials: int, epochs: list[int]) -> None:
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        params = yaml.safe_load((ROOT / "params.yaml").read_text())
        params["search"] = {**(params.get("search") or {}), "epochs": epochs}
        (work / "params.yaml").write_text(yaml.safe_dump(params))
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
        dpcam = [sys.executable, "-m", "dpcam"]
        t0 = time.perf_counter()
        subprocess.run([*dpcam, "prepare"], cwd=work, env=env, check=True, capture_output=True)
        prep = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = subprocess.run(
            [*dpcam, "search", "--trials", str(trials)], cwd=work, env=env, check=True, capture_output=True, text=True
        ).stdout
        wall = time.perf_counter() - t0
        print(out)
        front = sum(1 for _ in open(work / "reports/search/front.csv")) - 1
        print(
            f"quick profile: prepare {prep:.0f} s; search of {trials} trials (epochs {epochs}) {wall:.0f} s "
            f"wall ({wall / trials:.1f} s per trial); front size {front}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--overhead", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trials", type=int, default=None)
    ap.add_argument("--epochs", type=int, nargs=2, default=[1, 2])
    a = ap.parse_args()
    if not (a.overhead or a.quick):
        a.overhead = a.quick = True
    if a.overhead:
        part_overhead(a.trials or 10)
    if a.quick:
        part_quick(a.trials or 20, a.epochs)


if __name__ == "__main__":
    main()
