"""The `dpcam` command line: one command per stage; parse, load config, call the stage.

Every command reads its defaults from params.yaml (``--params`` picks another file) and its flags
override them. A failure the user can fix prints one ``error:`` line and exits with code 2; Ctrl-C
prints one line and exits 130, SIGTERM during a tracked run one line and 143 (its MLflow run ends
KILLED). Warnings print as one ``warning:`` line each.
"""

from __future__ import annotations

import functools
import sys
import warnings
from pathlib import Path

import typer

from dpcam import config
from dpcam.errors import UserError
from dpcam.layout import PARAMS_FILE, disk_full

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Differential privacy meets interpretability: data, private training, Grad-CAM scoring.",
)
figure_app = typer.Typer(no_args_is_help=True, help="Figures that are not part of a stage's outputs.")
app.add_typer(figure_app, name="figure")

_state: dict[str, Path | None] = {"params": None}  # None: ./params.yaml, whose absence means the shipped defaults


def _interruptions() -> tuple[type[BaseException], ...]:
    """Ctrl-C, and SIGTERM inside a tracked run (``tracking.Terminated``; looked up only once
    tracking is loaded, so commands without MLflow do not import it)."""
    tracking = sys.modules.get("dpcam.tracking")
    return (KeyboardInterrupt, tracking.Terminated) if tracking is not None else (KeyboardInterrupt,)


def _user_errors(fn):
    """Turn a UserError into one line on stderr and exit code 2, an interruption into one line and
    exit 130 (Ctrl-C) or 143 (SIGTERM): no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None
        except OSError as e:  # a full disk where no stage named the file it was writing
            if (err := disk_full(e, e.filename or "a file dpcam was writing")) is None:
                raise
            typer.echo(f"error: {err}", err=True)
            raise typer.Exit(err.exit_code) from None
        except _interruptions() as e:
            code = getattr(e, "exit_code", 130)
            what = str(e) if code != 130 else "interrupted"
            resume = "; --resume continues it from its last finished epoch" if fn.__name__ == "train" else ""
            typer.echo(f"error: {what}; the unfinished stage's outputs were not written{resume}", err=True)
            raise typer.Exit(code) from None

    return wrapper


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


@app.callback()
def _main(
    params: Path | None = typer.Option(
        None, "--params", help=f"params file to read defaults from (default {PARAMS_FILE})"
    ),
) -> None:
    _state["params"] = params


def _check_device(flag: str | None, value: str, section: str) -> None:
    """Refuse a CUDA device that is not here before any work, naming where the setting came from: the
    ``--device`` flag, or the params file's ``<section>.device``."""
    if value != "cuda":
        return
    from dpcam.saved import resolve_device

    resolve_device(value, None if flag is not None else f"{_state['params'] or PARAMS_FILE}: {section}.device")


def _whole(values):
    """CLI floats that are whole numbers become ints, so `--epsilon 1` names folders `eps1`."""
    if values is None:
        return None
    return [int(v) if float(v).is_integer() else v for v in values]


@app.command()
@_user_errors
def prepare(
    dataset: str | None = typer.Option(None, help="name of the prepared dataset (output folder)"),
    format: str | None = typer.Option(None, "--format", help="synthetic|aptos|catsdogs|petimages|imagefolder"),
    source: Path | None = typer.Option(None, help="folder of the real dataset in its native layout"),
    masks: Path | None = typer.Option(None, help="optional folder of lesion masks named like the images"),
    size: int | None = typer.Option(None, help="square image size in pixels (≥ 16)"),
    seed: int | None = typer.Option(None, help="split (and generator) seed"),
    n: int | None = typer.Option(None, "--n", help="synthetic: number of images"),
    skip_bad: bool | None = typer.Option(None, "--skip-bad/--no-skip-bad", help="skip unreadable images"),
    workers: int | None = typer.Option(None, help="decode processes (0 = one per core)"),
    public: bool = typer.Option(
        False,
        "--public",
        help="write the public set data/prepared/<dataset>-public instead (prepare.public: another generator seed, "
        "or a folder of public images); refused when it shares an image with the private set",
    ),
) -> None:
    """Ingest a dataset (or generate synthetic-fundus) into data/prepared/<dataset>/."""
    from dpcam.data.prepare import prepare as run

    cfg = config.load_section(
        "prepare",
        {
            "dataset": dataset,
            "format": format,
            "source": source,
            "masks": masks,
            "size": size,
            "seed": seed,
            "synthetic.n": n,
            "skip_bad": skip_bad,
            "workers": workers,
        },
        _state["params"],
    )
    out = run(cfg, public=public)
    typer.echo(f"prepared {out}" + (" (public: shares no image with the private set)" if public else ""))


