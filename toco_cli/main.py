"""Entry point of ``toco``: one typer app, one module per command group."""

from __future__ import annotations

import typer

from toco_core.log_format import configure_logging

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="TOCO: tolerance analysis once, device-aware compression on every box.",
)


@app.callback()
def _root(verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="-v info, -vv debug")) -> None:
    configure_logging(verbose)


def _register() -> None:
    # Each command module adds its commands to ``app`` on import.
    from toco_cli import analyze, demo, pack, probe, recompress  # noqa: F401


_register()
