"""A tiny hand-written grid for the report tests: its stage records (valid typed records) and readers of the report."""

import csv
import json

import numpy as np

from dpcam.config import GridConfig
from dpcam.families import grid_runs
from tests.conftest import make_tiny

T_975_1 = 12.706204736174707  # Student t quantile t_{0.975, 1}, from tables


def fake_grid(**kw) -> GridConfig:
    base = {
        "models": ["smallcnn"],
        "seeds": [0, 1],
        "gaussian": [1, 5],
        "laplace": [5],
        "baselines": ["none", "clip-only"],
        "ldp": ["singh-sikka-eps0.5"],
        "clip_sweep": {"epsilon": 1, "clips": [0.1]},
        "train_sizes": {"sizes": [100], "gaussian": [5], "none": False, "epochs": None},
        "family_seeds": {},  # every family on every seed
        "finetune": {"schemes": []},  # no public trunk (test_tables.py turns it on)
        "schedules": None,  # the train section's recipe for every ε (test_verdict.py sets schedules)
    }
    return GridConfig(**{**base, **kw})


# hand-chosen values: gaussian ε = 1 has test accuracy 0.5 / 0.7 and Average Drop 20 / 30 over seeds 0 / 1
SPECIAL = {
    ("gaussian-eps1-smallcnn-s0", "test_accuracy"): 0.5,
    ("gaussian-eps1-smallcnn-s1", "test_accuracy"): 0.7,
    ("gaussian-eps1-smallcnn-s0", "avg_drop_pct"): 20.0,
    ("gaussian-eps1-smallcnn-s1", "avg_drop_pct"): 30.0,
}


# hand-chosen audit values: loss-attack AUC 0.52 / 0.56 and ε lower bound 0.1 / 0.3 for gaussian ε = 1
AUDIT_SPECIAL = {
    ("gaussian-eps1-smallcnn-s0", "mia_auc_loss"): 0.52,
    ("gaussian-eps1-smallcnn-s1", "mia_auc_loss"): 0.56,
    ("gaussian-eps1-smallcnn-s0", "mia_epsilon_lb"): 0.1,
    ("gaussian-eps1-smallcnn-s1", "mia_epsilon_lb"): 0.3,
}
VIOLATING = "gaussian-eps5-smallcnn-s1"


def _attack(auc: float) -> dict:
    """One attack's metrics (records.AttackMetrics): only ``auc`` matters to the report."""
    return {
        "auc": auc,
        "balanced_accuracy": 0.5,
        "balanced_accuracy_oracle": 0.5,
        "tpr_at_fpr_0.01": 0.01,
        "tpr_at_fpr_0.001": 0.001,
        "epsilon_lb": 0.0,
        "threshold": 0.5,
        "tp": 10,
        "fp": 10,
        "tpr": 0.1,
        "fpr": 0.1,
        "tpr_lo": 0.05,
        "fpr_hi": 0.15,
    }


def _check(private: bool, violation: bool) -> dict:
    """The audit's check of the run's guarantee (records.AuditCheck)."""
    from dpcam.names import ATTACKS

    row = {
        "allowed_tpr_line": 0.2,
        "within_line": True,
        "allowed_tpr_pld": None,
        "within_pld": None,
        "violation": False,
    }
    per_attack = (
        {
            a: {**row, "within_line": not (violation and a == "loss"), "violation": violation and a == "loss"}
            for a in ATTACKS
        }
        if private
        else {}
    )
    return {
        "done": private,
        "bound": "pld-curve+eps-delta-line" if private else None,
        "per_attack": per_attack,
        "confidence": 0.95,
        "violations": ["loss"] if violation else [],
    }