@app.command()
@_user_errors
def ldp(
    dataset: str | None = typer.Option(None, help="prepared dataset to derive from (default: prepare.dataset)"),
    mechanism: list[str] | None = typer.Option(None, help="mechanism name; repeat for several"),
    epsilon: list[float] | None = typer.Option(None, help="ε; repeat for several"),
    delta: float | None = typer.Option(None, help="δ for pixel-gaussian"),
    seed: int | None = typer.Option(None, help="noise seed"),
    secure: bool | None = typer.Option(None, "--secure/--seeded", help="draw noise from OS entropy"),
) -> None:
    """Write local-DP derivatives to data/ldp/<dataset>/<mechanism>-eps<ε>/ (every mechanism × ε)."""
    from dpcam.data.ldp import derive

    cfg = config.load_section(
        "ldp",
        {
            "mechanisms": mechanism or None,
            "epsilons": _whole(epsilon or None),
            "delta": delta,
            "seed": seed,
            "secure": secure,
        },
        _state["params"],
    )
    src = config.prepared_dir(dataset or config.default_dataset(_state["params"]))
    for mech in cfg.mechanisms:
        for eps in cfg.epsilons:
            out = derive(src, mech, eps, cfg)
            typer.echo(f"derived {out}")


# long by declaration: its signature is the table of the command's Typer options (the body is ~30 lines)
@app.command()
@_user_errors
def train(
    dataset: str | None = typer.Option(None, help="prepared dataset (default: train.dataset)"),
    ldp: str | None = typer.Option(None, help="train on a local-DP derivative, e.g. singh-sikka-eps0.5"),
    scheme: str | None = typer.Option(
        None, help="none|clip-only|gaussian|laplace|ldp|laplace-paper (the paper's replica: NO privacy guarantee)"
    ),
    epsilon: float | None = typer.Option(
        None, help="target ε (gaussian, laplace); laplace-paper: the nominal ε its noise is calibrated from"
    ),
    delta: float | None = typer.Option(None, help="δ"),
    clip: float | None = typer.Option(None, help="per-example clipping bound C"),
    accountant: str | None = typer.Option(None, help="prv|rdp|gdp (gaussian)"),
    grad_sample_mode: str | None = typer.Option(None, help="hooks|ew|functorch|ghost (gaussian, clip-only)"),
    precision: str | None = typer.Option(None, help="fp32|bf16: bfloat16 autocast (clipping stays exact in float32)"),
    model: str | None = typer.Option(None, help="smallcnn|resnet18|alexnet|vgg16"),
    weights: Path | None = typer.Option(None, help="local pretrained weights (state dict): the trunk to fine-tune"),
    trainable: str | None = typer.Option(
        None, help="all|head|last-block: train only this part (fine-tuning from --weights; the rest frozen)"
    ),
    public: bool | None = typer.Option(
        None, "--public/--private", help="train on the public set data/prepared/<dataset>-public (a trunk)"
    ),
    optimizer: str | None = typer.Option(None, help="sgd|adam"),
    lr: float | None = typer.Option(None, help="learning rate"),
    schedule: str | None = typer.Option(None, help="constant|step|cosine"),
    epochs: int | None = typer.Option(None, help="epochs"),
    batch_size: int | None = typer.Option(None, help="expected batch size"),
    train_size: int | None = typer.Option(None, help="train on this many training images (default: all)"),
    augment: str | None = typer.Option(None, help="none|flip-shift: random flips and shifts of training images"),
    aug_mult: int | None = typer.Option(None, help="augmented views per example, averaged before clipping"),
    family: str | None = typer.Option(
        None,
        help="train every run of this grid family (baseline|gaussian|laplace|laplace-paper|ldp|clip-sweep|"
        "train-size|public|finetune-none|finetune-gaussian|finetune-laplace) into models/<family>/, from the grid "
        "and train sections",
    ),
    seed: int | None = typer.Option(None, help="seed"),
    device: str | None = typer.Option(None, help="auto|cpu|cuda"),
    name: str | None = typer.Option(None, help="run name (default <scheme>-eps<ε>-<model>-s<seed>)"),
    resume: bool = typer.Option(False, "--resume", help="continue the run from its last checkpoint"),
    force_delta: bool = typer.Option(
        False, "--force-delta", help="accept δ ≥ 1/N (a guarantee that allows leaking one image outright)"
    ),
) -> None:
    """Train one model under one privacy scheme; write models/<run>/ (model and train.json)."""
    from dpcam.train.family import run_family
    from dpcam.train.stage import run

    profile = config.profile_of(_state["params"])
    shared = {
        "delta": delta,
        "accountant": accountant,
        "grad_sample_mode": grad_sample_mode,
        "precision": precision,
        "weights": weights,
        "optimizer": optimizer,
        "lr": lr,
        "schedule": schedule,
        "epochs": epochs,
        "batch_size": batch_size,
        "augment": augment,
        "aug_mult": aug_mult,
        "device": device,
        "force_delta": force_delta or None,
    }
    if family is not None:
        per_run = (dataset, ldp, scheme, epsilon, clip, model, seed, name, train_size, trainable, public)
        if any(v is not None for v in per_run) or resume:
            raise UserError(
                "--family trains the grid's runs as params.yaml defines them; drop the per-run flags "
                "(--dataset/--ldp/--scheme/--epsilon/--clip/--model/--seed/--name/--train-size/--trainable/"
                "--public/--resume)"
            )
        grid = config.load_section("grid", None, _state["params"])
        base = config.load_section("train", shared, _state["params"])
        _check_device(device, base.device, "train")
        for m in run_family(family, grid, base, profile=profile, flags=shared):
            _echo_trained(m)
        return
    if ldp and scheme is None:
        scheme = "ldp"
    cfg = config.load_section(
        "train",
        {
            **shared,
            "dataset": dataset,
            "ldp": ldp,
            "scheme": scheme,
            "epsilon": epsilon,
            "clip": clip,
            "model": model,
            "train_size": train_size,
            "trainable": trainable,
            "public": public,
            "seed": seed,
            "name": name,
        },
        _state["params"],
    )
    _check_device(device, cfg.device, "train")
    _echo_trained(run(cfg, resume=resume, profile=profile))


