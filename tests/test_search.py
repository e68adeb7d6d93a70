"""dpcam search: small real Optuna studies on tiny data, resume, two workers on PostgreSQL, the front, bad input."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dpcam import names, tracking
from dpcam import search as S
from dpcam.cli import app
from dpcam.config import ExplainConfig, SearchConfig, load_section
from dpcam.errors import UserError
from tests.conftest import make_tiny

TRAIN = {
    "dataset": "tiny",
    "model": "smallcnn",
    "delta": 1.0e-3,
    "accountant": "gdp",
    "device": "cpu",
    "epochs": 1,
    "batch_size": 32,
}
# a trial on tiny data takes about a second (gdp: the fastest accountant to calibrate at q ≈ 0.2)
SPACE = {
    "schemes": ["laplace"],
    "epsilon": [2, 8],
    "epochs": [1, 2],
    "batch_size": [32, 48],
    "laplace_clip": [2, 20],
    "laplace_lr": [0.1, 1],
    "explain_images": 32,
    "population": 2,
    "heartbeat": 1,
    "grace_period": 2,
}


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    """An empty MLflow sqlite store with its schema made (MLflow's migrations take ~3 s per new store)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(autouse=True)
def _mlflow_store(_mlflow_template):
    """Every test (and worker folder, see ``write_params``) starts from the template store."""
    global TEMPLATE
    TEMPLATE = _mlflow_template
    yield


TEMPLATE: Path | None = None


def write_params(folder: Path = Path("."), **search) -> Path:
    if TEMPLATE is not None and not (folder / "mlruns/mlflow.db").exists():
        (folder / "mlruns").mkdir(parents=True, exist_ok=True)
        __import__("shutil").copyfile(TEMPLATE, folder / "mlruns/mlflow.db")
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump({"train": TRAIN, "explain": {"batch_size": 64}, "search": {**SPACE, **search}}))
    return path


def configs(**search):
    write_params(**search)
    return load_section("search"), load_section("train"), load_section("explain")


def quiet(msg):  # echo for in-process searches
    pass


def cli(*args, cwd=".", **popen):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, "-m", "dpcam", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def brute_force_front(values: np.ndarray) -> set[int]:
    """Indices of rows not dominated by any other (minimise column 0, maximise columns 1 and 2)."""
    v = values * np.array([-1.0, 1.0, 1.0])  # all maximised
    out = set()
    for i in range(len(v)):
        dominated = any(np.all(v[j] >= v[i]) and np.any(v[j] > v[i]) for j in range(len(v)) if j != i)
        if not dominated:
            out.add(i)
    return out


# ------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "search, expected",
    [
        (
            {"epsilon": [8, 2]},
            "params.yaml: search.epsilon = [8, 2]: inverted range (low 8 > high 2); write [low, high]",
        ),
        ({"clip": []}, "params.yaml: search.clip = []: empty range; give [low, high]"),
        ({"epochs": [3, 1]}, "search.epochs = [3, 1]: inverted range"),
        ({"batch_size": []}, "search.batch_size = []: empty list of choices"),
        ({"lr": [0, 1]}, "search.lr = [0, 1]: both ends must be finite numbers > 0"),
        (
            {"objective": "sharpness"},
            "search.objective = 'sharpness': unknown objective metric; known: masked_score_pct, avg_drop_pct",
        ),
        ({"trials_distribution": "poisson"}, "search.trials_distribution = 'poisson' needs sampler 'random'"),
    ],
)
def test_bad_search_section_is_one_line_exit_2(search, expected):
    write_params(**search)
    res = CliRunner().invoke(app, ["search", "--trials", "0"])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line and line.startswith("error: ") and expected in line


def test_unknown_objective_flag_names_the_flag():
    write_params()
    res = CliRunner().invoke(app, ["search", "--objective", "nope"])
    assert res.exit_code == 2 and res.output.startswith("error: --objective: search.objective = 'nope'")


def test_unreachable_storage_is_one_line_with_the_password_masked():
    make_tiny()
    write_params()
    url = "postgresql://alice:hunter2@127.0.0.1:1/optuna"
    res = CliRunner().invoke(app, ["search", "--trials", "1", "--storage", url])
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert "\n" not in out and "hunter2" not in out
    assert out.startswith("error: --storage postgresql://alice:***@127.0.0.1:1/optuna: cannot open the study storage")


