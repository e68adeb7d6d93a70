"""The tracking store's door (dpcam.tracking.store): where the store is, many processes on one store, a fresh
store's creation, and its faults as one line."""

import os
from pathlib import Path

import pytest

from dpcam import tracking
from dpcam.tracking import store


def test_default_store_follows_the_current_folder_and_leaks_no_env(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    with tracking.run("exp", "first") as first:
        tracking.log_metrics({"m": 1.0})
    assert "MLFLOW_TRACKING_URI" not in os.environ
    monkeypatch.chdir(tmp_path / "b")
    with tracking.run("exp", "second"):
        pass
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'b' / 'mlruns' / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path / "a")
    assert tracking.get_run(first).data.metrics["m"] == 1.0
    assert (tmp_path / "a/mlruns/mlflow.db").exists() and (tmp_path / "b/mlruns/mlflow.db").exists()


def test_user_store_from_the_environment(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'team.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with tracking.run("exp", "x") as run_id:
        pass
    assert tracking.get_run(run_id).info.status == "FINISHED"
    assert (tmp_path / "team.db").exists() and not Path("mlruns/mlflow.db").exists()


def test_a_read_only_store_is_one_line_before_any_work():
    from dpcam.errors import UserError
    from tests.readonly import read_only

    with tracking.run("exp", "first"):
        pass
    with read_only(Path("mlruns/mlflow.db")):
        with pytest.raises(
            UserError, match=r"^MLflow tracking store sqlite:///.*mlflow\.db: unwritable \(cannot start a run: "
        ) as err:
            with tracking.run("exp", "second"):
                raise AssertionError("the block must not run")
    assert "\n" not in str(err.value)


def test_a_read_only_artifact_folder_is_refused_before_the_run_starts():
    from dpcam.errors import UserError
    from tests.readonly import read_only

    Path("note.txt").write_text("x")
    with tracking.run("exp", "first"):
        tracking.log_artifact("note.txt")
    with read_only(Path("mlruns/artifacts")):
        with pytest.raises(UserError, match=r"^MLflow artifact folder .*mlruns/artifacts: cannot write \("):
            with tracking.run("exp", "second"):
                raise AssertionError("the block must not run")
    runs = tracking.MlflowClient().search_runs([tracking._experiment_id("exp")])
    assert [r.info.run_name for r in runs] == ["first"]  # no FAILED run left behind


# ------------------------------------------------------------------------------------ many workers, one store


def _log_one_run(folder: str, uri: str | None, k: int) -> str:
    """A worker (its own process): one run with params, 20 metric steps and an artifact, as a training run logs."""
    os.chdir(folder)
    if uri:
        os.environ["MLFLOW_TRACKING_URI"] = uri
    with tracking.run("shared", f"worker-{k}", tags={"dpcam.worker": k}) as run_id:
        tracking.log_params({"k": k, "lr": 0.1 * k})
        for step in range(20):
            tracking.log_metrics({"loss": 1.0 / (step + 1 + k), "val_accuracy": 0.01 * step}, step=step)
        Path(f"note-{k}.txt").write_text(f"worker {k}")
        tracking.log_artifact(f"note-{k}.txt")
    return run_id


def _workers_log(folder: Path, uri: str | None, workers: int) -> list[str]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if uri is None:
        tracking.ensure_experiment("shared")  # as run_family does before it starts workers on the sqlite store
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_log_one_run, [str(folder)] * workers, [uri] * workers, range(workers)))


def _assert_complete(run_ids: list[str], workers: int) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    exp = client.get_experiment_by_name("shared")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    assert sorted(r.info.run_id for r in runs) == sorted(run_ids) and len(runs) == workers  # none lost
    for r in runs:
        k = int(r.data.params["k"])
        assert r.info.status == "FINISHED" and r.data.tags["dpcam.worker"] == str(k)
        history = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(20))  # none half-written
        assert [a.path for a in client.list_artifacts(r.info.run_id)] == [f"note-{k}.txt"]


@pytest.mark.slow
def test_concurrent_workers_share_the_default_sqlite_store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_ids = _workers_log(tmp_path, None, 6)
    tracking._setup()
    _assert_complete(run_ids, 6)