def write_fake_audit(spec, k: int) -> None:
    """audits/<family>/<run>/audit.json as dpcam.audit writes it (a valid records.AuditRecord)."""
    from dpcam.names import ATTACKS

    def v(key, default):
        return AUDIT_SPECIAL.get((spec.name, key), default)

    private = spec.scheme in ("gaussian", "laplace")
    aucs = {
        f"mia_auc_{a.replace('-', '_')}": v(f"mia_auc_{a.replace('-', '_')}", 0.5 + 0.01 * i)
        for i, a in enumerate(ATTACKS)
    }
    violation = spec.name == VIOLATING
    audit = {
        "run_name": spec.name,
        "dataset": "tiny",
        "data_dir": "data/prepared/tiny",
        "privacy": {"scheme": spec.scheme, "epsilon": spec.epsilon, "delta": 1e-5},
        "members": 100,
        "non_members": 100,
        "selection_members": 50,
        "selection_non_members": 50,
        "evaluation_members": 50,
        "evaluation_non_members": 50,
        "fpr_resolution": 0.02,
        "member_accuracy": 0.8,
        "non_member_accuracy": 0.78,
        "member_loss": 0.5,
        "non_member_loss": 0.55,
        "seed": 0,
        "confidence": 0.95,
        "per_attack_confidence": 0.99,
        "explained_class": "label",
        "attacks": {a: _attack(aucs[f"mia_auc_{a.replace('-', '_')}"]) for a in ATTACKS},
        "mia_auc": max(aucs.values()),
        **aucs,
        "mia_epsilon_lb": v("mia_epsilon_lb", 0.05 * k),
        "epsilon_lb_max_detectable": 3.2,
        "violation": violation,
        "check": _check(private, violation),
    }
    spec.audit_dir.mkdir(parents=True, exist_ok=True)
    (spec.audit_dir / "audit.json").write_text(json.dumps(audit))


def write_fake_runs(
    grid: GridConfig, degenerate=("laplace-eps5-smallcnn-s1",), skip=(), audits=(), methods=("gradcam",)
) -> None:
    """train.json / explain.json / maps of every grid run, on a tiny prepared dataset (data/prepared/tiny);
    audit.json for the runs of the families in ``audits``; with several ``methods``, the files of the others and
    their agreement in the headline families' ``methods/`` folders, as the explain stage writes them."""
    data = make_tiny(n=40, size=16)
    from dpcam.data.store import load_dataset

    test_idx = load_dataset(data).splits["test"]
    for k, spec in enumerate(grid_runs(grid)):

        def v(key, default, name=spec.name):
            return SPECIAL.get((name, key), default)

        private, bad = spec.scheme in ("gaussian", "laplace"), spec.name in degenerate
        train = {
            "dataset": "tiny",
            "ldp": spec.ldp,
            "model": spec.model,
            "scheme": spec.scheme,
            "ldp_guarantee": {"words": "no image-level guarantee (fake)"} if spec.ldp else None,
            "target_epsilon": spec.epsilon if private else None,
            "epsilon": spec.epsilon * 0.99 if private else None,
            "delta": 1e-5,
            "noise_multiplier": 1.1 if private else None,
            "max_grad_norm": 1.0,
            "sample_rate": 0.03,
            "steps": 33,
            "accountant": "prv",
            "epsilon_rdp_check": 1.2 if private else None,
            "epochs": 1,
            "train_size": spec.train_size or 28,
            "best_epoch": 1,
            "val_accuracy": 0.75,
            "test_accuracy": v("test_accuracy", 0.8 - 0.01 * k),
            "test_macro_f1": 0.6,
            "test_qwk": 0.5,
            "test_pred_histogram": [4, 4],
            "test_majority_share": 0.5,
            "train_seconds": 1.5,
            "device": "cpu",
            "collapsed": False,
            "run_name": spec.name,
            "mlflow_run_id": f"{k:032x}",
            "mlflow_model_uri": f"models:/m-{k}",
        }
        degeneracy = {
            "n": int(test_idx.size),
            "accuracy": 0.8,
            "chance": 0.5,
            "majority_class": 0,
            "majority_share": 0.5,
            "pred_entropy": 1.0,
            "pred_histogram": [4, 4],
            "input_sensitivity": 0.3,
            "degenerate": bad,
            "reasons": ["near chance: fake"] if bad else [],
        }
        explain = {
            "run_name": spec.name,
            "dataset": "tiny",
            "data_dir": str(data),
            "method": "gradcam",
            "target": "prediction",
            "images": int(test_idx.size),
            "avg_drop_pct": v("avg_drop_pct", 10.0 + k),
            "increase_conf_pct": 40.0,
            "masked_score_pct": 55.0,
            "masked_accuracy_pct": 60.0 + k,
            "deletion_auc": 0.2,
            "insertion_auc": 0.7,
            "pointing_game": 0.5,
            "randomisation_agreement": 0.1,
            "degeneracy": degeneracy,
            "degenerate": bad,
            "accuracy": 0.8,
            "notes": [],
        }
        if spec.scheme != "none":
            explain["map_agreement"] = 0.4
        spec.model_dir.mkdir(parents=True, exist_ok=True)
        spec.metrics_dir.mkdir(parents=True, exist_ok=True)
        if (spec.name, "train.json") not in skip:
            (spec.model_dir / "train.json").write_text(json.dumps(train))
        if (spec.name, "explain.json") not in skip:
            (spec.metrics_dir / "explain.json").write_text(json.dumps(explain))
        rng = np.random.default_rng(k)
        np.save(spec.metrics_dir / "maps.npy", rng.random((test_idx.size, 16, 16)).astype(np.float16))
        np.save(spec.metrics_dir / "map_indices.npy", test_idx.astype(np.int64))
        write_fake_per_image(spec, explain, test_idx, rng)
        if len(methods) > 1 and spec.family in ("baseline", "gaussian"):
            write_fake_methods(spec, explain, test_idx, rng, methods)
        if spec.family in audits:
            write_fake_audit(spec, k)


