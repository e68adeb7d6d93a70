"""The prepare stage: a built-in or real source into data/prepared/<dataset>/."""

from __future__ import annotations

from pathlib import Path

from dpcam.config import PrepareConfig


def prepare(cfg: PrepareConfig) -> Path:
    """Write the prepared dataset that ``cfg`` describes and return its folder."""
    if cfg.format == "synthetic":
        from dpcam.data.synthetic import prepare_synthetic

        return prepare_synthetic(cfg)
    from dpcam.data.sources import prepare_source

    return prepare_source(cfg)
