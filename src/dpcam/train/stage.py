"""The train stage's shell: :func:`dpcam.train.fit.fit` with MLflow tracking, writing ``models/<run>/``.

What MLflow gets (:func:`mlflow_params`, :func:`mlflow_metrics`): the settings that applied to the
run (ε = ``inf`` for the non-private schemes, the clipping bound only for clipped ones, the data's
ε for LDP runs under ``ldp_epsilon``), train.json's numbers as metrics with the same values, and
the per-epoch curves under their own keys (``val_accuracy_epoch`` at steps 1..E, so the
``val_accuracy`` MLflow shows is the selected epoch's, as in train.json).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from dpcam import guard, layout
from dpcam.config import TrainConfig
from dpcam.data.store import PreparedDataset
from dpcam.errors import UserError
from dpcam.names import CLIPPED_SCHEMES, NOISED_SCHEMES, UNGUARANTEED_SCHEMES
from dpcam.records import TrainRecord
from dpcam.saved import load_model, save_model
from dpcam.train.fit import Diverged, _splits, fit, load_checkpoint, open_data
from dpcam.train.lock import run_lock

log = logging.getLogger("dpcam.train")

RUN_ID_FILE = ".mlflow-run-id"  # in a run's folder while its MLflow run is open: ended KILLED if left RUNNING
# per-epoch MLflow metric keys (steps 1..E) of the history's rows; none of them is a train.json key
EPOCH_METRICS = {
    "train_loss": "train_loss",
    "val_accuracy": "val_accuracy_epoch",
    "epsilon_spent": "epsilon_spent",
    "lr": "lr",
}


def run(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    progress: bool = True,
    grid: str | None = None,
    out: Path | None = None,
    profile: str | None = None,
) -> TrainRecord:
    """The train stage: fit with MLflow tracking; write ``out`` (default ``models/<run>/``).

    ``out`` gets model.pt, model.json and train.json. ``grid`` tags the MLflow run (``dpcam.grid``)
    so the runs of one study filter together in the UI; ``profile`` (params.yaml's ``profile``) is
    recorded in train.json and tagged ``dpcam.profile``. The folder is locked for the whole run
    (:func:`run_lock`): made (and found writable) before anything else, refused while another
    process trains it.
    """
    out = Path(out) if out is not None else layout.MODELS_ROOT / cfg.run_name
    with run_lock(out, cfg.run_name):
        return _run_locked(cfg, out, resume=resume, progress=progress, grid=grid, profile=profile)


def _run_locked(
    cfg: TrainConfig, out: Path, *, resume: bool, progress: bool, grid: str | None, profile: str | None
) -> TrainRecord:
    from dpcam import tracking

    name = cfg.run_name
    checkpoint = out / layout.CHECKPOINT
    run_id = _resumed_run_id(checkpoint, cfg, name, out, resume)
    data = open_data(cfg)
    if run_id is None:
        end_abandoned(out)
    tags = {
        "dpcam.scheme": cfg.scheme,
        "dpcam.dataset": cfg.dataset,
        "dpcam.model": cfg.model,
        "dataset.images_sha256": data.manifest.get("checksums", {}).get("images.npy", ""),
        **guarantee_tags(cfg),
    }
    tags.update({k: v for k, v in (("dpcam.grid", grid), ("dpcam.profile", profile)) if v})
    try:
        with tracking.run(cfg.dataset, name, run_id=run_id, tags=tags) as mlflow_id:
            layout.write_text(out / RUN_ID_FILE, mlflow_id + "\n")
            if run_id is None:
                tracking.log_params(mlflow_params(cfg, data))
                tracking.log_dataset(**dataset_input(cfg, data))

            def on_epoch(epoch: int, row: dict[str, float]) -> None:
                tracking.log_metrics({EPOCH_METRICS[k]: v for k, v in row.items() if k in EPOCH_METRICS}, step=epoch)

            try:
                result = fit(
                    cfg,
                    checkpoint=checkpoint,
                    resume=resume,
                    on_epoch=on_epoch,
                    extra_state={"mlflow_run_id": mlflow_id},
                    progress=progress,
                )
            except Diverged:
                checkpoint.unlink(missing_ok=True)  # its weights lead to the same divergence: no --resume from it
                raise
            record = result.metrics.model_copy(
                update={"run_name": name, "mlflow_run_id": mlflow_id, "profile": profile}
            )
            save_model(result.model, cfg, data, out)
            # every test prediction, for paired differences between runs (report.verdict)
            layout.write_atomic(out / layout.PREDICTIONS, lambda p: np.savez(p, **result.predictions))
            tracking.log_metrics(mlflow_metrics(record, data))
            tracking.set_tags({"dpcam.collapsed": record.collapsed, "dpcam.accountant": record.accountant})
            example = data.split("test").batch([0, 1])[0].numpy()
            clean, _ = load_model(out)  # rebuilt from the saved files: no Opacus hooks, proves the save reloads
            record.mlflow_model_uri = tracking.log_model(clean, input_example=example)
            record.write(out / layout.TRAIN_JSON)
            tracking.log_artifact(out / layout.TRAIN_JSON)
    finally:  # the MLflow run is ended (FINISHED, FAILED or KILLED): only a SIGKILL leaves the file behind
        (out / RUN_ID_FILE).unlink(missing_ok=True)
    checkpoint.unlink()  # finished: the model and metrics are the run's outputs now
    return record


def end_abandoned(out: Path) -> list[str]:
    """End KILLED the MLflow runs of ``out`` that a killed process left RUNNING (named in its run-id file or its
    checkpoint), before the run is trained again from the start; returns their ids."""
    from dpcam import tracking

    ids = []
    try:
        ids.append((out / RUN_ID_FILE).read_text().strip())
    except OSError:
        pass
    if (out / layout.CHECKPOINT).is_file():
        try:
            ids.append(guard.read_pt(out / layout.CHECKPOINT, fix="").get("mlflow_run_id"))
        except UserError:
            pass
    ended = [i for i in dict.fromkeys(ids) if i and tracking.end_abandoned(i)]
    for i in ended:
        log.warning("%s: MLflow run %s was left RUNNING by a killed process; ended it KILLED", out.name, i)
    return ended


def guarantee_tags(cfg: TrainConfig) -> dict[str, str]:
    """MLflow tags set when the run starts (so a failed run carries them too): ``dpcam.guarantee`` (``dp`` for
    gaussian and laplace, ``none`` for laplace-paper, whose noise has no guarantee), ``dpcam.trainable`` and
    ``dpcam.public`` (a run on the public set)."""
    tags = {"dpcam.trainable": cfg.trainable}
    if cfg.scheme in UNGUARANTEED_SCHEMES:
        tags["dpcam.guarantee"] = "none"
    elif cfg.scheme in NOISED_SCHEMES:
        tags["dpcam.guarantee"] = "dp"
    if cfg.public:
        tags["dpcam.public"] = "true"
    return tags


def _ldp_mechanism(data: PreparedDataset) -> tuple[str | None, float | None, dict[str, Any]]:
    """(mechanism name, its ε, its guarantee) of an LDP derivative's manifest."""
    mech = data.manifest.get("mechanism") or {}
    eps = mech.get("epsilon")
    return mech.get("name"), float(eps) if isinstance(eps, (int, float)) else None, data.manifest.get("guarantee") or {}


def mlflow_params(cfg: TrainConfig, data: PreparedDataset) -> dict[str, Any]:
    """The run's settings as MLflow params: only those that applied to it.

    ``epsilon``: the target ε as in run names (``1``, ``0.5``) for gaussian/laplace, ``inf`` for
    none and clip-only, absent for laplace-paper (no guarantee: ``nominal_epsilon``, ``nominal_delta`` and
    ``nominal_accountant`` are what its σ was calibrated from, and ``guarantee`` is ``none``) and for ldp (no
    DP-SGD; the data's ε is ``ldp_epsilon``, with ``ldp_mechanism`` and ``ldp_scope``: what that ε protects).
    ``delta`` only where it enters an (ε, δ) guarantee (gaussian, laplace); ``clip`` and ``grad_sample_mode``
    only for clipped schemes; ``accountant`` only for gaussian (laplace has its own, logged as the
    ``dpcam.accountant`` tag).
    """
    params = cfg.model_dump(mode="json")
    for key in ("epsilon", "delta", "clip", "accountant", "grad_sample_mode"):
        params.pop(key)
    if cfg.scheme in NOISED_SCHEMES:
        params.update(epsilon=layout.format_eps(cfg.epsilon), delta=cfg.delta)
    elif cfg.scheme in UNGUARANTEED_SCHEMES:  # no ε: the one it was calibrated from, under its own name
        params.update(nominal_epsilon=layout.format_eps(cfg.epsilon), nominal_delta=cfg.delta, guarantee="none")
    elif cfg.scheme != "ldp":
        params["epsilon"] = "inf"
    if cfg.scheme in CLIPPED_SCHEMES:
        params.update(clip=cfg.clip, grad_sample_mode=cfg.grad_sample_mode)
    if cfg.scheme == "gaussian":
        params["accountant"] = cfg.accountant
    if cfg.scheme in UNGUARANTEED_SCHEMES:
        params["nominal_accountant"] = cfg.accountant
    if cfg.scheme == "ldp":
        mechanism, eps, guarantee = _ldp_mechanism(data)
        params.update(
            ldp_mechanism=mechanism,
            ldp_epsilon=layout.format_eps(eps) if eps is not None else None,
            ldp_scope=guarantee.get("scope"),
        )
    return params


def dataset_input(cfg: TrainConfig, data: PreparedDataset) -> dict[str, Any]:
    """What the run trains on, as MLflow's dataset input (:func:`dpcam.tracking.log_dataset`): the dataset's name
    (``<dataset>``, ``<dataset>/<ldp derivative>``, ``<dataset>-public``), the SHA-256 of its images (the file DVC
    tracks), its folder, and tags: the split and how many of its images train, the local-DP mechanism and ε of a
    derivative, ``public`` for the public set a trunk trains on."""
    mechanism, eps, _ = _ldp_mechanism(data)
    tags = {"split": "train", "images": len(_splits(cfg, data)[0]), "ldp_mechanism": mechanism}
    tags.update(ldp_epsilon=layout.format_eps(eps) if eps is not None else None, public="true" if cfg.public else None)
    name = cfg.dataset + (f"/{cfg.ldp}" if cfg.ldp else "") + (layout.PUBLIC_SUFFIX if cfg.public else "")
    digest = data.manifest.get("checksums", {}).get("images.npy", "")
    return {"name": name, "digest": digest, "source": cfg.data_dir, "tags": tags}


def mlflow_metrics(record: TrainRecord, data: PreparedDataset) -> dict[str, Any]:
    """train.json's numbers as MLflow metrics (same keys, same values), plus ``ldp_epsilon`` for LDP runs.

    ∞ is left out (ε of a non-private run: MLflow's SQL stores would show it as 1.8e308; the param
    ``epsilon = inf`` says it); ``delta`` only where it enters an (ε, δ) guarantee.
    """
    out = {k: v for k, v in record.to_json().items() if k != "schema"}
    out.update({f"test_recall_{c}": v for c, v in enumerate(record.test_recall or []) if v is not None})
    if record.scheme not in NOISED_SCHEMES:
        out.pop("delta", None)
    if record.scheme == "ldp":
        _, eps, guarantee = _ldp_mechanism(data)
        out.update(ldp_epsilon=eps, ldp_image_epsilon=guarantee.get("image_epsilon"))
    return out


def _resumed_run_id(checkpoint: Path, cfg: TrainConfig, name: str, out: Path, resume: bool) -> str | None:
    """The MLflow run id to continue (``--resume``), None for a fresh run; refuses to overwrite an interrupted one."""
    if resume:
        if not checkpoint.exists():
            raise UserError(f"--resume: no checkpoint at {checkpoint}; train without --resume to start the run")
        return load_checkpoint(checkpoint, cfg).get("mlflow_run_id")
    if checkpoint.exists():
        raise UserError(
            f"{checkpoint} exists: run {name} was interrupted; pass --resume to continue it with its privacy ledger, "
            f"or delete {out} to start over"
        )
    return None
