"""MLflow, behind one door: the only module that imports mlflow.

Tracking URI ``sqlite:///mlruns/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set (so a team
server works the same way); artifacts of the local default go to ``mlruns/artifacts``. One
experiment per dataset. A run that raises ends FAILED, one stopped by SIGTERM or Ctrl-C ends
KILLED; only a run that returns ends FINISHED.

The store is opened through one door, :func:`open_store` (every function here goes through it): for
a sqlite store, the first process to open it creates and migrates its tables while holding a file lock
beside it (``mlflow.db.lock``; MLflow 3 locks only its workspace and job stores, not the tracking
store), so processes that start together on a fresh folder never race to create the schema, and every
later one finds it whole. The store is checked when first opened in a process (a SQLite file, no
half-finished migration, ``PRAGMA quick_check``), and a fault is one line naming what it is
(:func:`store_error`): unwritable, corrupt (with how to move it aside), locked (by which process), a
full disk, a schema of another MLflow version; never advice for another cause.

Signals: inside a run SIGTERM raises :class:`Terminated` (a ``BaseException``, so no library's
``except Exception`` swallows it). While an MLflow call of this module is in progress (a model
being logged, a metric being written) the signal is only recorded and raised when the call
returns: MLflow catches broad exceptions in places (signature inference runs the model inside
``except Exception``), and a store write cut in half helps nobody. Either way the run ends KILLED.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import dpcam
from dpcam.errors import UserError

for _name in ("mlflow", "alembic", "sqlalchemy"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# it logs every database error with its traceback before raising it; the raised error is enough
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


class Terminated(BaseException):
    """Raised inside a run when the process receives SIGTERM (the CLI exits 143 with one line).

    A ``BaseException`` like ``KeyboardInterrupt``: ``except Exception`` blocks (MLflow has broad
    ones) let it through.
    """

    exit_code = 143

    def __init__(self, signum: int = signal.SIGTERM):
        self.signum = int(signum)
        super().__init__(f"terminated by signal {self.signum} ({signal.Signals(self.signum).name})")


# the last SIGTERM received inside a run and not yet seen out of it: raised at once outside MLflow
# calls, when the call returns inside one, and again at the run's end if code in between dropped it
_signals: dict[str, Any] = {"busy": 0, "pending": None}


def _on_term(signum, frame) -> None:
    _signals["pending"] = signum
    if not _signals["busy"]:
        raise Terminated(signum)


def _raise_pending() -> None:
    signum = _signals["pending"]
    if signum is not None and not _signals["busy"]:
        _signals["pending"] = None
        raise Terminated(signum)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold a SIGTERM back while MLflow works; raise it (Terminated) once the block has returned."""
    _signals["busy"] += 1
    try:
        yield
    finally:
        _signals["busy"] -= 1
    _raise_pending()


def _shielded(fn):
    """Run ``fn`` (an MLflow call) with SIGTERM deferred to its return; a store fault is one line (UserError)."""
    doing = fn.__name__.strip("_").replace("_", " ")

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _signals_deferred():
            try:
                return fn(*args, **kwargs)
            except UserError:
                raise
            except Exception as e:
                if (err := store_fault(e, doing)) is None:
                    raise
                raise err from None

    return wrapper


def tracking_uri() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlruns/mlflow.db`` under the current folder.

    The default is made absolute: MLflow caches one store per URI string, so a relative sqlite URI
    would keep pointing at the first folder a long-lived process used.
    """
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlruns/mlflow.db').resolve()}"


def _is_default(uri: str) -> bool:
    return not os.environ.get("MLFLOW_TRACKING_URI")


def _setup() -> str:
    uri = tracking_uri()
    default = _is_default(uri)
    if default:
        Path("mlruns").mkdir(exist_ok=True)
    mlflow.set_tracking_uri(uri)
    if default:
        # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; undo it, or the next folder this
        # process works in would be taken for a user-chosen store
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    if uri not in _opened:
        _open(uri)
    return uri


# ------------------------------------------------------------------------------------ the store's door

STORE_WAIT = 600.0  # seconds to wait for another process creating or migrating the sqlite store
BUSY_WAIT = 60.0  # seconds the store's check waits for a process holding the sqlite file's write lock
SQLITE_MAGIC = b"SQLite format 3\x00"
_opened: set[str] = set()  # store URIs this process has opened (created, migrated and checked)


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for another kind of store, or an in-memory database)."""
    if not uri.startswith("sqlite:"):
        return None
    from sqlalchemy.engine import make_url

    try:
        database = make_url(uri).database
    except Exception:
        return None
    return Path(database) if database not in (None, "", ":memory:") else None


