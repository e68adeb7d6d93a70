"""The prepare stage: a built-in or real source into data/prepared/<dataset>/ (or its public set)."""

from __future__ import annotations

from pathlib import Path

from dpcam.config import PrepareConfig


def prepare(cfg: PrepareConfig, public: bool = False) -> Path:
    """Write the prepared dataset that ``cfg`` describes and return its folder.

    ``public``: its public set instead (``data/prepared/<dataset>-public``, :func:`dpcam.data.public.prepare_public`).
    """
    if public:
        from dpcam.data.public import prepare_public

        return prepare_public(cfg)
    if cfg.format == "synthetic":
        from dpcam.data.synthetic_stage import prepare_synthetic

        return prepare_synthetic(cfg)
    from dpcam.data.sources import prepare_source

    return prepare_source(cfg)
