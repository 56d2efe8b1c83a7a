"""``toco-agent``: run the edge daemon, and look at or act on its state from a shell.

Every command reads the same config (``--config FILE``, env ``TOCO_AGENT_*`` overrides);
errors are one line on stderr and a non-zero exit (toco_core.cli_support.cli_errors).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer
from rich.table import Table

from agent.config import DEFAULT_PATH, AgentConfig, load_config
from toco_core.cli_support import cli_errors, console

app = typer.Typer(help="TOCO Fleet edge agent: derive, serve and watch this box's model.", no_args_is_help=True,
                  add_completion=False)
ConfigOpt = typer.Option(None, "--config", "-c", help=f"agent TOML file (default {DEFAULT_PATH} if it exists)")


def _config(path: Path | None) -> AgentConfig:
    if path is None and DEFAULT_PATH.exists():
        path = DEFAULT_PATH
    return load_config(path)


@app.command()
@cli_errors
def run(config: Path | None = ConfigOpt,
        verbose: int = typer.Option(None, "-v", count=True, help="-v info, -vv debug")) -> None:
    """Run the daemon in the foreground until SIGTERM or SIGINT (then shut down cleanly)."""
    if config is None and DEFAULT_PATH.exists():
        config = DEFAULT_PATH
    load_config(config)  # a bad config is reported here, as one line
    # The daemon lives for months: become the lean ``python -m agent.run`` (same pid for
    # systemd and signals) so typer, rich and this shell's imports do not stay resident.
    argv = [sys.executable, "-m", "agent.run", *(["--config", str(config)] if config else []),
            *(["-" + "v" * verbose] if verbose else [])]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


@app.command()
@cli_errors
def status(config: Path | None = ConfigOpt,
           as_json: bool = typer.Option(False, "--json", help="print the raw JSON")) -> None:
    """Active model, slot, last drift window and connection, from the daemon's status.json."""
    from agent.status import read_status

    st = read_status(_config(config).state_dir)
    if as_json:
        console.print_json(st.model_dump_json())
        return
    t = Table(title=f"toco-agent {st.device_id} (fleet {st.fleet})", show_header=False)
    active = st.active or {}
    drift = st.last_drift or {}
    dep = st.deployment or {}
    rows = [("daemon", f"{'running' if st.running else 'stopped'} (pid {st.pid})"),
            ("broker", f"{st.broker} {'connected' if st.connected else 'NOT connected'}; outbox {st.outbox}"),
            ("api", st.api_url or "-"),
            ("active model", active.get("version", "none")), ("slot", active.get("slot", "-")),
            ("plan", (active.get("plan") or {}).get("label", "-")),
            ("last deployment", " ".join(str(dep[k]) for k in ("phase", "reason", "detail") if dep.get(k)) or "-"),
            ("last drift window", "-" if not drift else f"#{drift['window']} alert={drift['alert']} "
                                                        f"out_of_band={','.join(drift['out_of_band']) or 'none'}"),
            ("inferences", str(st.inferences)),
            ("refused commands", ", ".join(f"{k} {v}" for k, v in sorted(st.refused_commands.items())) or "none"),
            ("trusted keys", ", ".join(st.trusted_keys) or "-")]
    storage = st.storage or {}
    if storage:
        shadow = {"fp32": "fp32 base", "master": "master model", "none": "none (confidence/entropy/input checks)"}
        rows += [("state dir", f"{storage.get('state_dir_bytes', 0):,} bytes"),
                 ("downloaded",
                  "-" if storage.get("download_bytes") is None else f"{storage['download_bytes']:,} bytes"),
                 ("drift shadow", shadow.get(str(storage.get("shadow")), "-"))]
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


