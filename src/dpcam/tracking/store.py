"""The tracking store's door: where the store is, opening it once per process, and its faults as one line.

Tracking URI ``sqlite:///mlruns/mlflow.db`` unless ``MLFLOW_TRACKING_URI`` is set (so a team
server works the same way); artifacts of the local default go to ``mlruns/artifacts``. One
experiment per dataset.

The store is opened through one door, :func:`open_store` (every function of dpcam.tracking goes through it): for
a sqlite store, the first process to open it creates and migrates its tables while holding a file lock
beside it (``mlflow.db.lock``; MLflow 3 locks only its workspace and job stores, not the tracking
store), so processes that start together on a fresh folder never race to create the schema, and every
later one finds it whole. The store is checked when first opened in a process (a SQLite file, no
half-finished migration, ``PRAGMA quick_check``), and a fault is one line naming what it is
(:func:`store_error`): unwritable, corrupt (with how to move it aside), locked (by which process), a
full disk, a schema of another MLflow version; never advice for another cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dpcam.errors import UserError

for _name in ("mlflow", "alembic", "sqlalchemy"):
    logging.getLogger(_name).setLevel(logging.WARNING)
# it logs every database error with its traceback before raising it; the raised error is enough
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


STORE_WAIT = 600.0  # seconds to wait for another process creating or migrating the sqlite store
BUSY_WAIT = 60.0  # seconds the store's check waits for a process holding the sqlite file's write lock
SQLITE_MAGIC = b"SQLite format 3\x00"
_opened: set[str] = set()  # store URIs this process has opened (created, migrated and checked)


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
    URI. The door every function of dpcam.tracking goes through: a stage calls it before it changes any file, so a
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


def runs_page(experiment: str) -> str:
    """The UI's address (after the server's root) of ``experiment``'s runs table, in the model-training view."""
    return f"#/experiments/{_experiment_id(experiment)}/runs?workflowType=machine_learning"


def _experiment_id(name: str) -> str:
    uri = _setup()
    try:
        return _get_or_create_experiment(name, uri)
    except UserError:
        raise
    except Exception as e:
        raise _store_error(e, "open or create the experiment") from None


# The experiment's kind in MLflow 3's UI ("Machine learning": its header, its runs as training runs). Where the UI
# lands is its own workflow switch (GenAI by default in a new browser, 3.17): runs_page() links the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def _get_or_create_experiment(name: str, uri: str) -> str:
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.tags.get("mlflow.experimentKind") is None:  # made before dpcam marked its kind
            for key, value in EXPERIMENT_KIND.items():
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id
    artifacts = Path("mlruns/artifacts").resolve().as_uri() if _is_default(uri) else None
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
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
