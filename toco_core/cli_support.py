"""What every TOCO command line shares: one-line errors, quiet structured logging, sizes.

Used by the ``toco``, ``toco-agent`` and ``toco-fleet`` shells; no algorithm lives here.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console

from toco_core.errors import TocoError

console = Console()
err_console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def cli_errors(func: F) -> F:
    """Turn TocoError (and pydantic ValidationError) into one red line and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except TocoError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first.get("loc", ())) or "input"
            err_console.print(f"[red]error:[/red] invalid {where}: {first.get('msg')}", highlight=False)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


class KeyValueFormatter(logging.Formatter):
    """``time level logger msg key=value ...``: one event per line, grep-able."""

    def format(self, record: logging.LogRecord) -> str:
        extra = getattr(record, "fields", None) or {}
        fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}" for k, v in extra.items())
        base = f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7s} {record.name}: {record.getMessage()}"
        if record.exc_info and record.levelno >= logging.ERROR:
            base += " exc=" + repr(record.exc_info[1])
        return f"{base} {fields}".rstrip()


def configure_logging(verbosity: int = 0) -> None:
    """Warnings only by default; ``-v`` info, ``-vv`` debug; to stderr."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