@app.command()
@cli_errors
def recompress(
    config: Path | None = ConfigOpt,
    memory: str | None = typer.Option(None, "--memory", help="session memory limit, e.g. 64MB"),
    storage: str | None = typer.Option(None, "--storage", help="storage limit, e.g. 100KB"),
    latency: str | None = typer.Option(None, "--latency", help="p50 latency limit at batch 1, e.g. 5ms"),
    budget: str | None = typer.Option(None, "--budget", help="max disagreement with the base, e.g. 1%"),
) -> None:
    """Derive the model again from the active bundle with new limits, and activate it if it passes.

    A running daemon picks the new model up by itself within a second.
    """
    from agent.deployer import Deployer
    from agent.model_store import ModelStore
    from agent.status import Journal
    from toco_core.errors import ConfigError, SelfTestError
    from toco_core.probe import probe_device
    from toco_core.units import parse_duration, parse_fraction, parse_size

    cfg = _config(config)
    store = ModelStore(cfg.state_dir)
    active = store.active()
    lines: list[str] = []
    deployer = Deployer(cfg, store, lambda: probe_device(cfg.state_dir, benchmark=False, device_id=cfg.device_id),
                        lambda phase, journal, **f: lines.append(f"{phase.value} {f.get('reason') or ''} "
                                                                 f"{f.get('detail', '')}".strip()))
    if active is None or not deployer.has_bundle(active.meta.bundle_id):
        raise ConfigError("no active model with a stored bundle here", "deploy a bundle to this box first")
    overrides = {"memory_bytes": parse_size(memory) if memory else None,
                 "storage_bytes": parse_size(storage) if storage else None,
                 "latency_ms": parse_duration(latency) * 1e3 if latency else None,
                 "fidelity_budget": parse_fraction(budget) if budget else None}
    with console.status("recompressing in a child process"):
        info = deployer.deploy(Journal(deployment_id="manual", bundle_id=active.meta.bundle_id, kind="recompress",
                                       policy={k: v for k, v in overrides.items() if v is not None}))
    for line in lines:
        console.print(line, highlight=False)
    if info is None:
        raise SelfTestError(f"recompression did not produce an active model: {lines[-1] if lines else 'no detail'}",
                            "the previous model keeps serving; relax the limits")
    console.print(f"active: slot {info.slot} {info.version} ({info.meta.plan.label if info.meta.plan else '-'})")


@app.command()
@cli_errors
def rollback(config: Path | None = ConfigOpt, reason: str = typer.Option("manual rollback", "--reason")) -> None:
    """Switch back to the previous model slot (a running daemon follows within a second)."""
    from agent.model_store import ModelStore, StoreError

    store = ModelStore(_config(config).state_dir)
    try:
        slot = store.rollback(reason)
    except StoreError as exc:
        from toco_core.errors import ConfigError

        raise ConfigError(exc.message, exc.hint) from None
    info = store.active()
    console.print(f"rolled back to slot {slot}: {info.version if info else '?'}")


@app.command()
@cli_errors
def probe(config: Path | None = ConfigOpt, bench: bool = typer.Option(True, "--bench/--no-bench"),
          as_json: bool = typer.Option(False, "--json", help="print the DeviceProfile JSON")) -> None:
    """This box's DeviceProfile with the configured caps (what the birth message carries)."""
    from toco_core.device import with_budgets
    from toco_core.probe import probe_device

    cfg = _config(config) if (config or DEFAULT_PATH.exists()) else None
    state = cfg.state_dir if cfg and cfg.state_dir.exists() else Path(".")
    prof = probe_device(state, benchmark=bench, device_id=cfg.device_id if cfg else None)
    if cfg:
        prof = with_budgets(prof, memory=cfg.memory_cap, storage=cfg.storage_cap, latency_s=cfg.latency_cap)
    if as_json:
        print(json.dumps(prof.model_dump(mode="json"), indent=1))
        return
    t = Table(title=f"device {prof.device_id}", show_header=False)
    for k, v in prof.model_dump(mode="json").items():
        t.add_row(k, json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    console.print(t)


if __name__ == "__main__":
    app()