def _echo_trained(m) -> None:
    """One line per trained run (``m``: a TrainRecord)."""
    if m.guarantee == "none":
        privacy = (
            f"NO GUARANTEE: the paper's replica (L2 clipping + Laplace noise of the Gaussian σ·C at nominal "
            f"ε = {m.nominal_epsilon:g}); no ε (the only valid bound, for L1 sensitivity C·√d: "
            f"ε ≤ {m.epsilon_l1_bound:.4g})"
        )
    elif m.scheme == "ldp":
        g = m.ldp_guarantee or {}
        short = str(g.get("words", "see its manifest")).split(";")[0].split(":")[0]
        privacy = f"no DP-SGD; the data's local-DP guarantee: {short} (details in its manifest)"
    elif m.value("epsilon") is None:
        privacy = "ε = ∞ (not private)"
    else:
        privacy = f"ε = {m.epsilon:.4g} (δ = {m.delta:g}, {m.accountant or 'no'} accountant)"
    if m.trainable not in (None, "all"):
        privacy += f"; trained the {m.trainable} only ({m.trained_parameter_count} parameters) from {m.weights}"
    typer.echo(
        f"{m.run_name}: test accuracy {m.test_accuracy:.3f}, QWK {m.test_qwk:.3f}, {privacy}"
        + ("  [collapsed: predicts one class]" if m.collapsed else "")
    )


@app.command()
@_user_errors
def explain(
    run: str | None = typer.Argument(None, help="run name under models/ or an MLflow run id"),
    family: str | None = typer.Option(None, help="score every run of this grid family into metrics/<family>/"),
    method: list[str] | None = typer.Option(
        None, help="explanation method; repeat for several, the first is the headline one (default: explain.methods)"
    ),
    target: str | None = typer.Option(None, help="prediction | label"),
    metric: list[str] | None = typer.Option(None, help="metric name; repeat for several (default: all)"),
    layer: str | None = typer.Option(None, help="Grad-CAM layer, a dotted module name (default: the model's)"),
    steps: int | None = typer.Option(None, help="deletion/insertion steps K (≥ 2)"),
    max_images: int | None = typer.Option(None, help="score at most this many test images"),
    device: str | None = typer.Option(None, help="auto|cpu|cuda"),
    allow_data_change: bool = typer.Option(
        False,
        "--allow-data-change",
        help="score a run whose data changed since it was trained (refused otherwise); explain.json notes it",
    ),
) -> None:
    """Explanation maps of a run's test split, scored; writes metrics/<run>/explain.json, maps and pictures
    (other methods than the first in metrics/<run>/methods/<method>/)."""
    from dpcam.explain.score import score, score_family

    if (run is None) == (family is None):
        raise UserError("name one RUN, or pass --family F to score a grid family (not both)")
    cfg = config.load_section(
        "explain",
        {
            "methods": method or None,
            "target": target,
            "metrics": metric or None,
            "max_images": max_images,
            "device": device,
            "layer": layer,
            "steps": steps,
        },
        _state["params"],
    )
    _check_device(device, cfg.device, "explain")
    grid = config.load_section("grid", None, _state["params"]) if family else None
    results = (
        score_family(family, grid, cfg, allow_data_change=allow_data_change)
        if family
        else [score(run, cfg, allow_data_change=allow_data_change)]
    )
    for r in results:
        _echo_explained(r)