def test_sqlite_storage_in_a_missing_folder_is_refused():
    with pytest.raises(UserError, match=r"folder nowhere does not exist"):
        S.open_storage("sqlite:///nowhere/x.db", heartbeat=1, grace_period=None, max_retry=0)
    S.open_storage(S.DEFAULT_STORAGE, heartbeat=1, grace_period=None, max_retry=0)  # the default's mlruns/ is made
    assert Path("mlruns/optuna.db").is_file()


def test_mask_url():
    assert S.mask_url("postgresql://u:p%40ss@db.example:5432/x") == "postgresql://u:***@db.example:5432/x"
    assert S.mask_url("sqlite:///mlruns/optuna.db") == "sqlite:///mlruns/optuna.db"


@pytest.mark.slow
def test_a_study_with_other_objectives_or_dataset_is_refused():
    cfg = SearchConfig()
    storage = S.open_storage("sqlite:///optuna.db", heartbeat=5, grace_period=None, max_retry=0)
    study, created = S.open_study(storage, cfg, "s", S.OBJECTIVES["masked_score_pct"], "tiny")
    assert created and study.user_attrs[S.ATTR_OBJECTIVES] == ["epsilon", "val_accuracy", "masked_score_pct"]
    again, created = S.open_study(storage, cfg, "s", S.OBJECTIVES["masked_score_pct"], "tiny")
    assert not created and again._study_id == study._study_id
    with pytest.raises(
        UserError,
        match=r"^study 's' in sqlite:///optuna.db was created with other objectives "
        r"\(epsilon \(minimize\), val_accuracy \(maximize\), masked_score_pct \(maximize\)\); "
        r"this search has epsilon \(minimize\), val_accuracy \(maximize\), 100 - avg_drop_pct",
    ):
        S.open_study(storage, cfg, "s", S.OBJECTIVES["avg_drop_pct"], "tiny")
    with pytest.raises(UserError, match="searches dataset 'tiny', not 'other'"):
        S.open_study(storage, cfg, "s", S.OBJECTIVES["masked_score_pct"], "other")
    optuna.create_study(storage=storage, study_name="foreign", directions=["minimize", "maximize", "maximize"])
    with pytest.raises(UserError, match="was not created by dpcam search"):
        S.open_study(storage, cfg, "foreign", S.OBJECTIVES["masked_score_pct"], "tiny")


def test_a_new_study_names_its_metrics_for_the_dashboard():
    storage = S.open_storage("sqlite:///optuna.db", heartbeat=5, grace_period=None, max_retry=0)
    study, created = S.open_study(storage, SearchConfig(), "s", S.OBJECTIVES["avg_drop_pct"], "tiny")
    assert created and study.metric_names == ["epsilon", "val_accuracy", "100 - avg_drop_pct"]
    again, created = S.open_study(storage, SearchConfig(), "s", S.OBJECTIVES["avg_drop_pct"], "tiny")
    assert not created and again.metric_names == study.metric_names
    assert optuna.load_study(study_name="s", storage="sqlite:///optuna.db").metric_names == study.metric_names


def test_objective_registry_matches_names():
    assert set(S.OBJECTIVES) == set(names.OBJECTIVES)


def test_objective_needing_masks_on_data_without_masks():
    make_tiny(masks=False)
    cfg, base, explain = configs(objective="pointing_game")
    with pytest.raises(UserError, match="needs lesion masks and data/prepared/tiny has none"):
        S.search(cfg, base, explain, echo=quiet)


# ------------------------------------------------------------------------------- pieces


