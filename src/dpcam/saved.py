"""Saved runs: ``models/<run>/model.pt`` (the weights, a state dict) and ``model.json`` (how to rebuild the
model), written by the train stage and read by explain, audit, search and the report; and the torch device a
``device`` setting names.

Reading a run needs no training or privacy code: this module is what the explain, audit and report stages
import instead of :mod:`dpcam.train`, so their DVC deps hold no optimiser, accountant or sampler file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpcam import guard, layout
from dpcam.config import TrainConfig
from dpcam.data.store import PreparedDataset
from dpcam.errors import UserError


def resolve_device(device: str, origin: str | None = None) -> torch.device:
    """The torch device of a ``device`` setting; a CUDA device that is not here is one line naming where the
    setting came from: ``origin`` (e.g. ``params.yaml: train.device``), or the ``--device`` flag when None."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        if origin is None:
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu or auto")
        raise UserError(
            f"{origin} = cuda: no CUDA device is available here; set it to cpu or auto (or override it with "
            "--device cpu)"
        )
    return torch.device(device)


def save_model(model: nn.Module, cfg: TrainConfig, data: PreparedDataset, out: Path) -> None:
    """models/<run>/model.pt (weights) + model.json (how to rebuild it), written atomically."""
    spec = {
        "model": cfg.model,
        "num_classes": data.num_classes,
        "image_size": data.image_size,
        "small_input": cfg.small_input,
        "classes": data.classes,
        "dataset": cfg.dataset,
        "data_dir": str(cfg.data_dir),
        "config": cfg.model_dump(mode="json"),
    }
    layout.save_torch({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / layout.MODEL_PT)
    layout.write_text(out / layout.MODEL_JSON, json.dumps(spec, indent=2) + "\n")


def load_model(run: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a trained run's plain model (eval mode) from models/<run>/.

    The safe way to load a dpcam model: the weights are a state dict read with
    ``weights_only=True`` (no code runs). A missing, corrupt or mismatched ``model.pt`` or
    ``model.json`` is a one-line UserError naming the file.
    """
    from dpcam.models import create_model

    path = Path(run) if Path(run).is_dir() else layout.run_dir(str(run))
    weights, described = path / layout.MODEL_PT, path / layout.MODEL_JSON
    if not weights.is_file() or not described.is_file():
        raise UserError(f"run {str(run)!r}: no trained model at {path}/model.pt; run `dpcam train` for it first")
    again = "train the run again (`dpcam train`, or `dvc repro` for a grid run)"
    spec = guard.read_json(described, fix=again)
    try:
        kind, classes, size, small = spec["model"], spec["num_classes"], spec["image_size"], spec["small_input"]
    except KeyError as e:
        raise UserError(f"{described}: not a readable dpcam model description ({reason(e)}); {again}") from None
    model = create_model(kind, classes, size, small_input=small)
    state = guard.read_pt(weights, fix=again)
    try:
        model.load_state_dict(state)
    except Exception as e:
        raise UserError(
            f"{weights}: the weights do not fit the {kind} that {described.name} describes ({reason(e)}); {again}"
        ) from None
    return model.eval(), spec


def reason(e: BaseException) -> str:
    """An exception's first line, short."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:160]}" if text else type(e).__name__
