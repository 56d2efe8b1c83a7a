"""``toco recompress`` and ``toco evaluate``: derive a device's model, measure any model."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from toco_cli.main import app
from toco_core.analysis_result import load_result
from toco_core.cli_support import cli_errors, console
from toco_core.onnx_model import input_spec, load_model
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
    s.add_row("storage / transfer", format_size(report.base_file_bytes), format_size(report.storage_bytes),
              f"{report.base_file_bytes / max(report.storage_bytes, 1):.1f}x")
    s.add_row("runnable file", format_size(report.base_file_bytes), format_size(report.file_bytes),
              f"{report.base_file_bytes / max(report.file_bytes, 1):.1f}x")
    if report.session_rss and report.base_session_rss:
        s.add_row("session RSS", format_size(report.base_session_rss), format_size(report.session_rss),
                  f"{report.base_session_rss / report.session_rss:.2f}x")
    else:  # measured only where it can decide something (toco_core.recompress._rss_matters)
        s.add_row("session memory", "-", f"~{format_size(report.plan.predicted_memory)}", "estimate")
    if report.p50_s and report.base_p50_s:
        s.add_row("p50 latency (batch 1)", f"{report.base_p50_s * 1e3:.3f} ms", f"{report.p50_s * 1e3:.3f} ms",
                  f"{report.base_p50_s / report.p50_s:.2f}x")
    st = report.self_test
    s.add_row("disagreement", "0", f"{st.measured:.2%} measured", f"predicted {st.predicted:.2%} (+{st.margin:.2%})")
    console.print(s)
    console.print(f"self-test {'passed' if st.passed else 'FAILED'} on {st.samples} calibration samples "
                  f"after {report.attempts} attempt(s); {report.seconds:.2f} s")


@app.command()
@cli_errors
def recompress(
    model: Path = typer.Argument(..., help="the base ONNX model"),
    analysis: Path = typer.Option(..., "--analysis", help="directory written by `toco analyze`"),
    out: Path = typer.Option(..., "-o", "--out", help="runnable compressed ONNX model to write"),
    profile: Path | None = typer.Option(None, "--profile", help="device profile JSON (default: probe this box)"),
    memory: str | None = typer.Option(None, "--memory", help="session memory limit, e.g. 64MB"),
    storage: str | None = typer.Option(None, "--storage", help="storage/transfer limit, e.g. 2MB"),
    latency: str | None = typer.Option(None, "--latency", help="p50 latency limit at batch 1, e.g. 5ms"),
    budget: str = typer.Option("1%", "--budget", help="max top-1 disagreement with the base"),
    objective: str = typer.Option("fidelity", "--objective", help="fidelity (best fidelity first) or size"),
) -> None:
    """Derive the best compressed model for a device from the tolerance analysis."""
    from toco_core.recompress import recompress as run

    prof = _profile(profile, memory, storage, latency)
    policy = Policy(budget=parse_fraction(budget), objective=objective, memory=prof.memory_budget,
                    storage=prof.storage_budget, latency_s=prof.latency_budget_s)
    base = load_model(model)
    result = load_result(analysis)
    with console.status("planning, building and self-testing"):
        built, report = run(base, result, prof, policy)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(built.runnable.SerializeToString())
    out.with_suffix(".toco").write_bytes(built.storage)
    out.with_suffix(".report.json").write_text(report.model_dump_json(indent=1))
    print_report(report)
    console.print(f"wrote {out}, its storage form {out.with_suffix('.toco')} and {out.with_suffix('.report.json')}")


@app.command()
@cli_errors
def evaluate(
    model: Path = typer.Argument(..., help="model to measure (.onnx or a .toco storage form)"),
    base: Path = typer.Argument(..., help="the base model it should agree with"),
    pool: Path = typer.Option(..., "--pool", help=".npy/.npz inputs (labels as 'y' add accuracy)"),
    labels: Path | None = typer.Option(None, "--labels"),
) -> None:
    """Agreement, KL and accuracy of MODEL against BASE on a pool."""
    from toco_core.compression.storage import decode_model
    from toco_core.fidelity import compare_outputs
    from toco_core.onnx_model import output_kind
    from toco_core.pool import load_pool
    from toco_core.runtime import run_model

    b = load_model(base)
    m = decode_model(model.read_bytes()) if model.suffix == ".toco" else load_model(model)
    x, y = load_pool(pool, input_spec(b), labels)
    fid = compare_outputs(run_model(b, x), run_model(m, x), y, output_kind(b))
    t = Table(title=f"{model.name} vs {base.name} on {fid.n} samples")
    for col in ("agreement", "disagreement", "KL", "accuracy", "base accuracy"):
        t.add_column(col, justify="right")
    pct = lambda v: "-" if v is None else f"{v:.2%}"  # noqa: E731
    t.add_row(pct(fid.agreement), pct(fid.disagreement), f"{fid.kl:.5f}", pct(fid.accuracy), pct(fid.base_accuracy))
    console.print(t)


def recompress_for_profiles(model: Path, analysis: Path, workdir: Path) -> list[CompressionReport]:
    """The demo's step 4: three boxes derive three models from the same analysis.

    handheld (deploy/profiles/handheld.json): the smallest model within the budget;
    camera box: storage for 1.6x that, best fidelity within it; line PC: no limits.
    """
    from toco_core.device import load_profile, with_budgets
    from toco_core.recompress import recompress as run

    base = load_model(model)
    result = load_result(analysis)
    folder = Path(__file__).resolve().parent.parent / "deploy" / "profiles"
    reports: list[CompressionReport] = []
    rows = []
    for name in ("handheld", "camera-box", "line-pc"):
        prof = load_profile(folder / f"{name}.json")
        if name == "handheld":
            policy = Policy(objective="size", memory=prof.memory_budget)
        elif name == "camera-box":
            prof = with_budgets(prof, storage=int(reports[0].plan.predicted_storage * 1.6))
            policy = Policy(storage=prof.storage_budget, memory=prof.memory_budget)
        else:
            policy = Policy()
        built, report = run(base, result, prof, policy)
        (workdir / f"{name}.onnx").write_bytes(built.runnable.SerializeToString())
        print_report(report, title=f"{name}: per-layer decisions")
        reports.append(report)
        rows.append((name, report))
    t = Table(title="one analysis, three devices")
    for col in ("device", "plan", "transfer", "vs base", "predicted", "measured"):
        t.add_column(col, justify="left" if col in ("device", "plan") else "right")
    for name, r in rows:
        t.add_row(name, r.plan.label, format_size(r.storage_bytes), f"{r.base_file_bytes / r.storage_bytes:.1f}x",
                  f"{r.self_test.predicted:.2%}", f"{r.self_test.measured:.2%}")
    console.print(t)
    return reports