def _echo_explained(r) -> None:
    """One line per scored run (``r``: an ExplainRecord)."""
    shown = ", ".join(
        f"{k} {v:.3g}"
        for k in ("avg_drop_pct", "increase_conf_pct", "masked_score_pct", "pointing_game", "map_agreement")
        if (v := r.value(k)) is not None
    )
    flag = "  [DEGENERATE: " + "; ".join(r.degeneracy.reasons) + "]" if r.degenerate else ""
    typer.echo(f"{r.run_name}: accuracy {r.accuracy:.3f}; {shown}{flag}")


@app.command()
@_user_errors
def audit(
    run: str | None = typer.Argument(None, help="run name under models/ or an MLflow run id"),
    family: str | None = typer.Option(None, help="audit every run of this grid family into audits/<family>/"),
    grid: bool = typer.Option(
        False, "--grid", help="audit every run of the grid into audits/<family>/ (the DVC stage)"
    ),
    attack: list[str] | None = typer.Option(
        None,
        help="loss|loss-calibrated|gradcam-variance|gradcam-entropy|input-gradient; repeat for several (default: all)",
    ),
    max_per_group: int | None = typer.Option(None, help="members and non-members sampled, each"),
    seed: int | None = typer.Option(None, help="seed of the samples and their selection/evaluation halves"),
    device: str | None = typer.Option(None, help="auto|cpu|cuda"),
    fail_on_violation: bool = typer.Option(
        False, "--fail-on-violation", help="exit 1 when an attack beats what ε allows"
    ),
    allow_data_change: bool = typer.Option(
        False,
        "--allow-data-change",
        help="audit a run whose data changed since it was trained (refused otherwise); audit.json notes it",
    ),
) -> None:
    """Membership-inference audit of a run against its ε; writes audits/<run>/audit.json and roc.png."""
    from dpcam.audit import audit_family, audit_grid, audit_run

    if (run is not None) + (family is not None) + grid != 1:
        raise UserError(
            "name one RUN, or pass --family F to audit a grid family, or --grid for every run of the grid (one of them)"
        )
    cfg = config.load_section(
        "audit",
        {"attacks": attack or None, "max_per_group": max_per_group, "seed": seed, "device": device},
        _state["params"],
    )
    _check_device(device, cfg.device, "audit")
    allow = {"allow_data_change": allow_data_change}
    if run is not None:
        results = [audit_run(run, cfg, **allow)]
    else:
        grid_cfg = config.load_section("grid", None, _state["params"])
        results = audit_family(family, grid_cfg, cfg, **allow) if family else audit_grid(grid_cfg, cfg, **allow)
    for r in results:
        _echo_audited(r)
    if fail_on_violation and any(r.violation for r in results):
        raise typer.Exit(1)


def _echo_audited(r) -> None:
    """One line per audited run (``r``: an AuditRecord); a violation goes to stderr."""
    eps, check = r.privacy.epsilon, r.check
    if not check.done:
        verdict = f"not checked ({check.reason})"
    elif r.violation:
        verdict = f"VIOLATION: {', '.join(check.violations or [])} beat(s) what ε allows"
    else:
        verdict = "within " + ("the PLD trade-off curve" if check.bound.startswith("pld") else "the (ε, δ) line")
    loss = f" (loss {r.mia_auc_loss:.3f})" if r.mia_auc_loss is not None else ""
    checked = check.epsilon_replace_one
    against = "∞" if eps is None else f"{eps:.3g} (add/remove)"
    if checked is not None:
        against += f", {checked:.3g} replace-one (checked)"
    typer.echo(
        f"{r.run_name}: MIA AUC {r.mia_auc:.3f}{loss}, empirical ε ≥ {r.mia_epsilon_lb:.3g} "
        f"({100 * r.confidence:.0f}%) vs ε = {against}; {verdict}",
        err=r.violation,
    )


@figure_app.command("cams")
@_user_errors
def figure_cams(
    runs: list[str] = typer.Option(..., "--runs", help="runs to compare (repeat); ordered by ε"),
    images: int = typer.Option(6, help="number of test images"),
    out: Path = typer.Option(Path("reports/figures/cams.png"), help="PNG to write"),
) -> None:
    """The same test images' Grad-CAM overlays across runs of increasing ε (paper Figures 2 and 5)."""
    from dpcam.explain.score import figure_cams as run

    names = [r for item in runs for r in item.split(",") if r]
    typer.echo(f"wrote {run(names, out, images)}")


