"""dvc.yaml, written from the family registry and the code each stage runs.

``python -m dpcam.pipeline`` prints the pipeline; ``python -m dpcam.pipeline --write`` rewrites
dvc.yaml, ``--check`` exits 1 when dvc.yaml is not what this module writes (``make test`` runs the
same check as a test). Each stage's ``deps`` list the dpcam source files its command imports:
:func:`dpcam.codegraph.import_closure` follows every ``import`` statement (function-local ones too) from the
command's entry module, so a change to any code a stage runs makes ``dvc status`` call it stale.
Its ``params`` are the params.yaml keys it reads, so changing a Grad-CAM setting never retrains a
model. A new family in :mod:`dpcam.families` gets its train and explain stages here without an edit.
"""

from __future__ import annotations

import sys
from typing import Any

import yaml

from dpcam.codegraph import ROOT, import_closure

DVC_YAML = "dvc.yaml"
ENTRIES = {
    "prepare": "dpcam.data.prepare",
    "ldp": "dpcam.data.ldp",
    "train": "dpcam.train.family",
    "explain": "dpcam.explain.score",
    "audit": "dpcam.audit",
    "report": "dpcam.report",
}
HEADER = (
    "# Written by `python -m dpcam.pipeline --write` from dpcam.families and the code each stage imports;\n"
    "# edit the registry or dpcam/pipeline.py, not this file (a test checks it is current).\n"
)


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
    """The ``stages`` mapping of dvc.yaml (long by declaration: one literal per stage, as dvc.yaml shows it)."""
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
                # a Gaussian run of any family, and the references, train their band's recipe
                *_grid(dict.fromkeys((*f.grid_keys, *f.train_keys, "schedules"))),
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
