"""dvc.yaml, written from the family registry and the code each stage runs.

``python -m dpcam.pipeline`` prints the pipeline; ``python -m dpcam.pipeline --write`` rewrites
dvc.yaml, ``--check`` exits 1 when dvc.yaml is not what this module writes (``make test`` runs the
same check as a test). Each stage's ``deps`` list the dpcam source files its command imports:
:func:`import_closure` follows every ``import`` statement (function-local ones too) from the
command's entry module, so a change to any code a stage runs makes ``dvc status`` call it stale.
Its ``params`` are the params.yaml keys it reads, so changing a Grad-CAM setting never retrains a
model. A new family in :mod:`dpcam.families` gets its train and explain stages here without an edit.
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml

SRC = Path(__file__).resolve().parents[1]  # the folder that holds the dpcam package
ROOT = SRC.parent  # the project root (where dvc.yaml lives) in a source checkout
DVC_YAML = "dvc.yaml"
# a stage's command runs through the CLI (module-level imports only) and its entry module (everything)
CLI = "dpcam.cli"
ENTRIES = {
    "prepare": "dpcam.data.prepare",
    "ldp": "dpcam.data.ldp",
    "train": "dpcam.train",
    "explain": "dpcam.explain.score",
    "audit": "dpcam.audit",
    "report": "dpcam.report",
}
HEADER = (
    "# Written by `python -m dpcam.pipeline --write` from dpcam.families and the code each stage imports;\n"
    "# edit the registry or dpcam/pipeline.py, not this file (a test checks it is current).\n"
)


# ------------------------------------------------------------------------------------ the import graph


def module_file(module: str) -> Path | None:
    """The source file of a dpcam module (``pkg/__init__.py`` for a package), None if there is none."""
    base = SRC.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@cache
def imports(module: str, top_level_only: bool = False) -> frozenset[str]:
    """The dpcam modules ``module`` imports (all ``import`` statements, or only module-level ones)."""
    path = module_file(module)
    if path is None:
        return frozenset()
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "dpcam")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "dpcam":
                continue
            for a in node.names:  # `from dpcam import tracking` imports the module dpcam.tracking
                sub = f"{base}.{a.name}"
                found.add(sub if module_file(sub) else base)
    found = {m for m in found if module_file(m)}
    return frozenset(found | {p for m in found for p in _parents(m)})


def graph(top_level_only: bool = False) -> dict[str, frozenset[str]]:
    """Every dpcam module and the dpcam modules it imports."""
    mods = []
    for path in sorted((SRC / "dpcam").rglob("*.py")):
        rel = path.relative_to(SRC).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        mods.append(".".join(parts))
    return {m: imports(m, top_level_only) - {m} for m in mods}


def cycles(g: dict[str, frozenset[str]]) -> list[list[str]]:
    """Import cycles of graph ``g`` (each as a path that returns to its start); [] when it is acyclic.

    An import of a package's parent (``dpcam.explain`` by ``dpcam.explain.score``) is not an edge here:
    Python imports the parent package first, which never imports the child back in dpcam.
    """
    found, state = [], {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = "open"
        for n in sorted(g.get(m, ())):
            if m.startswith(n + "."):
                continue
            if state.get(n) == "open":
                found.append(path[path.index(n) :] + [n] if n in path else [m, n])
            elif n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    return found


def import_closure(entry: str) -> list[str]:
    """Source files (relative to the project root) of everything the stage command with this entry module runs."""
    seen: set[str] = set()
    todo = [entry, CLI, *_parents(entry)]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(imports(m, top_level_only=(m == CLI)))
    return sorted(str(module_file(m).relative_to(ROOT)) for m in seen)


# ------------------------------------------------------------------------------------ the stages


def _grid(keys) -> list[str]:
    """``grid.<key>`` for each key, once, leaving out a key whose parent is listed too (DVC reads the parent)."""
    keys = list(dict.fromkeys(keys))
    return [f"grid.{k}" for k in keys if not any(k.startswith(other + ".") for other in keys)]


def _data(kind: str) -> str:
    """The data folder of a family's runs: ``prepared``, ``ldp`` or ``public`` (the prepared set's public set)."""
    if kind == "public":
        return "data/prepared/${prepare.dataset}-public"
    return f"data/{kind}/${{prepare.dataset}}"


def stages() -> dict[str, Any]:
    """The ``stages`` mapping of dvc.yaml."""
    from dpcam.families import FAMILIES

    out: dict[str, Any] = {
        "prepare": {
            "cmd": "dpcam prepare",
            "deps": import_closure(ENTRIES["prepare"]),
            "params": ["prepare"],  # prepare.public too: rerunning it rewrites the same bytes, nothing downstream
            "outs": [_data("prepared")],
        },
        # the public set: another draw (or folder), checked to share no image with the private set
        "prepare-public": {
            "cmd": "dpcam prepare --public",
            "deps": [_data("prepared"), *import_closure(ENTRIES["prepare"])],
            "params": ["prepare"],
            "outs": [_data("public")],
        },
        "ldp": {
            "matrix": {"mechanism": "${ldp.mechanisms}", "epsilon": "${ldp.epsilons}"},
            "cmd": "dpcam ldp --dataset ${prepare.dataset} --mechanism ${item.mechanism} --epsilon ${item.epsilon}",
            "deps": [_data("prepared"), *import_closure(ENTRIES["ldp"])],
            "params": ["ldp.delta", "ldp.seed", "ldp.secure", "ldp.dp_pix"],
            "outs": ["data/ldp/${prepare.dataset}/${item.mechanism}-eps${item.epsilon}"],
        },
        "ldp-figure": {
            "cmd": "dpcam figure ldp --dataset ${prepare.dataset} --out reports/ldp-${prepare.dataset}.png",
            "deps": [_data("ldp"), *import_closure(ENTRIES["ldp"])],
            "outs": ["reports/ldp-${prepare.dataset}.png"],
        },
    }
    for f in FAMILIES.values():
        out[f"train-{f.name}"] = {
            "cmd": f"dpcam train --family {f.name}",
            "deps": [_data(f.data), *(f"models/{n}" for n in f.needs), *import_closure(ENTRIES["train"])],
            "params": [
                "profile",
                "train",
                "grid.name",
                "grid.models",
                "grid.seeds",
                "grid.family_seeds",
                "grid.protocol",
                "grid.overrides",
                *_grid(f.grid_keys + f.train_keys),
            ],
            # kept when the stage reruns: a run whose stamp still matches is not trained again (train.run_stamp)
            "outs": [{f"models/{f.name}": {"persist": True}}],
        }
    for f in FAMILIES.values():
        refs = [f"models/{f.name}"] + (["models/baseline"] if f.reference and f.name != "baseline" else [])
        out[f"explain-{f.name}"] = {
            "cmd": f"dpcam explain --family {f.name}",
            "deps": [*refs, *import_closure(ENTRIES["explain"])],
            "params": ["explain", "grid.models", "grid.seeds", "grid.family_seeds", *_grid(f.grid_keys)],
            "outs": [f"metrics/{f.name}"],
        }
    out["audit"] = {
        # one process for the grid: each process spends ~8 s importing torch, Captum, MLflow
        "cmd": "dpcam audit --grid",
        "deps": [*(f"models/{f.name}" for f in FAMILIES.values()), *import_closure(ENTRIES["audit"])],
        "params": [
            "audit",
            "grid.models",
            "grid.seeds",
            "grid.family_seeds",
            *_grid(k for f in FAMILIES.values() for k in f.grid_keys),
        ],
        "outs": [f"audits/{f.name}" for f in FAMILIES.values()],
    }
    out["report"] = {
        "cmd": "dpcam report",
        "deps": ["models", "metrics", "audits", _data("prepared"), _data("ldp"), *import_closure(ENTRIES["report"])],
        "params": ["grid", "verdict"],
        "outs": [
            "reports/index.html",
            "reports/tables",
            "reports/figures",
            "reports/runs.csv",
            {"reports/plots/accuracy_vs_eps.csv": {"cache": False}},
            {"reports/plots/explain_vs_eps.csv": {"cache": False}},
        ],
        "metrics": [{"reports/metrics.json": {"cache": False}}],
    }
    return out


PLOTS = [
    {
        "accuracy_vs_eps": {
            "template": "scatter",
            "x": "epsilon",
            "x_label": "target ε (non-private runs are not drawn)",
            "y": {"reports/plots/accuracy_vs_eps.csv": ["gaussian_test_accuracy", "laplace_test_accuracy"]},
        }
    },
    {
        "explain_vs_eps": {
            "template": "scatter",
            "x": "epsilon",
            "x_label": "target ε",
            "y": {
                "reports/plots/explain_vs_eps.csv": [
                    "gaussian_masked_score_pct",
                    "laplace_masked_score_pct",
                    "gaussian_avg_drop_pct",
                    "laplace_avg_drop_pct",
                ]
            },
        }
    },
]


def render() -> str:
    """dvc.yaml as this module writes it."""
    body = yaml.safe_dump({"stages": stages(), "plots": PLOTS}, sort_keys=False, allow_unicode=True, width=120)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    path = ROOT / DVC_YAML
    if "--write" in args:
        path.write_text(text)
        print(f"wrote {path}")
    elif "--check" in args:
        if not path.is_file() or path.read_text() != text:
            print(f"{path} is not current; run `python -m dpcam.pipeline --write`", file=sys.stderr)
            return 1
        print(f"{path} is current")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
