"""``toco pack``: the parts bundle of a model and its analysis, with a table of what each part costs."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from toco_cli.main import app
from toco_core.cli_support import cli_errors, console
from toco_core.units import format_size, parse_fraction


def part_group(name: str) -> str:
    """The table row a part is counted in: weights (head, prune and bit planes), calibration, base."""
    if name.startswith("calib/"):
        return name
    if name == "base":
        return "fp32 base (optional)"
    return "weights: " + ("head" if name == "head" else name.split("/")[0] + " planes")


@app.command()
@cli_errors
def pack(
    model: Path = typer.Argument(..., help="the base ONNX model"),
    analysis: Path = typer.Option(..., "--analysis", help="directory written by `toco analyze`"),
    out: Path = typer.Option(..., "-o", "--out", help="bundle file to write (e.g. model.bundle)"),
    budget: str = typer.Option("1%", "--budget", help="fleet fidelity budget the self-test samples are sized for"),
    with_base: bool = typer.Option(False, "--with-base", help="add the fp32 model as an optional part"),
) -> None:
    """Write the full parts bundle: weights on the tolerance grid, compact calibration samples."""
    from toco_core.analysis_result import load_result
    from toco_core.bundle import pack_bundle
    from toco_core.model_bundle import BundleInfo
    from toco_core.onnx_model import load_model, model_hash
    from toco_core.parts_bundle import pack_parts

    base, result = load_model(model), load_result(analysis)
    info = BundleInfo(model_name=model.stem, model_sha256=model_hash(base), budget=parse_fraction(budget))
    with console.status("coding the weight planes and calibration samples"):
        parts = pack_parts(base, result, info, include_base=with_base)
    out.parent.mkdir(parents=True, exist_ok=True)
    data = pack_bundle(parts)
    out.write_bytes(data)
    fp32 = model.stat().st_size
    groups: dict[str, int] = {}
    for name, blob in parts.items():
        groups[part_group(name)] = groups.get(part_group(name), 0) + len(blob)
    t = Table(title=f"{out.name}: bytes on the wire by part (fp32 model file {format_size(fp32)})")
    for col in ("part", "bytes", "vs fp32 file"):
        t.add_column(col, justify="left" if col == "part" else "right")
    for group in sorted(groups):
        t.add_row(group, format_size(groups[group]), f"{groups[group] / fp32:.3f}x")
    weights = sum(v for k, v in groups.items() if k.startswith("weights"))
    t.add_row("weights part", format_size(weights), f"{weights / fp32:.3f}x")
    t.add_row("whole file", format_size(len(data)), f"{len(data) / fp32:.3f}x")
    console.print(t)
    console.print(f"wrote {out} ({len(parts)} parts)")
