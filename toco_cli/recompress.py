"""``toco recompress`` and ``toco evaluate``: derive a device's model, measure any model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from toco_cli.main import app
from toco_core.analysis_result import load_result
from toco_core.cli_support import cli_errors, console
from toco_core.onnx_model import input_specs, load_model
from toco_core.plan import CompressionReport, Policy
from toco_core.units import format_size, parse_duration, parse_fraction, parse_size


def _profile(profile: Path | None, memory: str | None, storage: str | None, latency: str | None):
    from toco_core.device import load_profile, with_budgets
    from toco_core.probe import probe_device

    base = load_profile(profile) if profile else probe_device(benchmark=False)
    return with_budgets(base, memory=parse_size(memory) if memory else None,
                        storage=parse_size(storage) if storage else None,
                        latency_s=parse_duration(latency) if latency else None)


def print_report(report: CompressionReport, title: str = "per-layer decisions") -> None:
    """Per-layer table and a summary of predicted vs measured numbers."""
    t = Table(title=title)
    for col in ("weight", "op", "weights", "sparsity", "mean bits", "channels kept", "runtime", "bias shift"):
        t.add_column(col, justify="left" if col in ("weight", "op", "runtime") else "right")
    for layer in report.layers:
        shift = "-" if layer.bias_shift is None else f"{layer.bias_shift:.3g}"
        t.add_row(layer.name, layer.op_type, f"{layer.weights:,}", f"{layer.sparsity:.0%}",
                  f"{layer.mean_bits:.1f}", f"{layer.channels_kept}/{layer.channels}", layer.runtime_format, shift)
    console.print(t)
    s = Table(title=f"plan: {report.plan.label}", show_header=True)
    for col in ("", "base", "compressed", "ratio"):
        s.add_column(col, justify="right")
    s.add_row("storage form", format_size(report.base_file_bytes), format_size(report.storage_bytes),
              f"{report.base_file_bytes / max(report.storage_bytes, 1):.1f}x")
    for name, value in (("download (parts this plan needs)", report.download_bytes),
                        ("full bundle (without fp32 part)", report.bundle_bytes)):
        if value:
            s.add_row(name, format_size(report.base_file_bytes), format_size(value),
                      f"{report.base_file_bytes / value:.2f}x")
    s.add_row("runnable file", format_size(report.base_file_bytes), format_size(report.file_bytes),
              f"{report.base_file_bytes / max(report.file_bytes, 1):.1f}x")
    if report.session_rss and report.base_session_rss:
        s.add_row("session RSS", format_size(report.base_session_rss), format_size(report.session_rss),
                  f"{report.base_session_rss / report.session_rss:.2f}x")
    else:  # measured only where it can decide something (toco_core.recompress._rss_matters)
        s.add_row("session memory", "-", f"~{format_size(report.plan.predicted_memory)}", "estimate")
    if report.p50_s and report.base_p50_s:
        # latency is measured on this box, never predicted (toco_core.runtime_forms): the row says so
        s.add_row("p50 latency (batch 1, measured)", f"{report.base_p50_s * 1e3:.3f} ms",
                  f"{report.p50_s * 1e3:.3f} ms", f"{report.base_p50_s / report.p50_s:.2f}x")
    st = report.self_test
    s.add_row("disagreement", "0", f"{st.measured:.2%} measured", f"predicted {st.predicted:.2%} (+{st.margin:.2%})")
    console.print(s)
    console.print(f"self-test {'passed' if st.passed else 'FAILED'} on {st.samples} calibration samples "
                  f"after {report.attempts} attempt(s); {report.seconds:.2f} s")


@app.command()
@cli_errors
def recompress(
    model: Path | None = typer.Argument(None, help="the base ONNX model (not needed with --bundle)"),
    analysis: Path | None = typer.Option(None, "--analysis", help="directory written by `toco analyze`"),
    bundle: Path | None = typer.Option(None, "--bundle", help="a parts bundle written by `toco pack` "
                                                               "(builds without the fp32 model)"),
    out: Path = typer.Option(..., "-o", "--out", help="runnable compressed ONNX model to write"),
    profile: Path | None = typer.Option(None, "--profile", help="device profile JSON (default: probe this box)"),
    memory: str | None = typer.Option(None, "--memory", help="session memory limit, e.g. 64MB"),
    storage: str | None = typer.Option(None, "--storage", help="model storage limit, e.g. 2MB"),
    latency: str | None = typer.Option(None, "--latency", help="p50 latency limit at batch 1, e.g. 5ms"),
    budget: str = typer.Option("1%", "--budget", help="max top-1 disagreement with the base"),
    objective: str = typer.Option("fidelity", "--objective", help="fidelity (best fidelity first) or size"),
) -> None:
    """Derive the best compressed model for a device from the tolerance analysis or a parts bundle."""
    from toco_core.parts_bundle import BundleHead
    from toco_core.recompress import recompress as run

    prof = _profile(profile, memory, storage, latency)
    policy = Policy(budget=parse_fraction(budget), objective=objective, memory=prof.memory_budget,
                    storage=prof.storage_budget, latency_s=prof.latency_budget_s)
    with console.status("reading the model and its analysis"):
        parts, source, result = _inputs(model, analysis, bundle, parse_fraction(budget))
    with console.status("planning, building and self-testing"):
        built, report = run(source, result, prof, policy)
    need = BundleHead(parts["head"]).parts_for_plan(report.plan)
    report = report.model_copy(update={"download_bytes": sum(len(parts[n]) for n in need),
                                       "bundle_bytes": sum(len(v) for k, v in parts.items() if k != "base")})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(built.runnable.SerializeToString())
    out.with_suffix(".toco").write_bytes(built.storage)
    out.with_suffix(".report.json").write_text(report.model_dump_json(indent=1))
    print_report(report)
    console.print(f"wrote {out}, its storage form {out.with_suffix('.toco')} and {out.with_suffix('.report.json')}")


def _inputs(model: Path | None, analysis: Path | None, bundle: Path | None, budget: float):
    """(parts, weight source, analysis) from a bundle, or from a model + analysis packed in memory.

    Raises ConfigError when neither or both ways are given.
    """
    from toco_core.bundle import unpack_bundle
    from toco_core.errors import ConfigError
    from toco_core.model_bundle import BundleInfo
    from toco_core.onnx_model import model_hash
    from toco_core.parts_bundle import pack_parts, source_from_parts

    if (bundle is None) == (model is None or analysis is None):
        raise ConfigError("give either MODEL --analysis DIR or --bundle FILE.bundle",
                          "see `toco recompress --help`")
    if bundle is not None:
        parts = unpack_bundle(bundle.read_bytes())
        source, result, _ = source_from_parts(parts)
        return parts, source, result
    assert model is not None and analysis is not None  # checked above
    base, result = load_model(model), load_result(analysis)
    from toco_core.plan_build import as_source

    # the same bundle `toco pack` writes for this model and budget, so download_bytes agree
    parts = pack_parts(base, result, BundleInfo(model_name=model.stem, model_sha256=model_hash(base), budget=budget))
    return parts, as_source(base, result), result


@app.command()
@cli_errors
def evaluate(
    model: Path = typer.Argument(..., help="model to measure (.onnx or a .toco storage form)"),
    base: Path = typer.Argument(..., help="the base model it should agree with"),
    pool: Path = typer.Option(..., "--pool", help=".npy/.npz inputs (labels as 'y' add accuracy)"),
    labels: Path | None = typer.Option(None, "--labels"),
    analysis: Path | None = typer.Option(None, "--analysis", help="measure in this analysis' task kind and scored "
                                         "output (default: a classifier's top-1 on the detected output)"),
) -> None:
    """Agreement, KL and accuracy of MODEL against BASE on a pool (agreement and KL in the task
    kind's metric with --analysis: docs/analysis.md#task-kinds)."""
    from toco_core.compression.storage import decode_model
    from toco_core.onnx_model import output_kind
    from toco_core.output_tail import fidelity_view, scored_output
    from toco_core.pool import load_pool
    from toco_core.runtime import run_model
    from toco_core.task_kind import CLASSIFIER, compare

    b = load_model(base)
    m = decode_model(model.read_bytes()) if model.suffix == ".toco" else load_model(model)
    x, y = load_pool(pool, input_specs(b), labels)
    task, scored = CLASSIFIER, None
    if analysis is not None:
        result = load_result(analysis, verify=False)
        task, scored = result.task, result.manifest.scored_output
    scored = scored_output(b, scored)  # the tensor an analysis would score, not a label after it
    b, m = fidelity_view(b, scored), fidelity_view(m, scored)
    fid = compare(task, run_model(b, x), run_model(m, x), y, output_kind(b))
    t = Table(title=f"{model.name} vs {base.name} on {fid.n} samples ({task.kind.value})")
    for col in ("agreement", "disagreement", "KL", "accuracy", "base accuracy"):
        t.add_column(col, justify="right")
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    t.add_row(pct(fid.agreement), pct(fid.disagreement), f"{fid.kl:.5f}", pct(fid.accuracy), pct(fid.base_accuracy))
    console.print(t)