@pytest.mark.postgres
@pytest.mark.slow
def test_concurrent_workers_share_a_tracking_server_on_postgresql(postgres_url, tmp_path, monkeypatch):
    """docs/scale-out.md's cluster setup: `mlflow server` with a PostgreSQL backend, workers log over HTTP."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import psycopg

    monkeypatch.chdir(tmp_path)
    with psycopg.connect(postgres_url, autocommit=True) as db:  # its own database: the search tests use theirs
        db.execute("DROP DATABASE IF EXISTS mlflow_test")
        db.execute("CREATE DATABASE mlflow_test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = postgres_url.replace("postgresql://", "postgresql+psycopg://", 1).rsplit("/", 1)[0] + "/mlflow_test"
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend, "--host", "127.0.0.1",
         "--port", str(port), "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # creating MLflow's schema takes a while on a busy 2-core machine
        while time.monotonic() < deadline and server.poll() is None:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        run_ids = _workers_log(tmp_path, uri, 4)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        tracking._setup()
        _assert_complete(run_ids, 4)
    finally:
        server.terminate()
        server.wait(30)
        log.close()


# ------------------------------------------------------------------------------------ a fresh store, many processes


def _first_use(folder: str, k: int, barrier, results) -> None:
    """One process of the store-creation race: released with the others, it opens the fresh store through
    dpcam's door and logs a run as `dpcam train` (k < 4) or a search's parent and nested run (k >= 4) do."""
    os.chdir(folder)
    barrier.wait()
    try:
        if k < 4:
            with tracking.run("fresh", f"train-{k}", tags={"dpcam.worker": k}):
                tracking.log_params({"k": k})
                tracking.log_metrics({"loss": 1.0 / (k + 1)}, step=1)
        else:
            with tracking.parent_run("fresh", f"study-{k}", f"study-{k}"):
                with tracking.run("fresh", f"trial-{k}", nested=True, tags={"dpcam.worker": k}):
                    tracking.log_params({"k": k})
        results.put((k, "ok"))
    except BaseException as e:  # reported to the test, which fails naming it
        results.put((k, f"{type(e).__name__}: {str(e)[:300]}"))


@pytest.fixture(scope="module")
def forkserver():
    """Processes forked from a server that imported dpcam.tracking and MLflow's SQL store once: starting six of
    them costs little, and none inherits the test process's threads or open databases."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    modules = [
        "dpcam.tracking",
        "mlflow.store.tracking.sqlalchemy_store",
        "alembic.command",
        "tests.tracking.test_store",
    ]
    ctx.set_forkserver_preload(modules)
    return ctx


