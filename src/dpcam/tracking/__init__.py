"""MLflow, behind one door: the only package that imports mlflow.

:mod:`dpcam.tracking.store` is the store's door (where it is, opening it, its faults as one line) and
:mod:`dpcam.tracking.signals` holds SIGTERM back while MLflow works; here, runs and what they log. A run
that raises ends FAILED, one stopped by SIGTERM or Ctrl-C ends KILLED; only a run that returns ends
FINISHED.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import dpcam
from dpcam.errors import UserError
from dpcam.tracking.signals import Terminated, _on_term, _raise_pending, _shielded, _signals, _signals_deferred
from dpcam.tracking.store import (
    _check_artifacts_writable,
    _experiment_id,
    _setup,
    _store_error,
    check_sqlite,
    creation_lock,
    ensure_experiment,
    open_store,
    runs_page,
    sqlite_fault,
    store_fault,
    tracking_uri,
)

log = logging.getLogger("dpcam.tracking")

__all__ = [  # what callers use as tracking.<name>: run logging here, the store's door and Terminated imported
    "PARENT_KEY_TAG",
    "Terminated",
    "check_sqlite",
    "creation_lock",
    "end_abandoned",
    "ensure_experiment",
    "get_run",
    "git_commit",
    "load_model",
    "log_artifact",
    "log_artifacts",
    "log_dataset",
    "log_metrics",
    "log_model",
    "log_params",
    "log_to_run",
    "open_store",
    "parent_run",
    "run",
    "run_name_of",
    "runs_page",
    "set_tags",
    "sqlite_fault",
    "store_fault",
    "tracking_uri",
]


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
    pytorch_log = logging.getLogger("mlflow.pytorch")
    with _filtered(pytorch_log, PICKLE_WARNING):  # the choice is made and documented above: no warning per run
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            input_example=input_example,
            pip_requirements=_requirements(),
            serialization_format="pickle",
        )
    return info.model_uri


PICKLE_WARNING = "Saving pytorch model by Pickle or CloudPickle format requires exercising caution"


@contextlib.contextmanager
def _filtered(logger: logging.Logger, message: str) -> Iterator[None]:
    """Drop ``logger``'s records that start with ``message`` for the block (the others pass)."""

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(message)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


DIGEST_CHARS = 36  # MLflow stores a dataset digest of at most 36 characters


@_shielded
def log_dataset(name: str, digest: str, source: str | Path, tags: dict[str, Any]) -> bool:
    """Log the dataset the active run trains on as its input (the runs table's Dataset column; the UI filters on
    it): ``name``, ``digest`` (the DVC-tracked images' SHA-256, shortened to MLflow's 36 characters), ``source``
    (its folder) and ``tags`` (split, count, local-DP mechanism and ε, ``public``), context ``training``. A store
    that cannot log inputs (an older server) gets a warning and the run goes on: returns False then."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so on every call
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")
        source = resolve_dataset_source(Path(source).resolve().as_uri())
    dataset = MetaDataset(source, name=name, digest=digest[:DIGEST_CHARS])
    try:
        mlflow.log_input(dataset, context="training", tags={k: str(v) for k, v in tags.items() if v is not None})
    except MlflowException as e:
        log.warning(
            "the MLflow store at %s cannot log the run's dataset (%s); the run goes on without it",
            tracking_uri(),
            _first_line(e),
        )
        return False
    return True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
