"""``toco analyze`` and ``toco inspect``: run a tolerance analysis, look at its result."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from toco_cli.main import app
from toco_core.analysis_result import AnalysisResult, load_result, save_result
from toco_core.cli_support import cli_errors, console
from toco_core.curve_operators import CurveOperator
from toco_core.errors import ConfigError
from toco_core.onnx_model import input_specs, load_model
from toco_core.pool import load_pool
from toco_core.units import format_size, parse_fraction

PHASES = {"qbc": "QBC rounds", "prune": "pruning rounds", "calibrate": "calibration", "storage": "storage forms"}


def _preprocessing(size: str | None, scale: float, mean: str, std: str, color: str, layout: str):
    if size is None:
        return None
    from toco_core.preprocessing import Preprocessing

    try:
        h, w = (int(v) for v in size.lower().split("x"))
        return Preprocessing(size=(h, w), scale=scale, color=color, layout=layout,
                             mean=tuple(float(v) for v in mean.split(",")), std=tuple(float(v) for v in std.split(",")))
    except ValueError:
        raise ConfigError(f"--size {size!r}/--mean/--std are malformed",
                          "write --size 28x28 --mean 0.5 --std 0.25") from None


@app.command()
@cli_errors
def analyze(
    model: Path = typer.Argument(..., help="trained ONNX model"),
    pool: Path = typer.Option(..., "--pool", help=".npy/.npz inputs in the model's layout and dtype (one array per "
                              "input name for several inputs), or an image folder"),
    out: Path = typer.Option(..., "-o", "--out", help="result directory"),
    labels: Path | None = typer.Option(None, "--labels", help="optional .npy labels: adds accuracy columns"),
    budget: str = typer.Option("1%", "--budget", help="fleet fidelity budget: max share of samples that disagree "
                               "with the base (top-1 for a classifier; see --task)"),
    rounds: int | None = typer.Option(None, "--rounds", min=1, max=50,
                                      help="QBC rounds at most (6 when not given; fewer once the tolerances settle)"),
    size: str | None = typer.Option(None, "--size", help="image folders: HxW"),
    scale: float = typer.Option(1 / 255, "--scale", help="image folders: pixel scale"),
    mean: str = typer.Option("0", "--mean", help="image folders: mean per channel, comma separated"),
    std: str = typer.Option("1", "--std", help="image folders: std per channel"),
    color: str = typer.Option("grayscale", "--color", help="image folders: grayscale or rgb"),
    layout: str = typer.Option("nchw", "--layout", help="image folders: nchw or nhwc"),
    output: str | None = typer.Option(None, "--output", help="tensor to score: a graph output or an intermediate "
                                      "float tensor (default: the float output, or the probabilities behind "
                                      "the label)"),
    task: str | None = typer.Option(None, "--task", help="task kind of the scored output: classifier, regression, "
                                    "score or embedding (default: detected; docs/analysis.md#task-kinds)"),
    tolerance: float | None = typer.Option(None, "--tolerance", help="per-sample error above which a sample "
                                           "disagrees: relative error for regression/score (default 0.1), "
                                           "1 - cosine for embedding (default 0.02)"),
    rounding: str = typer.Option("compensated", "--rounding", help="compensated: round each weight against its "
                                 "layer's output error (GPTQ-style; boxes fetch a small part per plan); nearest: "
                                 "round each weight on its own"),
    threshold: float | None = typer.Option(None, "--threshold", help="score: decision threshold; a flipped "
                                           "decision also counts as a disagreement (implies --task score "
                                           "for a 1-wide output)"),
) -> None:
    """Analyse MODEL once: QBC sample selection, per-weight tolerances, calibration curves."""
    from toco_core.analysis.pipeline import analyze as run_analysis
    from toco_core.analysis.pool_split import split_pool
    from toco_core.analysis.settings import AnalysisSettings
    from toco_core.output_tail import scored_output
    from toco_core.task_kind import parse_task_kind

    kind = None if task is None else parse_task_kind(task).value
    if tolerance is not None and tolerance <= 0:
        raise ConfigError(f"--tolerance {tolerance} must be positive", "give e.g. --tolerance 0.1")
    if rounding not in ("compensated", "nearest"):
        raise ConfigError(f"--rounding {rounding!r} is not a rounding", "give --rounding compensated or nearest")
    settings = AnalysisSettings(budget=parse_fraction(budget), output=output, task=kind,
                                task_tolerance=tolerance, threshold=threshold,
                                compensated_rounding=rounding == "compensated",
                                **({} if rounds is None else {"max_rounds": rounds}))
    onnx_model = load_model(model)
    scored_output(onnx_model, output)  # an unknown --output fails now, before the pool is read
    x, y = load_pool(pool, input_specs(onnx_model), labels, _preprocessing(size, scale, mean, std, color, layout))
    split = split_pool(x, settings)
    del x  # the analysis works on the halves: the whole pool (241 MB for 400 RGB 224x224 images) is not kept
    with Progress(TextColumn("{task.description:16s}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(PHASES.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done, total=total)

        result = run_analysis(onnx_model, split, y, settings, progress, model_name=model.stem)
    save_result(result, out)
    m = result.manifest
    console.print(f"analysed {m.weights:,} weights on {m.samples_used} QBC-selected samples "
                  f"in {m.timings['total']:.1f} s -> {out} (task: {result.task.kind.value})")
    _print_rounding(result)
    _print_curves(result, budget=settings.budget)


def _print_rounding(result: AnalysisResult) -> None:
    # which codes the curves were measured with, and what a box fetches on top of them
    if not result.compensated_rounding:
        console.print("rounding: nearest (each point's nested codes as they are)")
        return
    sizes = sorted(len(part) for part in (result.rounding or {}).values())
    spread = f", {format_size(sizes[0])}-{format_size(sizes[-1])} each" if sizes else ""
    console.print(f"rounding: compensated against each layer's output error; code differences of "
                  f"{len(sizes)} points{spread} (a box fetches its plan's one)")


def _print_curves(result: AnalysisResult, budget: float) -> None:
    for op in (CurveOperator.PRUNE, CurveOperator.QUANTIZE):
        curve = result.curves[op]
        t = Table(title=f"calibration: {op} (measured on {curve.samples} held-out samples)")
        for col in ("scale", "sparsity", "bits/weight", "disagreement", "KL", "accuracy"):
            t.add_column(col, justify="right")
        for p in curve.points:
            scale = getattr(p, op.spec.scale)
            style = None if p.disagreement <= budget else "dim"
            bits = "32" if p.entropy_bits >= 32 else f"{p.entropy_bits:.2f}"
            acc = "-" if p.accuracy is None else f"{p.accuracy:.1%}"
            t.add_row(f"{scale:.4g}", f"{p.sparsity:.1%}", bits, f"{p.disagreement:.2%}", f"{p.kl:.4f}", acc,
                      style=style)
        console.print(t)


@app.command()
@cli_errors
def inspect(
    result_dir: Path = typer.Argument(..., help="directory written by `toco analyze`"),
    plot: Path | None = typer.Option(None, "--plot", help="also draw tolerances and curves to this PNG"),
) -> None:
    """Print the per-layer tolerance table, the QBC rounds and the calibration curves."""
    result = load_result(result_dir)
    m = result.manifest
    t = Table(title=f"{m.model_name}: per-layer tolerances (tau_hat at eps = 1)")
    for col in ("weight", "count", "tau p10", "tau median", "tau p90", "median prune rank"):
        t.add_column(col, justify="right" if col != "weight" else "left")
    for row in m.tensors:
        t.add_row(row["name"], f"{row['weights']:,}", f"{row['tau_p10']:.3g}", f"{row['tau_median']:.3g}",
                  f"{row['tau_p90']:.3g}", f"{row['prune_rank_median']:.2f}")
    console.print(t)
    r = Table(title=f"QBC: {m.samples_used} of {m.pool_size} pool samples used, {m.heldout_size} held out")
    for col in ("round", "samples", "committee scale", "held-out disagreement", "score selected", "score random"):
        r.add_column(col, justify="right")
    for rs in m.rounds:
        r.add_row(str(rs.round), str(rs.samples), f"{rs.committee_scale:.3g}",
                  f"{rs.committee_disagreement_heldout:.1%}",
                  f"{rs.selected_score_mean:.3f}", f"{rs.random_score_mean:.3f}")
    console.print(r)
    _print_rounding(result)
    _print_curves(result, budget=m.settings.get("budget", 0.01))
    if plot is not None:
        from toco_cli.plots import plot_analysis

        plot_analysis(result, plot)
        console.print(f"plot written to {plot}")
