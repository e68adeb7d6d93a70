"""How the fine-tuning recipe (``grid.finetune``) was chosen: on validation data of an independent draw.

The families ``finetune-none``, ``finetune-gaussian`` and ``finetune-laplace`` train the classifier head (or the
last block) of a trunk pretrained without privacy on public data. As ``scripts/recipes.py`` does for the
from-scratch recipes, this script chooses their recipe without reading the study's data: the private stand-in
is a synthetic-fundus draw with another generator seed (``--data-seed``, default 1), and the public sets are
built exactly as ``dpcam prepare --public`` builds the study's (generator seed ``prepare.public.seed``, checked
disjoint from the stand-in), for each public-set size of ``--public-n``. Each trunk is trained with the study's
``grid.nonprivate`` recipe and seed (the ``public`` family's), then every candidate fine-tunes it for the
training seeds ``--seeds`` (not the study's), DP candidates at ε = 1 and 5. The score is the mean best-epoch
validation accuracy; a candidate with a run flagged undertrained ranks after every converged one, and ties go
to the cheaper. Writes the section "Public pretraining, private fine-tuning" of ``--out`` (docs/recipes.md),
replacing an earlier one and keeping the rest of the file.

    .venv/bin/python scripts/finetune_recipes.py          # about 30 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADING = "## Public pretraining, private fine-tuning"
NOTE = (
    "What a fine-tuning run trains starts from initialisation: the trunk's head, trained for the public set, is "
    "not loaded, so what the model knows beyond the public trunk it learns from the private data, through the "
    "accountant (docs/privacy.md). In a one-off check on the same stand-in (Gaussian ε = 5, lr 2, trunk of 12000 "
    "public images, seed 0), keeping the public head gave 0.794 validation accuracy and a fresh head 0.791: the "
    "choice costs nothing here. Trainable `last-block` (9.5 k parameters instead of 165) was a candidate for each "
    "DP scheme; it loses to the head, by far for valid Laplace, whose L1 clip must cover a 9.5 k-dimensional gradient."
)
EPSILONS = (1, 5)

# (scheme, trainable, settings): settings are train keys; DP candidates run at every ε of EPSILONS
CANDIDATES = [
    ("gaussian", "head", {"lr": 1.0, "clip": 1.0, "epochs": 8}),
    ("gaussian", "head", {"lr": 2.0, "clip": 1.0, "epochs": 8}),
    ("gaussian", "head", {"lr": 4.0, "clip": 1.0, "epochs": 8}),
    ("gaussian", "head", {"lr": 8.0, "clip": 1.0, "epochs": 8}),
    ("gaussian", "head", {"lr": 2.0, "clip": 1.0, "epochs": 4}),
    ("gaussian", "head", {"lr": 4.0, "clip": 1.0, "epochs": 4}),
    ("gaussian", "last-block", {"lr": 2.0, "clip": 1.0, "epochs": 8}),
    ("laplace", "head", {"lr": 0.5, "clip": 5.0, "epochs": 8}),
    ("laplace", "head", {"lr": 1.0, "clip": 5.0, "epochs": 8}),
    ("laplace", "head", {"lr": 2.0, "clip": 5.0, "epochs": 8}),
    ("laplace", "head", {"lr": 4.0, "clip": 5.0, "epochs": 8}),
    ("laplace", "head", {"lr": 2.0, "clip": 10.0, "epochs": 8}),
    ("laplace", "head", {"lr": 4.0, "clip": 5.0, "epochs": 4}),
    ("laplace", "last-block", {"lr": 2.0, "clip": 50.0, "epochs": 8}),
    ("none", "head", {"lr": 0.1, "batch_size": 128, "epochs": 8}),
    ("none", "head", {"lr": 0.3, "batch_size": 128, "epochs": 8}),
    ("none", "head", {"lr": 0.3, "batch_size": 128, "epochs": 4}),
    ("none", "head", {"lr": 1.0, "batch_size": 128, "epochs": 8}),
]


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-seed", type=int, default=1, help="generator and split seed of the private stand-in")
    p.add_argument("--public-n", type=int, nargs="+", default=[6000, 12000], help="public-set sizes to compare")
    p.add_argument("--seeds", type=int, nargs="+", default=[100], help="training seeds of every candidate")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "recipes.md")
    p.add_argument("--limit", type=int, default=None, help="only the first N candidates (a smoke run)")
    return p.parse_args()


def _fit(base, settings: dict, seed: int):
    """(row of the tables, the FitResult, the TrainConfig) of one training run."""
    from dpcam.config import TrainConfig
    from dpcam.train.fit import fit

    cfg = TrainConfig.model_validate(
        {**base.model_dump(), **settings, "seed": seed, "name": "recipe", "device": "cpu", "keep_best": True}
    )
    started = time.perf_counter()
    res = fit(cfg, progress=False)
    r = res.metrics
    out = {
        "val": r.val_accuracy,
        "undertrained": bool(r.undertrained),
        "curve": r.val_curve,
        "epsilon": r.epsilon,
        "seconds": time.perf_counter() - started,
    }
    return out, res, cfg


def _trunk(base, grid, dataset: str) -> tuple[str, dict]:
    """The public trunk of ``dataset``'s public set, trained as the ``public`` family trains it; its model.pt."""
    from dpcam.data.store import load_dataset
    from dpcam.layout import public_dataset
    from dpcam.saved import save_model

    settings = {
        **grid.nonprivate.model_dump(),
        "scheme": "none",
        "public": True,
        "dataset": dataset,
        "trainable": "all",
        "weights": None,
    }
    row, res, cfg = _fit(base, settings, grid.seeds_of("public")[0])
    out = Path("models") / f"trunk-{dataset}"
    save_model(res.model, cfg, load_dataset(Path("data/prepared") / public_dataset(dataset)), out)
    return str(out / "model.pt"), row


