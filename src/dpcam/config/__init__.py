"""params.yaml: its sections as validated models, CLI overrides, and one-line errors.

The ground floor of the package: it imports nothing from dpcam but ``errors``, ``names`` (leaf
registries of names) and ``layout`` (paths). Each pipeline stage reads only its own section (DVC's
rule: a stage depends on its own params), so changing an explanation setting never retrains a
model. Every invalid value becomes a ``UserError`` naming the file or flag, the key, the bad value
and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dpcam.config.sections import (  # noqa: F401  (re-exported: the models every stage reads)
    DATASET_NAME,
    SECTIONS,
    AuditConfig,
    ClipSweepConfig,
    DpPixConfig,
    ExplainConfig,
    FinetuneConfig,
    GridConfig,
    LdpConfig,
    NonPrivateConfig,
    PrepareConfig,
    PublicConfig,
    ScheduleConfig,
    SearchConfig,
    Section,
    SplitConfig,
    SyntheticConfig,
    TrainConfig,
    TrainSizesConfig,
    VerdictConfig,
)
from dpcam.errors import UserError
from dpcam.layout import MANIFEST, PARAMS_FILE, PREPARED_ROOT, format_eps  # noqa: F401

# top-level keys of params.yaml besides the sections: the profile a run was made under
TOP_LEVEL = ("profile",)
DEFAULT_PROFILE = "quick"


def read_params(path: Path | None = None) -> dict[str, Any]:
    """The raw params mapping of ``path`` (default params.yaml; {} when that default does not exist).

    An explicitly named file must exist. Unknown top-level keys (a misspelled section) are refused.
    """
    explicit = path is not None
    path = Path(path) if explicit else PARAMS_FILE
    if not path.exists():
        if explicit and path != PARAMS_FILE:
            raise UserError(f"--params {path}: no such file; give an existing params file (e.g. params.yaml)")
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UserError(f"{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({type(e).__name__}: {e}); give a readable UTF-8 YAML file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: must be a mapping of sections ({', '.join(SECTIONS)})")
    unknown = [k for k in data if k not in SECTIONS and k not in TOP_LEVEL]
    if unknown:
        raise UserError(
            f"{path}: unknown top-level key {unknown[0]!r}; sections are {', '.join(SECTIONS)} "
            f"(and {', '.join(TOP_LEVEL)}); fix the spelling"
        )
    return data


def profile_of(path: Path | None = None) -> str:
    """The profile the params file says it is (``profile:``; ``quick`` when unset): recorded by every run."""
    value = read_params(path).get("profile") or DEFAULT_PROFILE
    return str(value)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    d[leaf] = value


def _deep_copy(d):
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_section(name: str, overrides: dict[str, Any] | None = None, path: Path | None = None):
    """Validate section ``name`` of params.yaml with CLI ``overrides`` (dotted keys; None = unset).

    A params file that exists but lacks the section is refused (its defaults would silently stand
    in). Raises ``UserError`` with one line: ``<file or --flag>: <section>.<key> = <value>: <what is allowed>``.
    """
    raw = read_params(path)
    shown = Path(path) if path is not None else PARAMS_FILE
    if raw and name not in raw:
        raise UserError(f"{shown}: has no {name!r} section; add it (the shipped params.yaml lists every key)")
    section = raw.get(name) or {}
    if not isinstance(section, dict):
        raise UserError(f"{shown}: section {name!r} must be a mapping")
    section = _deep_copy(section)
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    for key, value in flags.items():
        _set_dotted(section, key, value)
    try:
        return SECTIONS[name].model_validate(section)
    except ValidationError as e:
        raise UserError(_one_line(e, name, shown, flags)) from None


# list-valued keys whose CLI flag is singular and repeatable
_FLAG_NAMES = {
    "mechanisms": "mechanism",
    "epsilons": "epsilon",
    "synthetic.n": "n",
    "metrics": "metric",
    "attacks": "attack",
}


def _flag(dotted: str) -> str:
    return f"--{_FLAG_NAMES.get(dotted, dotted).replace('_', '-')}"


def _one_line(e: ValidationError, section: str, path: Path, flags: dict[str, Any]) -> str:
    err = e.errors(include_url=False)[0]
    loc = [str(p) for p in err["loc"] if not str(p).startswith(("literal[", "list[", "function-"))]
    key = section
    for p in loc:  # keep list indices as [i]
        key += f"[{p}]" if p.isdigit() else f".{p}"
    dotted = ".".join(p for p in loc if not p.isdigit())  # ldp.epsilons[1] came from the flag "epsilons"
    origin = _flag(dotted) if dotted in flags else str(path)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(SECTIONS[section].model_fields) if len(loc) == 1 else "see the shipped params.yaml"
        return f"{origin}: unknown key {key}; allowed keys: {allowed}"
    if err["type"] == "missing":
        return f"{origin}: {key} is required"
    if err["type"] == "string_pattern_mismatch" and err.get("ctx", {}).get("pattern") == DATASET_NAME:
        return (
            f"{origin}: {key} = {err.get('input')!r}: not a plain name; use letters, digits, '_', '.' and '-' "
            "(starting with a letter or digit), not a path"
        )
    if not loc:  # a model-level check: its message starts with the key it is about
        head = msg.split(" ", 1)[0].split(".")[0]
        origin = _flag(head) if head in flags else str(path)
        return f"{origin}: {section}.{msg}"
    return f"{origin}: {key} = {err.get('input')!r}: {msg}"


def default_dataset(path: Path | None = None) -> str:
    """The dataset a stage works on when no --dataset is given: ``prepare.dataset`` in params."""
    name = (read_params(path).get("prepare") or {}).get("dataset", PrepareConfig.model_fields["dataset"].default)
    return str(name)


def prepared_dir(dataset: str) -> Path:
    """data/prepared/<dataset>, or a UserError listing what has been prepared."""
    path = PREPARED_ROOT / dataset
    if not (path / MANIFEST).is_file():
        have = sorted(p.name for p in PREPARED_ROOT.glob("*") if (p / MANIFEST).is_file())
        hint = f"prepared datasets: {', '.join(have)}" if have else "nothing is prepared yet"
        raise UserError(
            f"unknown dataset {dataset!r} (no {path}/manifest.json; {hint}); "
            f"run `dpcam prepare --dataset {dataset}` first"
        )
    return path