def open_store() -> str:
    """Open the tracking store (create and migrate a new sqlite store, under its lock) and check it; returns its
    URI. The door every function of this module goes through: a stage calls it before it changes any file, so a
    store fault stops it before models/, metrics/ or audits/ are touched."""
    return _setup()


def _open(uri: str) -> None:
    path = sqlite_path(uri)
    try:
        with creation_lock(path, "MLflow tracking store"):
            if path is not None:
                check_sqlite(path, "MLflow tracking store", uri)
            MlflowClient().search_experiments(max_results=1)  # MLflow creates and migrates the tables here
    except UserError:
        raise
    except Exception as e:
        raise _store_error(e, "open the store") from None
    _opened.add(uri)


@contextlib.contextmanager
def creation_lock(path: Path | None, what: str) -> Iterator[None]:
    """Hold ``<path>.lock`` (:func:`dpcam.layout.locked`) while a sqlite database is opened, created or migrated,
    so processes starting together create its schema once; no lock for another kind of store, or where the
    folder cannot be written (nobody can create or migrate the database there)."""
    if path is None or not path.parent.is_dir():
        yield
        return
    from dpcam.layout import locked

    lock = path.with_name(path.name + ".lock")
    fix = f"wait for it to finish creating or migrating {path}"
    with locked(lock, f"{what} {path}", timeout=STORE_WAIT, fix=fix, optional=True):
        yield


def check_sqlite(path: Path, what: str, uri: str | None = None) -> None:
    """UserError (:func:`sqlite_fault`) unless ``path`` is a healthy SQLite database: the SQLite header, no table a
    migration left behind (``_alembic_tmp_*``), ``PRAGMA quick_check`` ok. A missing or empty file passes
    (MLflow or Optuna creates the tables)."""
    import sqlite3

    try:
        if path.stat().st_size == 0:
            return
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as e:
        raise sqlite_fault(e, path, what, "read it", uri) or UserError(f"{what} {path}: cannot read it ({e})") from None
    if head != SQLITE_MAGIC:
        raise _corrupt(path, what, "not a SQLite database", uri)
    try:
        # read-write, as MLflow opens it: a hot journal a killed writer left is rolled back, not taken for damage
        con = sqlite3.connect(path, timeout=BUSY_WAIT)
        try:
            tables = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            left = sorted(t for t in tables if t.startswith("_alembic_tmp_"))
            if left:
                raise _corrupt(path, what, f"a half-finished migration: it holds {left[0]}, left by one", uri)
            rows = con.execute("PRAGMA quick_check").fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise sqlite_fault(e, path, what, "check it", uri) or UserError(
            f"{_shown(path, what, uri)}: cannot check it ({_reason(e)})"
        ) from None
    if rows != [("ok",)]:
        found = " ".join(str(rows[0][0]).replace("*** in database main ***", "").split())
        raise _corrupt(path, what, f"damaged: {found[:120]}", uri)


def _shown(path: Path, what: str, uri: str | None) -> str:
    return f"{what} {_masked(uri)}" if uri else f"{what} {path}"