def _label(scheme: str, trainable: str, s: dict) -> str:
    clip = f", C {s['clip']:g} ({'L1' if scheme == 'laplace' else 'L2'})" if "clip" in s else ""
    batch = f", batch {s.get('batch_size', 512)}"
    return f"{trainable}: lr {s['lr']:g}{clip}{batch}, {s['epochs']} epochs"


def _score(runs: list[dict]) -> tuple:
    converged = not any(r["undertrained"] for r in runs)
    return (not converged, -round(statistics.mean(r["val"] for r in runs), 3), sum(r["seconds"] for r in runs))


def _table(rows, scheme: str) -> list[str]:
    eps = scheme != "none"
    head = "| recipe | trunk (public images) | mean val accuracy | " + (
        " | ".join(f"val at ε = {e}" for e in EPSILONS) + " | " if eps else ""
    )
    lines = [
        head + "undertrained runs | seconds per run |",
        "|---|---:|---:|" + ("---:|" * len(EPSILONS) if eps else ""),
    ]
    lines[-1] += "---:|---:|"
    for (sch, trainable, s, n), runs in rows:
        vals = [r["val"] for r in runs]
        per = (
            " | ".join(f"{statistics.mean(r['val'] for r in runs if r['eps'] == e):.3f}" for e in EPSILONS) + " | "
            if eps
            else ""
        )
        lines.append(
            f"| {_label(sch, trainable, s)} | {n} | {statistics.mean(vals):.3f} | {per}"
            f"{sum(r['undertrained'] for r in runs)} of {len(runs)} | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    return lines


def main() -> None:
    a = _args()
    from dpcam import config
    from dpcam.config import PrepareConfig
    from dpcam.data.public import prepare_public
    from dpcam.data.synthetic_stage import prepare_synthetic

    params = ROOT / "params.yaml"
    prep = config.load_section("prepare", path=params)
    base = config.load_section("train", path=params)
    grid = config.load_section("grid", path=params)
    os.chdir(tempfile.mkdtemp(prefix="dpcam-ft-recipes-"))
    started = time.perf_counter()
    draw = PrepareConfig.model_validate({**prep.model_dump(), "seed": a.data_seed, "dataset": "draw"})
    prepare_synthetic(draw)
    trunks, trunk_rows = {}, {}
    for n in a.public_n:
        name = f"draw{n}"
        os.symlink("draw", f"data/prepared/{name}")  # the same private stand-in; its own public set of n images
        prepare_public(draw.model_copy(update={"dataset": name, "public": prep.public.model_copy(update={"n": n})}))
        trunks[n], trunk_rows[n] = _trunk(base, grid, name)
        print(f"trunk on {n} public images: public val {trunk_rows[n]['val']:.3f}", flush=True)

    largest = max(a.public_n)
    cands = CANDIDATES[: a.limit] if a.limit else CANDIDATES
    # every candidate on the largest public set; on the smaller ones, the first candidate of each scheme
    firsts = [
        next(c for c in cands if c[0] == s) for s in ("gaussian", "laplace", "none") if any(c[0] == s for c in cands)
    ]
    plan = [(c, largest) for c in cands] + [(c, n) for n in sorted(a.public_n) if n != largest for c in firsts]
    results = []
    for (scheme, trainable, s), n in plan:
        ft = {**s, "scheme": scheme, "trainable": trainable, "weights": trunks[n], "dataset": f"draw{n}"}
        runs = []
        for e in EPSILONS if scheme != "none" else (None,):
            for seed in a.seeds:
                row, _, _ = _fit(base, {**ft, **({"epsilon": e} if e else {})}, seed)
                runs.append({**row, "eps": e})
        results.append(((scheme, trainable, s, n), runs))
        print(f"{scheme} {_label(scheme, trainable, s)} trunk {n}: val {statistics.mean(r['val'] for r in runs):.3f}")
    minutes = (time.perf_counter() - started) / 60

    chosen = {}
    text = [
        HEADING,
        "",
        "Written by `scripts/finetune_recipes.py` (rerun it to reproduce). The private stand-in is synthetic-fundus "
        f"drawn with generator and split seed {a.data_seed} (the study uses {prep.seed}); each public set is made as "
        f"`dpcam prepare --public` makes the study's (generator seed {prep.public.seed}, checked to share no image "
        "with the stand-in), of "
        + " or ".join(map(str, a.public_n))
        + " images. The trunk is trained on it with the `grid.nonprivate` recipe and seed, as the `public` family "
        "trains it, then each candidate trains the head (or the last block) from initialisation on the stand-in's "
        f"training split for training seeds {', '.join(map(str, a.seeds))}, DP candidates at ε = "
        + " and ".join(map(str, EPSILONS))
        + ". The score is the mean best-epoch validation accuracy on the stand-in (a candidate with a run flagged "
        "undertrained ranks after every converged one; equal scores to three decimals go to the cheaper). No image "
        "of the study's private data was read.",
        "",
        NOTE,
        "",
        "Trunks: "
        + "; ".join(
            f"{n} public images, public validation {trunk_rows[n]['val']:.3f} ({trunk_rows[n]['seconds']:.0f} s)"
            for n in a.public_n
        )
        + ".",
        "",
    ]
    for scheme, title in (
        ("gaussian", "finetune-gaussian (L2 clip, Gaussian noise)"),
        ("laplace", "finetune-laplace (L1 clip, Laplace noise, PLD ε)"),
        ("none", "finetune-none (no clipping, no noise)"),
    ):
        rows = sorted([r for r in results if r[0][0] == scheme], key=lambda r: _score(r[1]))
        if not rows:
            continue
        (_, trainable, s, n), _ = rows[0]
        chosen[scheme] = {"trainable": trainable, **s, "public_n": n}
        text += [
            f"### {title}: chosen {_label(scheme, trainable, s)} on {n} public images",
            "",
            *_table(rows, scheme),
            "",
        ]
    text += [f"{len(results)} candidates, {minutes:.0f} minutes.", ""]
    section = "\n".join(text)
    old = a.out.read_text() if a.out.is_file() else ""
    keep = old.split("\n" + HEADING)[0].rstrip("\n") if HEADING in old else old.rstrip("\n")
    a.out.write_text(keep + "\n\n" + section)
    raw = {
        "trunks": trunk_rows,
        "results": [[list(k[:2]) + [k[2], k[3]], runs] for k, runs in results],
        "chosen": chosen,
    }
    a.out.with_name("recipes-finetune.json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {a.out}; chosen: {chosen}")


if __name__ == "__main__":
    main()