@figure_app.command("ldp")
@_user_errors
def figure_ldp(
    dataset: str | None = typer.Option(None, help="dataset name (default: prepare.dataset)"),
    out: Path | None = typer.Option(None, help="PNG to write (default reports/figures/ldp-<dataset>.png)"),
) -> None:
    """Clean-vs-ε sample grid of every local-DP derivative of a dataset."""
    from dpcam.data.ldp_figure import figure_ldp as run

    name = dataset or config.default_dataset(_state["params"])
    path = run(name, out or Path("reports/figures") / f"ldp-{name}.png")
    typer.echo(f"wrote {path}")


@app.command()
@_user_errors
def report(
    out: Path = typer.Option(Path("reports"), help="folder to write (index.html, tables/, figures/, plots/)"),
) -> None:
    """The paper's tables and figures for the grid of params.yaml, and one HTML page (reports/index.html)."""
    from dpcam.report import report as run

    params = _state["params"]
    summary = run(config.load_section("grid", None, params), out, verdict=config.load_section("verdict", None, params))
    typer.echo(
        f"wrote {summary['index']} ({summary['runs']} runs, {len(summary['tables'])} tables, "
        f"{len(summary['figures'])} figures)"
    )
    for line in summary["skipped"]:
        typer.echo(f"  skipped: {line}")
    typer.echo(f"MLflow: the runs and the verdict run at <mlflow ui>/{summary['mlflow']}")


@app.command()
@_user_errors
def search(
    trials: int | None = typer.Option(None, help="trials this process runs (0: only write the report)"),
    timeout: float | None = typer.Option(None, help="stop starting trials after this many seconds"),
    storage: str | None = typer.Option(
        None, help="Optuna storage, any SQLAlchemy URL (default sqlite:///mlruns/optuna.db)"
    ),
    study_name: str | None = typer.Option(None, help="study name (default dpcam-<dataset>)"),
    sampler: str | None = typer.Option(None, help="nsga2|tpe|random"),
    objective: str | None = typer.Option(
        None, help="explanation objective, e.g. masked_score_pct, avg_drop_pct, pointing_game"
    ),
    seed: int | None = typer.Option(None, help="sampler seed"),
    max_trials: int | None = typer.Option(None, help="stop once the study has this many complete trials"),
    epochs: tuple[int, int] | None = typer.Option(
        None, metavar="LOW HIGH", help="range of training epochs searched (overrides search.epochs)"
    ),
    device: str | None = typer.Option(None, help="auto|cpu|cuda"),
) -> None:
    """Optuna search over DP-SGD settings: the Pareto front of ε, accuracy and explanation quality (reports/search/)."""
    from dpcam.search import search as run

    cfg = config.load_section(
        "search",
        {
            "trials": trials,
            "timeout": timeout,
            "storage": storage,
            "study_name": study_name,
            "sampler": sampler,
            "objective": objective,
            "seed": seed,
            "max_trials": max_trials,
            "epochs": list(epochs) if epochs else None,
        },
        _state["params"],
    )
    base = config.load_section("train", {"device": device}, _state["params"])
    explain = config.load_section("explain", {"device": device}, _state["params"])
    _check_device(device, base.device, "train")
    _check_device(device, explain.device, "explain")
    run(cfg, base, explain, echo=typer.echo)


@app.command()
@_user_errors
def profile(
    name: str = typer.Argument(..., help="profile name: profiles/<name>.yaml (e.g. paper-aptos)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc command instead of running it"),
) -> None:
    """Run the study under a profile (an overlay of params.yaml) as a DVC experiment: dvc exp run -S ..."""
    import shlex
    import subprocess

    from dpcam.profiles import command

    cmd = command(name, _state["params"])
    typer.echo(" ".join(shlex.quote(c) for c in cmd))
    if dry_run:
        return
    try:
        code = subprocess.run(cmd).returncode
    except FileNotFoundError:
        raise UserError("dvc is not on PATH; install dpcam's dependencies (make install) or activate .venv") from None
    raise typer.Exit(code)


def main() -> None:
    warnings.formatwarning = _one_line_warning  # "warning: <text>", not the source line of the call
    try:
        app()
    except KeyboardInterrupt:  # outside a command (typer turns one inside a command into exit 130)
        typer.echo("error: interrupted; outputs of the unfinished stage were not written", err=True)
        sys.exit(130)