def _corrupt(path: Path, what: str, why: str, uri: str | None = None) -> UserError:
    import shlex

    aside = shlex.quote(str(path) + ".broken")
    return UserError(
        f"{_shown(path, what, uri)}: corrupt ({why}); move it aside with `mv {shlex.quote(str(path))} {aside}` "
        "and run the command again (a new store is made; what was logged so far stays in the moved file)"
    )


def _chain(e: BaseException) -> list[BaseException]:
    """``e`` and the errors behind it (causes, contexts, SQLAlchemy's ``orig``)."""
    out: list[BaseException] = []
    todo = [e]
    while todo:
        x = todo.pop()
        if x is None or any(x is y for y in out):
            continue
        out.append(x)
        todo += [getattr(x, "orig", None), x.__cause__, x.__context__]
    return [x for x in out if isinstance(x, BaseException)]


_MIGRATION = re.compile(
    r"_alembic_tmp|duplicate column name|table \S+ already exists|online migration|out-of-date database schema|"
    r"can't locate revision|no such column|no such table"
)


def _holders(path: Path) -> list[int]:
    """Processes of this machine other than this one that have ``path`` (or its journal) open (Linux /proc)."""
    try:
        names = {str(path.resolve()), str(path.resolve()) + "-journal", str(path.resolve()) + "-wal"}
        found = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if any(os.readlink(fd) in names for fd in (proc / "fd").iterdir()):
                    found.append(int(proc.name))
            except OSError:
                continue
        return sorted(found)
    except OSError:
        return []