@pytest.fixture
def fresh_folder(tmp_path):
    """An empty folder, in memory (tmpfs) where the machine has one: creating MLflow's schema there skips ~50
    fsyncs, so a round of the race costs a third of the time, with the same file locks."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="dpcam-fresh-", dir=shm))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    else:
        (tmp_path / "fresh").mkdir()
        yield tmp_path / "fresh"


@pytest.mark.parametrize("attempt", range(10))
@pytest.mark.slow
def test_processes_starting_together_on_a_fresh_store_all_finish_and_leave_it_whole(fresh_folder, forkserver, attempt):
    """Issue 25, case 1: processes started together on a fresh folder raced to create and migrate mlflow.db
    ("table experiments already exists", "Online migration expected to match one row", _alembic_tmp_ tables
    left). Four train-like and two search-like processes, released at once by a barrier (no sleeps), ten
    times: every run FINISHED and the store passes SQLite's check with MLflow's current schema."""
    from mlflow.store.db.utils import _get_latest_schema_revision
    from mlflow.tracking import MlflowClient

    folder = fresh_folder
    barrier, results = forkserver.Barrier(6), forkserver.Queue()
    procs = [forkserver.Process(target=_first_use, args=(str(folder), k, barrier, results)) for k in range(6)]
    for p in procs:
        p.start()
    outcome = dict(results.get(timeout=600) for _ in procs)
    for p in procs:
        p.join(60)
    assert outcome == {k: "ok" for k in range(6)}
    os.chdir(folder)
    tracking.check_sqlite(Path("mlruns/mlflow.db"), "store")  # SQLite header, no _alembic_tmp_ table, quick_check
    import sqlite3

    with sqlite3.connect("mlruns/mlflow.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(_get_latest_schema_revision(),)]
    tracking._setup()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("fresh").experiment_id], max_results=100)
    workers = sorted(int(r.data.tags["dpcam.worker"]) for r in runs if "dpcam.worker" in r.data.tags)
    assert workers == list(range(6)) and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_four_trains_and_two_searches_started_together_on_a_fresh_folder_all_finish(tmp_path):
    """Issue 25, case 1 end to end: `dpcam train` x 4 and `dpcam search --trials 1` x 2 started together in a
    fresh folder (tiny data, one epoch): every process exits 0, every MLflow run is FINISHED, the store is whole.
    Once, not ten times: each process spends ~8 s importing torch, Opacus, Captum and MLflow; the store-creation
    race itself is repeated ten times above with light processes."""
    import subprocess
    import sys

    import yaml
    from mlflow.tracking import MlflowClient

    from tests.conftest import make_tiny

    make_tiny(masks=True)
    train = {"dataset": "tiny", "device": "cpu", "epochs": 1, "batch_size": 32, "delta": 1e-3, "accountant": "gdp"}
    search = {"schemes": ["gaussian"], "epochs": [1, 1], "batch_size": [32], "explain_images": 16, "population": 2}
    Path("params.yaml").write_text(yaml.safe_dump({"train": train, "explain": {"batch_size": 64}, "search": search}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    commands = [["train", "--scheme", "none", "--name", f"t{k}", "--seed", str(k)] for k in range(4)]
    commands += [["search", "--trials", "1", "--study-name", f"s{k}"] for k in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dpcam", *c], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for c in commands
    ]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outputs
    assert all("Traceback" not in out for out in outputs), outputs
    tracking.check_sqlite(Path("mlruns/mlflow.db"), "store")
    tracking._setup()
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=100)
    names = sorted(r.info.run_name for r in runs)
    assert names == ["s0", "s1", "t0", "t1", "t2", "t3", "trial-0", "trial-0"], names
    assert {r.info.status for r in runs} == {"FINISHED"}
    front = Path("reports/search/front.md").read_text()  # one search's whole report (they wrote it in turn)
    assert front.startswith("# Pareto front of study `s") and "## Cost of tuning" in front


# ------------------------------------------------------------------------------------ store faults, one line each


def _store_with_runs() -> Path:
    for i in range(20):
        with tracking.run("exp", f"r{i}"):
            tracking.log_params({"p": i, "text": "x" * 200})
            tracking.log_metrics({"m": float(i)}, step=i)
    store._opened.clear()  # as a new process: the next call opens (and checks) the store again
    return Path("mlruns/mlflow.db")


def _damage(db: Path, how: str) -> None:
    import sqlite3

    size = db.stat().st_size
    if how == "truncated to half":
        with open(db, "r+b") as f:
            f.truncate(size // 2)
    elif how == "garbage deep inside":
        with open(db, "r+b") as f:
            f.seek(size * 2 // 3)
            f.write(bytes(range(256)) * 32)
    elif how == "not a database":
        db.write_bytes(b"this is a text file, not a database\n" * 50)
    else:  # a migration that died half-way leaves alembic's temporary table
        with sqlite3.connect(db) as con:
            con.execute("CREATE TABLE _alembic_tmp_runs (run_uuid VARCHAR(32))")


@pytest.mark.parametrize(
    "how, why",
    [
        ("truncated to half", "corrupt (damaged"),
        ("garbage deep inside", "corrupt (damaged"),
        ("not a database", "corrupt (not a SQLite database)"),
        ("a half-finished migration", "corrupt (a half-finished migration: it holds _alembic_tmp_runs"),
    ],
)
def test_a_corrupt_store_is_named_corrupt_with_how_to_move_it_aside(how, why):
    """Issue 25, case 2: a truncated store was called unwritable ("make it writable"), garbage inside it gave a
    100-line traceback from log_params: now one line that says corrupt and how to move it aside."""
    from dpcam.errors import UserError

    db = _store_with_runs()
    _damage(db, how)
    for opened in (tracking.run("exp", "after"), tracking.parent_run("exp", "verdict", "key")):  # train; report
        with pytest.raises(UserError) as err:
            with opened:
                raise AssertionError("the block must not run")
        msg = str(err.value)
        assert msg.startswith(f"MLflow tracking store sqlite:///{db.resolve()}: {why}"), msg
        assert f"move it aside with `mv {db.resolve()} {db.resolve()}.broken`" in msg and "\n" not in msg
        assert "writable" not in msg


def test_a_store_damaged_while_a_process_uses_it_is_named_corrupt():
    """The check runs when a process opens the store; damage after that is named by the call that meets it."""
    from dpcam.errors import UserError

    db = _store_with_runs()
    tracking.open_store()
    _damage(db, "not a database")
    with pytest.raises(UserError, match=r": corrupt \(not a SQLite database\); move it aside"):
        with tracking.run("exp", "after"):
            pass


@pytest.fixture
def sqlite_lock_holder():
    """Another process that holds an exclusive lock on a store with runs until the test ends (it waits on its
    stdin, not on a timer); yields its pid."""
    import subprocess
    import sys

    _store_with_runs()
    code = (
        "import sqlite3, sys\n"
        "con = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "con.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.read()\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, "mlruns/mlflow.db"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(60)


def test_a_locked_store_names_the_process_that_holds_it(sqlite_lock_holder, monkeypatch):
    from dpcam.errors import UserError

    monkeypatch.setattr(store, "BUSY_WAIT", 0.5)
    with pytest.raises(UserError) as err:
        with tracking.run("exp", "after"):
            raise AssertionError("the block must not run")
    msg = str(err.value)
    assert msg.startswith(f"MLflow tracking store sqlite:///{Path('mlruns/mlflow.db').resolve()}: locked by pid ")
    assert f"pid {sqlite_lock_holder} (" in msg and f"kill {sqlite_lock_holder}" in msg and "\n" not in msg
    assert "corrupt" not in msg and "writable" not in msg


def test_a_full_disk_under_the_store_is_named_with_its_path():
    """SQLite's "database or disk is full" (ENOSPC, or EFBIG under `ulimit -f`) is a full disk, not a corrupt
    or unwritable store."""
    import sqlite3

    from dpcam.errors import UserError

    db = _store_with_runs().resolve()
    err = tracking.store_fault(sqlite3.OperationalError("database or disk is full"), "log metrics")
    assert isinstance(err, UserError) and str(err).startswith(f"{db}: cannot write, no space left on the device")
    assert tracking.store_fault(ValueError("a bug of ours"), "log metrics") is None