def test_degenerate_model_gets_the_worst_explanation_value_and_says_why():
    from dpcam.data.store import load_dataset
    from dpcam.models import create_model

    make_tiny(masks=True)
    data = load_dataset("data/prepared/tiny")
    model = create_model("smallcnn", 2, 16, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # constant output: masking changes nothing, a "perfect" Average Drop
    explain = ExplainConfig(batch_size=16)
    q = S.explanation_quality(model, data.split("val"), 2, S.OBJECTIVES["avg_drop_pct"], explain, 20, "cpu")
    assert q["mean"] == pytest.approx(0.0, abs=1e-6)  # Average Drop 0 would be the best value...
    assert q["degenerate"] and q["value"] == 0.0 and any("input-insensitive" in r for r in q["reasons"])
    assert q["images"] == 20


def test_front_equals_brute_force_on_a_synthetic_study_with_ties():
    rng = np.random.default_rng(3)
    values = np.round(rng.uniform(0, 4, (40, 3)), 1)  # coarse values: ties and duplicates
    values[5] = values[6]
    study = optuna.create_study(directions=list(S.DIRECTIONS))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for v in values:
        study.add_trial(optuna.create_trial(values=list(v), params={"x": 0.5}, distributions=dist))
    got = {t.number for t in S.pareto_front(study)}
    assert got == brute_force_front(values) and len(got) >= 3


# ------------------------------------------------------------------------------- real studies


@pytest.mark.slow
def test_small_real_study_front_report_tracking_and_cost():
    make_tiny(masks=True)
    cfg, base, explain = configs(schemes=["laplace", "gaussian"], trials=4, sampler="nsga2", epochs=[1, 1])
    res = S.search(cfg, base, explain, echo=quiet)
    study = optuna.load_study(study_name="dpcam-tiny", storage="sqlite:///mlruns/optuna.db")
    trials = study.get_trials()
    assert res.trials_run == 4 and [t.state.name for t in trials] == ["COMPLETE"] * 4
    for t in trials:
        eps, acc, quality = t.values
        a = t.user_attrs
        assert eps == a["epsilon"] <= t.params["epsilon"] * (1 + 1e-6)  # the accountant's ε of the noise actually used
        assert a["noise_multiplier"] > 0 and a["steps"] > 0 and 0 <= acc <= 1
        assert (quality == 0.0) if a["degenerate"] else (quality == a["explain_mean"] > 0)
        assert a["train_config"]["scheme"] == t.params["scheme"] and "test_accuracy" not in a
    # the front: exactly the non-dominated trials, each with test metrics, in front.csv
    values = np.array([t.values for t in trials])
    front = {t.number for t in S.pareto_front(study)}
    assert front == brute_force_front(values)
    out = Path("reports/search")
    rows = list(__import__("csv").DictReader(open(out / "front.csv")))
    assert {int(r["trial"]) for r in rows} == front
    assert all(0 <= float(r["test_accuracy"]) <= 1 and r["model_source"] == "saved" for r in rows)
    assert {p.name for p in out.iterdir()} >= {
        "front.md",
        "front.csv",
        "trials.csv",
        "cost.json",
        "index.html",
        "pareto_3d.png",
        "pareto_01.png",
        "pareto_02.png",
        "pareto_12.png",
    }
    assert "test_accuracy" not in (out / "trials.csv").read_text()  # test metrics only for the front
    # only front members' models are kept
    kept = {int(p.name.split("-")[1]) for p in Path("models/search/dpcam-tiny").iterdir()}
    assert kept == front
    # cost: adaptive sampler, composition only
    cost = json.loads((out / "cost.json").read_text())
    assert "adaptive" in cost["statement"] and cost["random_search_epsilon"] is None
    assert max(values[:, 0]) < cost["composed_epsilon"] <= cost["basic_epsilon"] + 1e-9
    # MLflow: a parent run with one nested run per trial, params and the three objectives
    children = _child_runs(res.mlflow_run_id)
    assert sorted(c["run_name"] for c in children) == [f"trial-{i}" for i in range(4)]
    for c in children:
        t = trials[int(c["run_name"].split("-")[1])]
        assert c["metrics"]["epsilon"] == pytest.approx(t.values[0]) and "masked_score_pct" in c["metrics"]
        assert c["metrics"]["degenerate"] in (0.0, 1.0) and c["params"]["scheme"] == t.params["scheme"]
    parent = tracking.get_run(res.mlflow_run_id)
    assert parent.data.metrics["front_size"] == len(front) and parent.info.status == "FINISHED"
    # a second process resumes the same study and the same parent run
    cfg2, _, _ = configs(schemes=["laplace", "gaussian"], trials=1, sampler="nsga2", epochs=[1, 1])
    res2 = S.search(cfg2, base, explain, echo=quiet)
    assert res2.mlflow_run_id == res.mlflow_run_id and len(study.get_trials()) == 5
    assert len(_child_runs(res.mlflow_run_id)) == 5


def test_random_count_search_runs_the_drawn_number_and_reports_the_bound():
    make_tiny()
    cfg, base, explain = configs(
        sampler="random", trials_distribution="poisson", trials=2, batch_size=[48], epochs=[1, 1]
    )
    res = S.search(cfg, base, explain, echo=quiet)
    study = optuna.load_study(study_name="dpcam-tiny", storage="sqlite:///mlruns/optuna.db")
    drawn = study.user_attrs[S.ATTR_DRAWN]
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == drawn and set(states) <= {"COMPLETE", "PRUNED"}
    if drawn:
        assert "Theorem 6, Poisson" in res.cost["statement"] and res.cost["random_search_epsilon"] > 0
        assert res.cost["trials_drawn"] == drawn


@pytest.mark.slow
def test_search_epochs_reach_the_trials_and_the_worst_case(monkeypatch):
    from dpcam.data.store import load_dataset
    from dpcam.privacy import tuning
    from dpcam.privacy.plan import training_plan

    make_tiny()
    cfg, base, explain = configs(sampler="random", trials=2, batch_size=[48], epochs=[1, 1])
    S.search(cfg, base, explain, echo=quiet)
    study = optuna.load_study(study_name="dpcam-tiny", storage="sqlite:///mlruns/optuna.db")
    train_size = len(load_dataset("data/prepared/tiny").split("train"))
    q, steps = training_plan(train_size, 48, 1)
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 2
    for t in trials:
        assert t.params["epochs"] == 1 and t.user_attrs["train_config"]["epochs"] == 1
        assert t.user_attrs["steps"] == steps and t.user_attrs["sample_rate"] == pytest.approx(q)
    # the random-search bound's worst case is taken over the search section's epochs
    seen = []
    worst = tuning.worst_case_mechanisms
    monkeypatch.setattr(tuning, "worst_case_mechanisms", lambda *a: seen.append(a) or worst(*a))
    random_count = cfg.model_copy(update={"trials_distribution": "poisson", "epochs": [1, 2]})
    S.tuning_cost(study, random_count, base, train_size)
    assert seen == [(["laplace"], [48], [1, 2], 8.0, base.delta, base.accountant, train_size)]


def _child_runs(parent_run_id: str) -> list[dict]:
    """The runs nested in ``parent_run_id`` as the MLflow client sees them: run_name, status, params, metrics, tags."""
    from mlflow.tracking import MlflowClient

    tracking._setup()
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=10000
    )
    return [
        {
            "run_name": r.info.run_name,
            "status": r.info.status,
            **{k: dict(getattr(r.data, k)) for k in ("params", "metrics", "tags")},
        }
        for r in runs
    ]


