import os
from pathlib import Path

import numpy as np
import pytest

from dpcam.data import store

os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu need CUDA; without it they are skipped, saying why."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _isolated_cwd(tmp_path, monkeypatch):
    """Every test runs in its own empty folder, so params.yaml, data/ and mlruns/ never leak."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield


def tiny_grid(**kw):
    """A small grid of every family but local DP, without DP schedules (the train section's recipe for every ε)."""
    from dpcam.config import GridConfig

    base = dict(
        name="t",
        models=["smallcnn"],
        seeds=[0],
        gaussian=[2],
        laplace=[5],
        laplace_clip=7,
        laplace_lr=0.05,
        baselines=["none"],
        ldp=[],
        clip_sweep={"epsilon": 2, "clips": [3]},
        train_sizes={"sizes": [40], "gaussian": [2], "none": False, "epochs": None},
        nonprivate={"optimizer": "adam", "lr": 0.01, "batch_size": 16, "epochs": 2},
        finetune={"schemes": ["none", "gaussian", "laplace"]},
        schedules=None,
    )
    return GridConfig.model_validate({**base, **kw})


def make_tiny(name="tiny", n=240, size=16, root=Path("data/prepared"), masks=False, per_patient=None):
    """Two classes a small CNN separates in a few epochs: class 1 has a bright centre square (its mask). With
    ``per_patient``, images come in patients of that many (groups.npy), split by patient."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, size, size, 3), dtype=np.uint8)
    c = size // 4
    images[labels == 1, c : 3 * c, c : 3 * c] += 120
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    groups = np.arange(n) // per_patient if per_patient else None
    splits = store.grouped_split(groups, fractions, 0) if per_patient else store.stratified_split(labels, fractions, 0)
    manifest = {"dataset": name, "classes": ["plain", "square"]}
    if per_patient:
        manifest["groups"] = {"names": [f"patient{g}" for g in range(int(groups.max()) + 1)]}
    with store.DatasetWriter(root / name, n, size, size, with_masks=masks) as w:
        w.images[:] = images
        if masks:
            w.masks[labels == 1, c : 3 * c, c : 3 * c] = 1
        w.finish(labels, splits, manifest, groups)
    return root / name


def postgres_bindir() -> Path | None:
    """Folder of Debian's PostgreSQL server binaries (initdb, pg_ctl), newest version first; None if absent."""
    import glob
    import shutil

    for folder in sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
        reverse=True,
    ):
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


@pytest.fixture(scope="session")
def postgres_url():
    """A throw-away PostgreSQL server on loopback (free port, socket in a temp folder); yields its URL.

    initdb refuses to run as root, so as root the server runs as ``nobody`` (via runuser). The URL
    carries a password that trust authentication ignores, so tests see it masked in messages.
    Skips only when PostgreSQL's binaries are not installed (``.ci/run`` installs them).
    """
    import shutil
    import socket
    import subprocess
    import tempfile

    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries are not installed (apt-get install postgresql; .ci/run does it)")
    root = Path(tempfile.mkdtemp(prefix="dpcam-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:
        os.chmod(root, 0o755)
        shutil.chown(root, "nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
    data, sock, logfile = root / "data", root / "sock", root / "server.log"

    def run(*cmd):
        return subprocess.run([*as_user, *cmd], check=True, capture_output=True, text=True, timeout=120)

    run("mkdir", str(sock))
    run(str(bindir / "initdb"), "-D", str(data), "-U", "dpcam", "--auth=trust", "-E", "UTF8", "--no-sync")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
    try:
        run(str(bindir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(logfile), "-w", "-t", "60", "start")
    except subprocess.CalledProcessError as e:
        log = logfile.read_text() if logfile.exists() else ""
        raise RuntimeError(f"PostgreSQL did not start: {e.stderr}\n{log}") from None
    try:
        yield f"postgresql://dpcam:s3cret@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)