def write_fake_methods(spec, explain: dict, test_idx: np.ndarray, rng, methods) -> None:
    """metrics/<run>/methods/<method>/ (explain.json, maps, per_image.npz) and methods/agreement.npz."""
    (spec.metrics_dir / "explain.json").write_text(json.dumps({**explain, "methods": list(methods)}))
    for m in methods[1:]:
        folder = spec.metrics_dir / "methods" / m
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "explain.json").write_text(json.dumps({**explain, "method": m}))
        np.save(folder / "maps.npy", rng.random((test_idx.size, 16, 16)).astype(np.float16))
        np.save(folder / "map_indices.npy", test_idx.astype(np.int64))
        values = {k: v for k, v in np.load(spec.metrics_dir / "per_image.npz").items()}
        np.savez(folder / "per_image.npz", **values)
    pairs = {f"{a}|{b}": rng.uniform(0.2, 0.8, test_idx.size) for i, a in enumerate(methods) for b in methods[i + 1 :]}
    np.savez(spec.metrics_dir / "methods" / "agreement.npz", index=test_idx.astype(np.int64), **pairs)


def write_fake_per_image(spec, explain: dict, test_idx: np.ndarray, rng) -> None:
    """per_image.npz (each metric: its explain.json mean plus zero-mean noise) and predictions.npz."""
    n = test_idx.size
    keys = [k for k, v in explain.items() if isinstance(v, float) and k not in ("accuracy",)]
    noise = rng.normal(0, 1, n)
    noise -= noise.mean()
    values = {k: np.full(n, explain[k]) + 0.01 * noise for k in keys}
    np.savez(spec.metrics_dir / "per_image.npz", index=test_idx.astype(np.int64), **values)
    labels = np.arange(n) % 2
    pred = np.where(rng.random(n) < 0.8, labels, 1 - labels)
    conf = rng.uniform(0.5, 1.0, n)  # the predicted class's probability (two classes)
    prob = np.where(pred[:, None] == np.arange(2), conf[:, None], 1 - conf[:, None]).astype(np.float32)
    np.savez(spec.model_dir / "predictions.npz", index=test_idx.astype(np.int64), pred=pred, label=labels, prob=prob)


def read_csv(path: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def md_row(md: str, section: str, label: str) -> list[str]:
    """Cells of the row starting with ``label`` in the Markdown section ``## <section>``."""
    block = md.split(f"## {section}", 1)[1]
    line = next(row for row in block.splitlines() if row.startswith(f"| {label}"))
    return [c.strip() for c in line.strip("|").split("|")]