def _command(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return " ".join(" ".join(w.decode(errors="replace") for w in words if w).split())[:80]
    except OSError:
        return ""


def _writable(path: Path) -> bool:
    """Whether this process can write ``path`` and create files beside it (a journal), as SQLite must: tried,
    not read from the mode bits (root ignores them; an immutable file or a read-only mount stops even root)."""
    import tempfile

    try:
        if path.exists():
            os.close(os.open(path, os.O_RDWR))
        if path.parent.is_dir():
            os.rmdir(tempfile.mkdtemp(prefix=".dpcam-probe-", dir=path.parent))
    except OSError:
        return False
    return True


def sqlite_fault(
    e: BaseException, path: Path | None, what: str, doing: str, uri: str | None = None
) -> UserError | None:
    """The one line for an error of a sqlite database at ``path``, named for what it is (None when it is not a
    fault of the database): a full disk, locked by another process, unwritable, corrupt (not SQLite, damaged,
    a half-finished migration), or a schema of another version."""
    from dpcam.layout import disk_full

    chain = _chain(e)
    text = " | ".join(str(x) for x in chain).lower()
    shown = _shown(path, what, uri) if path is not None else what
    where = path if path is not None else what
    full = next((x for x in chain if isinstance(x, OSError) and disk_full(x, where) is not None), None)
    if full is not None:  # the file it was writing (an artifact), else the database
        return disk_full(full, full.filename or where)
    if "database or disk is full" in text:
        return disk_full(OSError(28, "No space left on device"), where)
    if path is None:
        return None
    if "database is locked" in text or "database table is locked" in text:
        holders = _holders(path)
        if holders:
            who = ", ".join(f"pid {p}" + (f" ({c})" if (c := _command(p)) else "") for p in holders[:3])
            who = who if len(holders) == 1 else f"one of {who}"
            return UserError(
                f"{shown}: locked by {who}, which has held its write lock for more than {BUSY_WAIT:g} s; wait for "
                f"it to finish, or stop it (kill {holders[0]}) and run the command again"
            )
        return UserError(
            f"{shown}: locked by another process (another machine sharing the folder?) for more than "
            f"{BUSY_WAIT:g} s; wait for it to finish and run the command again"
        )
    folder = path.parent
    if "readonly database" in text or (
        any(w in text for w in ("unable to open database file", "disk i/o error")) and not _writable(path)
    ):
        return UserError(
            f"{shown}: unwritable (cannot {doing}: {_reason(e)}); make {path} and its folder {folder} writable "
            "for you, or set MLFLOW_TRACKING_URI to a store you can write"
            if "MLflow" in what
            else f"{shown}: unwritable (cannot {doing}: {_reason(e)}); make {path} and its folder writable for you"
        )
    if "unable to open database file" in text and not folder.is_dir():
        return UserError(f"{shown}: its folder {folder} does not exist; create it, or name another database")
    if "file is not a database" in text:
        return _corrupt(path, what, "not a SQLite database", uri)
    if "malformed" in text or "database corrupt" in text:
        return _corrupt(path, what, "damaged: database disk image is malformed", uri)
    if _MIGRATION.search(text):
        return _corrupt(path, what, f"a half-finished migration or another version's schema: {_reason(e)}", uri)
    return None


def _reason(e: BaseException) -> str:
    """The innermost useful first line of an error (SQLite's own words where there are some), short."""
    import sqlite3

    inner = next((x for x in _chain(e) if isinstance(x, sqlite3.Error)), e)
    lines = str(inner).strip().splitlines()
    return _masked(lines[0][:200]) if lines else type(inner).__name__


def store_fault(e: BaseException, doing: str) -> UserError | None:
    """The one line for a fault of the tracking store behind ``e`` (None when ``e`` is not one)."""
    uri = tracking_uri()
    return sqlite_fault(e, sqlite_path(uri), "MLflow tracking store", doing, uri)


def _experiment_id(name: str) -> str:
    uri = _setup()
    try:
        return _get_or_create_experiment(name, uri)
    except UserError:
        raise
    except Exception as e:
        raise _store_error(e, "open or create the experiment") from None


def _get_or_create_experiment(name: str, uri: str) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = Path("mlruns/artifacts").resolve().as_uri() if _is_default(uri) else None
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another worker created it meanwhile (workers start together)
        if exp is None:
            raise
        return exp.experiment_id


def ensure_experiment(name: str) -> None:
    """Create the store's tables and the experiment now, in this process: workers that start together on a
    new sqlite store would otherwise race to create its schema."""
    _experiment_id(name)


def _masked(uri: str) -> str:
    """``uri`` with a password replaced by ``***``."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", uri)


def _store_error(e: BaseException, doing: str) -> UserError:
    """One line for a tracking store dpcam cannot use: the fault named (:func:`store_fault`), else MLflow's own
    words without a guess at the cause."""
    if (err := store_fault(e, doing)) is not None:
        return err
    reason = _masked((str(e).strip().splitlines() or [type(e).__name__])[0][:300])
    fix = (
        "check that MLFLOW_TRACKING_URI names a store that is running and that you may write"
        if not _is_default(tracking_uri())
        else "see MLflow's message"
    )
    return UserError(f"MLflow tracking store {_masked(tracking_uri())}: cannot {doing} ({reason}); {fix}")


def _check_artifacts_writable(experiment_id: str) -> None:
    """Refuse, before any work, an experiment whose local artifact folder cannot be written (models go there)."""
    from urllib.parse import unquote, urlparse

    location = MlflowClient().get_experiment(experiment_id).artifact_location or ""
    parsed = urlparse(location)
    if parsed.scheme not in ("", "file"):
        return  # a remote artifact store: its own errors are its own
    folder = Path(unquote(parsed.path) if parsed.scheme == "file" else location).absolute()
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), None)
    if existing is None:
        return
    try:  # a folder made and removed in the deepest one that exists: nothing is left behind
        os.rmdir(tempfile.mkdtemp(prefix=".dpcam-probe-", dir=existing))
    except OSError as e:
        where = "" if existing == folder else f" (in {existing}, where it is to be made)"
        raise UserError(
            f"MLflow artifact folder {folder}: cannot write{where} ({e.strerror or type(e).__name__}); "
            "fix its permissions, or set MLFLOW_TRACKING_URI to a store you can write"
        ) from None


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


@contextlib.contextmanager
def run(
    experiment: str,
    run_name: str,
    *,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    nested: bool = False,
) -> Iterator[str]:
    """Start (or, with ``run_id``, resume) an MLflow run; yield its id; end it with the right status.

    A store that cannot be written (read-only sqlite file or folder, unreachable server) is a
    UserError here, before the caller does any work. Outside nested runs SIGTERM raises
    :class:`Terminated` in the block (deferred while an MLflow call is in progress); the run then
    ends KILLED, also when the signal was caught and dropped by code inside the block.
    """
    exp_id = _experiment_id(experiment)
    if run_id is not None:
        try:
            MlflowClient().get_run(run_id)
        except MlflowException:
            raise UserError(
                f"MLflow run {run_id} (from the checkpoint) is not in {tracking_uri()}; "
                "set MLFLOW_TRACKING_URI to the store it was logged to, or train without --resume"
            ) from None
    _check_artifacts_writable(exp_id)
    base_tags = {"dpcam.version": dpcam.__version__}
    if commit := git_commit():
        base_tags["git.commit"] = commit

    installed, previous = False, None
    if not nested:
        previous, installed = signal.signal(signal.SIGTERM, _on_term), True
    status, active = "FAILED", None
    try:
        with _signals_deferred():
            try:
                active = mlflow.start_run(
                    run_id=run_id, experiment_id=exp_id, run_name=None if run_id else run_name, nested=nested
                )
                mlflow.set_tags({**base_tags, **(tags or {})})
            except Exception as e:
                raise _store_error(e, "start a run") from None
        yield active.info.run_id
        status = "FINISHED"
    except (Terminated, KeyboardInterrupt) as e:
        status = "KILLED"
        if isinstance(e, Terminated):
            _signals["pending"] = None  # on its way out: not to be raised twice
        raise
    finally:
        _signals["busy"] += 1
        try:
            if _signals["pending"] is not None:
                status = "KILLED"  # a signal came in and the code it interrupted did not let it out
            if active is not None:
                try:
                    mlflow.end_run(status)
                except Exception as e:
                    if status == "FINISHED":
                        raise _store_error(e, "end the run") from None
                    # the run is failing already: its own error says more than the store's
        finally:
            _signals["busy"] -= 1
            if installed:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)
        _raise_pending()


@_shielded
def log_params(params: dict[str, Any]) -> None:
    """Log flat params (nested dicts become dotted keys); values already logged must not change."""
    flat = _flatten(params)
    mlflow.log_params({k: ("" if v is None else v) for k, v in flat.items()})


@_shielded
def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if _is_number(v)}, step=step)


@_shielded
def set_tags(tags: dict[str, Any]) -> None:
    mlflow.set_tags({k: str(v) for k, v in tags.items()})


@_shielded
def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    mlflow.log_artifact(str(path), artifact_path=artifact_path)


@_shielded
def log_model(model, input_example) -> str:
    """Log a torch module so ``mlflow.pytorch.load_model`` loads it; returns the model URI.

    Pickle format: loading gives back dpcam's own module (``gradcam_layer`` and named layers for
    Grad-CAM), with dpcam in its requirements; MLflow 3's default "pt2" gives a traced graph
    without them and costs ~2 s per run in ``torch.export``. Like any pickle, load only models you
    trust (your own tracking store).
    """
    import mlflow.pytorch

    # explicit requirements: MLflow's inference imports the model in a subprocess (~10 s per run)
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        input_example=input_example,
        pip_requirements=_requirements(),
        serialization_format="pickle",
    )
    return info.model_uri


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "torchvision", "dpcam"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            pass
    return out


def load_model(model_uri: str):
    """Load a logged model (``models:/...``, ``runs:/...``) into memory, leaving the tracking store as it was.

    MLflow downloads the model first; without a destination it works in place for a local store
    and writes a ``registered_model_meta`` file into the store's artifacts. Here the download goes
    to a temporary folder, removed once the model is in memory.

    Security: logged models are pickles (see :func:`log_model`): loading one runs code from the
    store. Load only from a store you trust; ``dpcam.saved.load_model`` (the state dict in
    ``models/<run>/model.pt``, read with ``weights_only=True``) is the safe path.
    """
    import mlflow.pytorch

    _setup()
    with tempfile.TemporaryDirectory(prefix="dpcam-model-") as tmp:
        return mlflow.pytorch.load_model(model_uri, dst_path=tmp, map_location="cpu")


def get_run(run_id: str):
    _setup()
    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as e:
        if (err := store_fault(e, "read the run")) is not None:
            raise err from None
        raise


def end_abandoned(run_id: str, status: str = "KILLED") -> bool:
    """End run ``run_id`` with ``status`` if it is still RUNNING (its process was killed: SIGKILL, power loss);
    True when it did. Called by a stage that starts the run's work again; a run the store does not have is
    left alone."""
    _setup()
    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            return False
    except MlflowException as e:
        if (err := store_fault(e, "read the run")) is not None:
            raise err from None
        return False
    try:
        client.set_terminated(run_id, status=status)
    except MlflowException as e:
        raise _store_error(e, "end the abandoned run") from None
    return True


def run_name_of(run_id: str) -> str | None:
    """The run name of an MLflow run id (None when the store has no such run)."""
    try:
        return get_run(run_id).info.run_name
    except Exception:
        return None


def log_to_run(
    run_id: str,
    experiment: str,
    metrics: dict[str, Any],
    tags: dict[str, Any],
    artifacts: list[Path],
    artifact_path: str,
) -> None:
    """Add a later stage's metrics, tags and files to an existing run (the training's run of a model).

    Through the client, without reopening the run: the training run keeps its status (FINISHED) whatever
    happens to the later stage.
    """
    _log_to_run(run_id, metrics, tags, artifacts, artifact_path)


@_shielded
def _log_to_run(
    run_id: str, metrics: dict[str, Any], tags: dict[str, Any], artifacts: list[Path], artifact_path: str
) -> None:
    import time

    from mlflow.entities import Metric, RunTag

    _setup()
    client = MlflowClient()
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if _is_number(v)],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path=artifact_path)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


# ------------------------------------------------------------------------- parent and nested runs


PARENT_KEY_TAG = "dpcam.parent_key"


def _parent_runs(client: MlflowClient, exp_id: str, key: str) -> list:
    """Live runs tagged ``dpcam.parent_key = key``, oldest first (ties by run id): the first is the parent."""
    escaped = key.replace("'", "\\'")
    runs = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{escaped}'", max_results=1000)
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


@contextlib.contextmanager
def parent_run(experiment: str, run_name: str, key: str, *, tags: dict[str, Any] | None = None) -> Iterator[str]:
    """Start or resume the one run of ``experiment`` that ``key`` names (e.g. a study); yield its id.

    Runs started inside it with ``run(..., nested=True)`` become its children. Several processes
    (workers of one study) resuming it share it: when two create it at once, both keep the oldest
    and the other is deleted before it has children. Ends with the status rules of :func:`run`.
    """
    exp_id = _experiment_id(experiment)
    try:
        found = _find_parent(exp_id, run_name, key)
    except Exception as e:
        raise _store_error(e, "find or create the parent run") from None
    with run(experiment, run_name, run_id=found, tags=tags) as run_id:
        yield run_id


def _find_parent(exp_id: str, run_name: str, key: str) -> str:
    client = MlflowClient()
    found = _parent_runs(client, exp_id, key)
    if not found:
        mine = client.create_run(exp_id, run_name=run_name, tags={PARENT_KEY_TAG: key}).info.run_id
        found = _parent_runs(client, exp_id, key)
        if found and found[0].info.run_id != mine:
            client.delete_run(mine)
        elif not found:  # a store that does not list a run it has just created: keep ours
            found = [client.get_run(mine)]
    return found[0].info.run_id


@_shielded
def log_artifacts(folder: str | Path, artifact_path: str | None = None) -> None:
    """Log every file of ``folder`` under ``artifact_path`` of the active run."""
    mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