def _trials(url: str, name: str):
    try:
        return optuna.load_study(study_name=name, storage=url).get_trials()
    except Exception:
        return []


def _worker(trials: int) -> None:
    """A search in a forked process (the test's imports are inherited: no start-up cost)."""
    cfg, base, explain = configs(trials=trials, sampler="random")
    S.search(cfg, base, explain, echo=quiet)
    os._exit(0)


def _wait_for(condition, seconds: float) -> bool:
    """Poll ``condition`` until it holds or ``seconds`` pass (waiting on state, never a fixed sleep)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _running_with_heartbeat(url: str, complete: int) -> bool:
    """At least ``complete`` trials finished and one running trial has a recorded heartbeat."""
    import sqlite3

    trials = _trials(url, "dpcam-tiny")
    running = [t._trial_id for t in trials if t.state.name == "RUNNING"]
    if sum(t.state.name == "COMPLETE" for t in trials) < complete or not running:
        return False
    with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
        beats = {r[0] for r in db.execute("SELECT trial_id FROM trial_heartbeats")}
    return any(i in beats for i in running)


def _stale(url: str) -> bool:
    """Optuna's own test of a stale trial says the killed one is stale."""
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=1, grace_period=2)
    study_id = storage.get_study_id_from_name("dpcam-tiny")
    return bool(storage._get_stale_trial_ids(study_id))


@pytest.mark.slow
def test_resume_after_a_killed_worker_keeps_finished_trials_and_retries_the_killed_one():
    import multiprocessing

    make_tiny()
    write_params(trials=20, sampler="random")
    url = "sqlite:///mlruns/optuna.db"
    worker = multiprocessing.get_context("fork").Process(target=_worker, args=(20,))
    worker.start()
    # kill it mid-trial: two trials finished and one running whose heartbeat is recorded (Optuna never calls a
    # trial without a heartbeat stale, so a kill between its creation and its first heartbeat would strand it)
    assert _wait_for(lambda: _running_with_heartbeat(url, 2), 90), "no running trial after two finished ones"
    os.kill(worker.pid, signal.SIGKILL)  # no chance to clean up: the heartbeat stops
    worker.join(30)
    before = {t.number: (t.state.name, t.values) for t in _trials(url, "dpcam-tiny")}
    finished = {n: v for n, (s, v) in before.items() if s == "COMPLETE"}
    killed = [n for n, (s, _) in before.items() if s == "RUNNING"]
    assert len(finished) >= 2 and len(killed) == 1
    # past the grace period by the database's clock (sqlite's now() has whole seconds): the trial is stale now
    assert _wait_for(lambda: _stale(url), 30), "the killed trial never became stale"
    res = CliRunner().invoke(app, ["search", "--trials", "1"])
    assert res.exit_code == 0, res.output
    after = {t.number: t for t in _trials(url, "dpcam-tiny")}
    for n, values in finished.items():  # every finished trial kept, unchanged
        assert after[n].state.name == "COMPLETE" and after[n].values == values
    assert after[killed[0]].state.name == "FAIL"
    retries = [t for t in after.values() if t.system_attrs.get("failed_trial") == killed[0]]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    # retried with the settings the killed trial had drawn (all of them, unless the kill came while it
    # was still drawing: the poll above can see RUNNING between two suggest calls)
    drawn = after[killed[0]].params
    assert drawn and drawn.items() <= retries[0].params.items()
    assert "resumed with" in res.output


