"""``toco probe``: print this box's DeviceProfile, optionally capped by budgets and saved as JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from toco_cli.main import app
from toco_core.cli_support import cli_errors, console
from toco_core.device import DeviceProfile, has_fast_int8, save_profile, usable_memory, usable_storage, with_budgets
from toco_core.probe import probe_device
from toco_core.units import format_size, parse_duration, parse_size


def profile_table(profile: DeviceProfile) -> Table:
    """A two-column rich table of the profile's facts and budgets."""
    table = Table(title=f"device {profile.device_id}", show_header=False)
    table.add_column("fact", style="bold")
    table.add_column("value")
    bench = profile.benchmark
    rows = [
        ("memory", f"{format_size(profile.available_memory)} available of {format_size(profile.total_memory)}"),
        ("storage", f"{format_size(profile.free_storage)} free"),
        ("cores", f"{profile.physical_cores} physical, {profile.logical_cores} logical"),
        ("cpu", profile.cpu_model or "unknown"),
        ("isa", " ".join(profile.isa) or "none detected"),
        ("fast int8", "yes" if has_fast_int8(profile) else "no"),
        ("onnxruntime", f"{profile.ort_version} ({', '.join(profile.providers)})"),
        ("formats", ", ".join(f.value for f in profile.formats)),
    ]
    if bench is not None:
        int8 = f"{bench.int8_gops:.1f} GOP/s" if bench.int8_gops else "n/a"
        rows.append(("benchmark", f"fp32 {bench.fp32_gflops:.1f} GFLOP/s, int8 {int8} "
                                  f"({bench.gemm_size}^3 GEMM, {bench.seconds:.2f} s)"))
    rows.append(("usable memory", format_size(usable_memory(profile))
                 + (" (budget)" if profile.memory_budget else "")))
    rows.append(("usable storage", format_size(usable_storage(profile))
                 + (" (budget)" if profile.storage_budget else "")))
    if profile.latency_budget_s is not None:
        rows.append(("latency budget", f"{profile.latency_budget_s * 1e3:.2f} ms"))
    for key, value in rows:
        table.add_row(key, value)
    return table


@app.command()
@cli_errors
def probe(
    json_path: Path | None = typer.Option(None, "--json", help="write the profile to this JSON file"),
    no_bench: bool = typer.Option(False, "--no-bench", help="skip the GEMM benchmark"),
    memory: str | None = typer.Option(None, "--memory", help="memory budget for the model, e.g. 64MB"),
    storage: str | None = typer.Option(None, "--storage", help="storage budget for the model, e.g. 2MB"),
    latency: str | None = typer.Option(None, "--latency", help="p50 latency budget at batch 1, e.g. 5ms"),
    storage_dir: Path = typer.Option(Path("."), "--storage-dir", help="directory where models will be stored"),
    device_id: str | None = typer.Option(None, "--device-id", help="id to record (default: host name)"),
) -> None:
    """Probe this box (memory, storage, CPU, onnxruntime formats, GEMM speed) and print its profile."""
    # Parse the budgets first: a typo should fail before the probe spends any time.
    budgets: dict[str, Any] = dict(
        memory=parse_size(memory) if memory is not None else None,
        storage=parse_size(storage) if storage is not None else None,
        latency_s=parse_duration(latency) if latency is not None else None,
    )
    profile = with_budgets(probe_device(storage_dir, benchmark=not no_bench, device_id=device_id), **budgets)
    console.print(profile_table(profile))
    if json_path is not None:
        save_profile(profile, json_path)
        console.print(f"profile written to {json_path}")
