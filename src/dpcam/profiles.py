"""Profiles: overlays of params.yaml for other studies (``profiles/<name>.yaml``, e.g. the paper's).

A profile lists only the keys it changes. ``dpcam profile NAME`` runs the study under it as a DVC
experiment: ``dvc exp run -n NAME -S profile=NAME -S <key>=<value> ...`` sets exactly those keys
(DVC's own overlay mechanism), so every other key of the user's params.yaml — a dataset path, the
search or audit settings — survives, and ``profile`` records which profile the runs were made
under (train.json, the MLflow tag ``dpcam.profile``). ``dvc exp show`` compares profiles;
``dvc exp apply`` / ``git checkout params.yaml`` go back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dpcam import config
from dpcam.errors import UserError
from dpcam.layout import PARAMS_FILE, PROFILES_DIR


def available(folder: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def load_overlay(name: str, folder: Path = PROFILES_DIR) -> dict[str, Any]:
    """The overlay ``profiles/<name>.yaml`` as a mapping of sections; UserError if missing or malformed."""
    path = Path(folder) / f"{name}.yaml"
    if not path.is_file():
        have = ", ".join(available(folder)) or "none"
        raise UserError(f"no profile {name!r} ({path} does not exist); profiles: {have}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if not isinstance(data, dict) or "profile" in data:
        raise UserError(f"{path}: a profile is a mapping of params.yaml sections (without a 'profile' key)")
    unknown = [k for k in data if k not in config.SECTIONS]
    if unknown:
        raise UserError(f"{path}: unknown section {unknown[0]!r}; sections are {', '.join(config.SECTIONS)}")
    if empty := _empty_mapping(data):
        raise UserError(
            f"{path}: {empty}: {{}} keeps params.yaml's mapping (dvc exp run -S merges mappings); "
            "write null to clear it"
        )
    return data


def _empty_mapping(overlay: dict[str, Any], prefix: str = "") -> str | None:
    """The dotted key of the first empty mapping inside ``overlay`` (None if there is none)."""
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (found := _empty_mapping(v, f"{key}.") if v else key):
            return found
    return None


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overlay`` on top: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for k, v in overlay.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def leaves(overlay: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, value) for every non-mapping value of ``overlay`` (lists are values)."""
    out = []
    for k, v in overlay.items():
        key = f"{prefix}{k}"
        out += leaves(v, key + ".") if isinstance(v, dict) and v else [(key, v)]
    return out


def check(name: str, params: Path | None = None, folder: Path = PROFILES_DIR) -> dict[str, Any]:
    """The overlay, after checking that params.yaml with it applied is valid in every section it touches."""
    overlay = load_overlay(name, folder)
    import tempfile

    merged = merge(config.read_params(params), overlay)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        tmp = Path(f.name)
    try:
        tmp.write_text(yaml.safe_dump(merged, sort_keys=False))
        for section in overlay:
            try:
                config.load_section(section, None, tmp)
            except UserError as e:
                raise UserError(
                    f"profile {name}: "
                    f"{str(e).replace(str(tmp), f'{folder}/{name}.yaml on top of {params or PARAMS_FILE}')}"
                ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return overlay


def set_params(name: str, overlay: dict[str, Any]) -> list[str]:
    """The ``-S key=value`` arguments of ``dvc exp run`` that apply the overlay (values in YAML flow style)."""
    args = ["-S", f"profile={name}"]
    for key, value in leaves(overlay):
        text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        text = text.removesuffix("\n...").strip()
        args += ["-S", f"{key}={text}"]
    return args


def command(name: str, params: Path | None = None, folder: Path = PROFILES_DIR) -> list[str]:
    """The ``dvc exp run`` command line that runs the study under profile ``name``."""
    return ["dvc", "exp", "run", "-n", name, *set_params(name, check(name, params, folder))]