@pytest.mark.slow
@pytest.mark.postgres
def test_two_workers_share_one_postgresql_study(postgres_url, tmp_path):
    k = 2
    workers = []
    for i in range(2):  # two "machines": each its own folder, data and MLflow store
        folder = tmp_path / f"worker{i}"
        folder.mkdir()
        make_tiny(root=folder / "data/prepared")
        write_params(folder, sampler="nsga2", seed=0)
        workers.append(
            (folder, cli("search", "--trials", str(k), "--storage", postgres_url, "--study-name", "shared", cwd=folder))
        )
    outs = []
    for _folder, w in workers:
        out, _ = w.communicate(timeout=150)
        assert w.returncode == 0, out
        assert "s3cret" not in out
        outs.append(out)
    study = optuna.load_study(study_name="shared", storage=postgres_url)
    trials = study.get_trials()
    numbers = [t.number for t in trials]
    assert len(trials) == 2 * k and sorted(numbers) == list(range(2 * k))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.user_attrs["worker"] for t in trials}) == 2  # both workers ran trials of the one study
    assert sum(": created;" in o for o in outs) == 1  # one created it, the other joined
    assert len({t._trial_id for t in trials}) == 2 * k
    # the report of the whole study, on one machine: other workers' front members are retrained there
    os.chdir(workers[0][0])
    res = CliRunner().invoke(app, ["search", "--trials", "0", "--storage", postgres_url, "--study-name", "shared"])
    assert res.exit_code == 0, res.output
    rows = list(__import__("csv").DictReader(open(workers[0][0] / "reports/search/front.csv")))
    assert {int(r["trial"]) for r in rows} == {t.number for t in study.best_trials}
    assert all(r["test_accuracy"] and r["model_source"] in ("saved", "retrained") for r in rows)


# ------------------------------------------------------------------------------- issue 25: stores and the report


def test_a_corrupt_study_storage_is_named_corrupt_with_how_to_move_it_aside():
    Path("mlruns").mkdir()
    Path("mlruns/optuna.db").write_bytes(b"PK\x03\x04 a zip file, not a database" * 40)
    with pytest.raises(UserError) as err:
        S.open_storage(S.DEFAULT_STORAGE, heartbeat=1, grace_period=None, max_retry=0)
    assert str(err.value) == (
        "Optuna study storage mlruns/optuna.db: corrupt (not a SQLite database); move it aside with "
        "`mv mlruns/optuna.db mlruns/optuna.db.broken` and run the command again (a new store is made; what was "
        "logged so far stays in the moved file)"
    )


def test_two_searches_never_write_the_report_at_once(monkeypatch):
    """Issue 25, case 7: reports/search/ had no lock, so two searches finishing together overwrote each other's
    report half-way. The writer holds reports/.search.lock; one that cannot get it in time names the holder."""
    from dpcam.search import report

    cfg, base, explain = configs()
    ctx = S.SearchContext(cfg, base, explain, S.OBJECTIVES[cfg.objective], "dpcam-tiny", "tiny")
    Path("reports").mkdir()
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from dpcam import layout\n"
        "with layout.locked(Path('reports/.search.lock'), 'reports/search/', timeout=5, fix='wait'):\n"
        "    print('held', flush=True)\n"
        "    sys.stdin.read()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        monkeypatch.setattr(report, "REPORT_WAIT", 0.3)
        with pytest.raises(UserError) as err:
            S.write_report(None, ctx, {})
        assert str(err.value).startswith(f"reports/search/ is locked by process {holder.pid} on ")
        assert str(err.value).endswith(f"wait for it (or stop it: kill {holder.pid})")
        assert not Path("reports/search").exists()
    finally:
        holder.stdin.close()
        holder.wait(60)
