"""How the quick study's training recipes were chosen: under one compute budget, on an independent draw.

The study splits what ε costs into the DP budget, clipping and noise (docs/verdict.md), so every recipe is
chosen under one stated **compute budget**: at most ``--budget`` epochs of examples processed (epochs × views
per example; a step's cost on CPU and GPU alike grows with the examples it processes, and DP-SGD's privacy
spend with the epochs), each recipe tuned to its best inside it:

1. **Non-private** (ε = ∞, the reference): SGD candidates of up to the budget.
2. **DP schedules, per band of ε** (``BANDS``; the best schedule at ε = 10 is not the best at ε = 1): every
   schedule of ``SCHEDULES`` (8–32 epochs, batch 256–2048 with the learning rate scaled linearly
   from lr 1 at batch 512), scored at the band's largest ε (1 and 10: the ε the DP literature quotes, and half the
   runs of scoring both), one training seed.
3. **DP practice, per band**, on the band's best schedule, the same seed: momentum or not (momentum 0
   with the learning rate × 10, the same effective step), an exponential moving average of the weights (De et
   al. 2022), flip-and-shift augmentation, and augmentation multiplicity (4 views averaged before clipping,
   with a quarter of the epochs: the same examples processed).
4. **The budget references**: ε = ∞ trained with each band's chosen schedule (same batch, epochs and views, no
   clipping), its learning rate tuned.

Everything trains on a synthetic-fundus set drawn with another generator and split seed (``--data-seed``,
default 1; the study uses 0) with training seeds other than the study's, so choosing reads no image of the
study's data and costs it no privacy. The score is the mean best-epoch validation accuracy of that draw; a
candidate with a run flagged undertrained (``dpcam.train.fit.undertrained``) ranks after every converged one.
Runs go two at a time (one torch thread each). Writes docs/recipes.md (and its .json) and prints the
``grid`` keys to put in params.yaml.

    .venv/bin/python scripts/recipes.py --cache /tmp/recipes-cache.json    # 84 minutes on 2 CPU cores (2026-12-07)
    .venv/bin/python scripts/recipes.py --limit 1 --budget 2 --epochs-scale 0.125    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BANDS = {"short": (0.5, 1), "long": (5, 10)}  # the grid's Gaussian ε, two bands
NONPRIVATE = [
    {"lr": lr, "batch_size": b, "epochs": e, "momentum": 0.9}
    for lr, b, e in [(0.1, 128, 12), (0.1, 128, 24), (0.2, 256, 24), (0.05, 128, 24), (0.1, 128, 16), (0.1, 128, 32)]
]
SCHEDULES = [
    {"batch_size": b, "epochs": e}
    for b, e in [(512, 8), (512, 16), (512, 24), (1024, 24), (2048, 24), (256, 16), (512, 32), (1024, 32)]
]
PRACTICE = {
    "momentum 0.9": {},
    "momentum 0 (lr × 10)": {"momentum": 0.0, "lr_factor": 10.0},
    "EMA 0.99": {"ema": 0.99},
    "flip-shift": {"augment": "flip-shift"},
    "flip-shift × 4 views": {"augment": "flip-shift", "aug_mult": 4, "epochs_factor": 0.25},
}
REFERENCE_LRS = (0.1, 0.2, 0.4, 0.8)


def _args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-seed", type=int, default=1, help="generator and split seed of the independent draw")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[100],
        help="training seeds (one seed per candidate: a ~40-minute search on 2 cores)",
    )
    p.add_argument("--budget", type=int, default=32, help="epochs of examples processed, at most (grid.budget)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--epochs-scale", type=float, default=1.0, help="multiply every epoch count (a smoke run)")
    p.add_argument("--limit", type=int, default=None, help="only the first N candidates of each list (a smoke run)")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "recipes.md")
    p.add_argument("--cache", type=Path, default=None, help="JSON file of finished runs: a stopped search resumes")
    return p.parse_args()


# ------------------------------------------------------------------------------------------------ one run


def _init(folder: str) -> None:
    import torch

    torch.set_num_threads(1)
    os.chdir(folder)


def _train(job: tuple[dict, dict]) -> dict:
    """One candidate run in a worker: (settings, meta) -> meta with val, undertrained, curve, seconds."""
    import warnings

    from dpcam import config
    from dpcam.config import TrainConfig
    from dpcam.train.fit import fit

    settings, meta = job
    base = config.load_section("train", path=ROOT / "params.yaml")
    cfg = TrainConfig.model_validate(
        {**base.model_dump(), **settings, "dataset": "draw", "name": "recipe", "device": "cpu"}
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = fit(cfg, progress=False).metrics
    return {
        **meta,
        "val": r.val_accuracy,
        "undertrained": bool(r.undertrained),
        "curve": r.val_curve,
        "seconds": time.perf_counter() - started,
        "epsilon": r.epsilon,
    }


_DONE: dict[str, dict] = {}  # runs already trained (same settings, same seed): reused, not trained again
_CACHE: list = [None]  # where _DONE is kept between invocations (--cache)


def _run(pool, jobs: list[tuple[dict, dict]]) -> list[dict]:
    key = lambda job: json.dumps(job[0], sort_keys=True)
    out = [{**_DONE[key(j)], **j[1]} for j in jobs if key(j) in _DONE]
    todo = [j for j in jobs if key(j) not in _DONE]
    for (settings, _), r in zip(todo, pool.imap(_train, todo)):
        _DONE[json.dumps(settings, sort_keys=True)] = r
        if _CACHE[0] is not None:
            _CACHE[0].write_text(json.dumps(_DONE))
        print(
            f"  {r['label']} [{r.get('epsilon_target', '∞')}, seed {r['seed']}]: val {r['val']:.3f}"
            f"{' (undertrained)' if r['undertrained'] else ''} {r['seconds']:.0f} s",
            flush=True,
        )
        out.append(r)
    return out


def _rank(results: list[dict]) -> list[tuple[str, list[dict]]]:
    """Candidates (by label) best first: converged, then higher mean validation accuracy, then cheaper."""
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)

    def key(item):
        runs = item[1]
        return (
            any(r["undertrained"] for r in runs),
            -statistics.mean(r["val"] for r in runs),
            sum(r["seconds"] for r in runs),
        )

    return sorted(by.items(), key=key)


def _table(ranked: list[tuple[str, list[dict]]], by_eps: tuple = ()) -> list[str]:
    cols = "".join(f" val at ε = {e:g} |" for e in by_eps)
    lines = [
        f"| recipe | mean val accuracy |{cols} min–max | undertrained runs | seconds per run |",
        "|---|---:|" + "---:|" * len(by_eps) + "---:|---:|---:|",
    ]
    for label, runs in ranked:
        vals = [r["val"] for r in runs]
        per = "".join(
            f" {statistics.mean(r['val'] for r in runs if r.get('epsilon_target') == e):.3f} |" for e in by_eps
        )
        lines.append(
            f"| {label} | {statistics.mean(vals):.3f} |{per} {min(vals):.3f}–{max(vals):.3f} | "
            f"{sum(r['undertrained'] for r in runs)} of {len(runs)} | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
    return lines


# ------------------------------------------------------------------------------------------------ stages


def _epochs(e: float, a) -> int:
    return max(1, round(e * a.epochs_scale))


def _dp_jobs(recipes: list[tuple[str, dict]], eps: tuple, seeds: list[int]) -> list[tuple[dict, dict]]:
    return [
        ({**r, "scheme": "gaussian", "epsilon": e, "seed": s}, {"label": label, "epsilon_target": e, "seed": s})
        for label, r in recipes
        for e in eps
        for s in seeds
    ]


def _schedule(s: dict, a) -> dict:
    return {
        "batch_size": s["batch_size"],
        "epochs": _epochs(s["epochs"], a),
        "lr": s["batch_size"] / 512,
        "momentum": 0.9,
        "clip": 1.0,
    }


def _schedule_label(r: dict) -> str:
    views = f" × {r['aug_mult']} views" if r.get("aug_mult", 1) > 1 else ""
    extra = "".join(f", {k} {r[k]}" for k in ("ema", "augment") if r.get(k) not in (None, "none"))
    return f"batch {r['batch_size']}, {r['epochs']} epochs{views}, lr {r['lr']:g}, momentum {r['momentum']:g}{extra}"


def _practice(best: dict, a) -> list[tuple[str, dict]]:
    out = []
    for name, v in PRACTICE.items():
        r = {**best, **{k: x for k, x in v.items() if not k.endswith("_factor")}}
        r["lr"] = best["lr"] * v.get("lr_factor", 1.0)
        r["epochs"] = max(1, round(best["epochs"] * v.get("epochs_factor", 1.0)))
        if r.get("aug_mult", 1) * r["epochs"] <= a.budget:
            out.append((f"{name}: {_schedule_label(r)}", r))
    return out


def main() -> None:
    a = _args()
    from dpcam import config
    from dpcam.config import PrepareConfig
    from dpcam.data.synthetic_stage import prepare_synthetic

    lim = (lambda xs: xs[: a.limit]) if a.limit else (lambda xs: xs)
    if a.cache is not None:
        _CACHE[0] = a.cache.resolve()
        if a.cache.is_file():
            cached = json.loads(a.cache.read_text())
            if cached.get("_draw") == [a.data_seed, a.epochs_scale]:
                _DONE.update(cached)
        _DONE["_draw"] = [a.data_seed, a.epochs_scale]
    prep = config.load_section("prepare", path=ROOT / "params.yaml")
    folder = tempfile.mkdtemp(prefix="dpcam-recipes-")
    os.chdir(folder)
    prepare_synthetic(PrepareConfig.model_validate({**prep.model_dump(), "seed": a.data_seed, "dataset": "draw"}))
    started = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(a.workers, initializer=_init, initargs=(folder,)) as pool:
        print("non-private candidates", flush=True)
        np_jobs = [
            (
                {**r, "epochs": _epochs(r["epochs"], a), "scheme": "none", "seed": s},
                {"label": f"sgd lr {r['lr']:g}, batch {r['batch_size']}, {_epochs(r['epochs'], a)} epochs", "seed": s},
            )
            for r in lim(NONPRIVATE)
            if _epochs(r["epochs"], a) <= a.budget
            for s in a.seeds
        ]
        nonprivate = _rank(_run(pool, np_jobs))
        chosen, stage1, stage2, refs = {}, {}, {}, {}
        for band, eps in BANDS.items():
            print(f"DP schedules, band {band} (ε {eps})", flush=True)
            cands = [
                (_schedule_label(_schedule(s, a)), _schedule(s, a))
                for s in lim(SCHEDULES)
                if _epochs(s["epochs"], a) <= a.budget
            ]
            stage1[band] = _rank(_run(pool, _dp_jobs(cands, eps[-1:], a.seeds)))
            best = dict(cands)[stage1[band][0][0]]
            print(f"DP practice, band {band}, on {stage1[band][0][0]}", flush=True)
            stage2[band] = _rank(_run(pool, _dp_jobs(lim(_practice(best, a)), eps[-1:], a.seeds)))
            chosen[band] = dict(_practice(best, a))[stage2[band][0][0]]
            print(f"budget reference, band {band}", flush=True)
            c = chosen[band]
            ref = {k: c[k] for k in ("batch_size", "epochs", "momentum") if k in c}
            ref.update({k: c[k] for k in ("ema", "augment", "aug_mult") if k in c})
            jobs = [
                ({**ref, "lr": lr, "scheme": "none", "seed": s}, {"label": f"lr {lr:g}", "seed": s})
                for lr in lim(list(REFERENCE_LRS))
                for s in a.seeds
            ]
            refs[band] = _rank(_run(pool, jobs))
    minutes = (time.perf_counter() - started) / 60
    _write(a, nonprivate, stage1, stage2, refs, chosen, minutes)


def _write(a, nonprivate, stage1, stage2, refs, chosen, minutes) -> None:
    runs = [v["seconds"] for k, v in _DONE.items() if k != "_draw"]
    schedules = {}
    for band, c in chosen.items():
        lr = float(refs[band][0][0].removeprefix("lr "))
        keys = {k: c[k] for k in ("epochs", "batch_size", "lr", "momentum", "clip")}
        keys.update({k: c[k] for k in ("ema", "augment", "aug_mult") if c.get(k) not in (None, "none", 1)})
        top = None if band == list(BANDS)[-1] else max(BANDS[band])  # the last band holds every larger ε
        schedules[band] = {"max_epsilon": top, **keys, "reference_lr": lr}
    text = [
        "# How the quick study's recipes were chosen",
        "",
        "Written by `scripts/recipes.py` (rerun it to reproduce). **Compute budget**: at most "
        f"{a.budget} epochs of examples processed (epochs × views per example) for every recipe, private or not "
        "(`grid.budget`): a step's cost grows with the examples it processes, and DP-SGD's privacy spend with the "
        "epochs. Every candidate trained on an independent draw of synthetic-fundus (generator and split seed "
        f"{a.data_seed}; the study uses 0) with training seeds {', '.join(map(str, a.seeds))} (the study uses 0, 1, "
        "2), so the choice reads no image of the study's data and costs it no privacy. Score: mean best-epoch "
        "validation accuracy of that draw; a recipe with a run flagged undertrained (validation accuracy still "
        "rising at the end) ranks after every converged one.",
        "",
        f"## Non-private (ε = ∞): chosen {nonprivate[0][0]}",
        "",
        *_table(nonprivate),
        "",
    ]
    for band, eps in BANDS.items():
        text += [
            f"## DP-SGD, band `{band}` (Gaussian ε = {', '.join(map(str, eps))})",
            "",
            f"Schedules (seed {a.seeds[0]}, scored at ε = {eps[-1]}; lr scaled linearly from lr 1 at batch 512), "
            f"chosen **{stage1[band][0][0]}**:",
            "",
            *_table(stage1[band], eps[-1:]),
            "",
            f"Practice on that schedule (seed {a.seeds[0]}), chosen **{stage2[band][0][0]}**:",
            "",
            *_table(stage2[band], eps[-1:]),
            "",
            f"ε = ∞ with that schedule (the budget reference; no clipping), chosen **{refs[band][0][0]}**:",
            "",
            *_table(refs[band]),
            "",
        ]
    text += [
        "## In params.yaml",
        "",
        "```yaml",
        "grid:",
        f"  budget: {a.budget}",
        "  schedules:",
        *[f"    {band}: {json.dumps(s)}" for band, s in schedules.items()],
        "```",
        "",
        f"and `grid.nonprivate` the chosen non-private recipe ({nonprivate[0][0]}). These are the values "
        "params.yaml ships (tests/test_config.py holds them together).",
        "",
        f"Search cost: {len(runs)} training runs, {sum(runs) / 60:.0f} minutes of training in all (the sum of the "
        f"runs' times; {a.workers} runs at a time on 2 CPU cores, so about {sum(runs) / 60 / a.workers:.0f} "
        f"minutes of wall time; this invocation {minutes:.0f} minutes, runs found in --cache not retrained).",
        "",
    ]
    old = a.out.read_text() if a.out.is_file() else ""
    rest = old[old.index("\n## Public pretraining") :] if "\n## Public pretraining" in old else ""
    a.out.write_text("\n".join(text) + rest)
    raw = {
        "nonprivate": nonprivate,
        "schedules": stage1,
        "practice": stage2,
        "references": refs,
        "chosen": schedules,
        "nonprivate_chosen": nonprivate[0][0],
    }
    a.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    print(f"wrote {a.out}\nnon-private: {nonprivate[0][0]}\nschedules: {json.dumps(schedules)}")


if __name__ == "__main__":
    main()
