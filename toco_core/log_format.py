"""Structured, quiet logging for every process: ``time level logger msg key=value ...``.

Standard library only, so the edge daemon can use it without the CLI's typer and rich
(about 3 MB resident in a process that lives for months).
"""

from __future__ import annotations

import json
import logging
import sys


class KeyValueFormatter(logging.Formatter):
    """One event per line, grep-able; ``extra={"fields": {...}}`` become ``key=value`` pairs."""

    def format(self, record: logging.LogRecord) -> str:
        """The line for one record (the exception's repr is appended at ERROR and above)."""
        extra = getattr(record, "fields", None) or {}
        fields = " ".join(f"{k}={json.dumps(v) if isinstance(v, str) and ' ' in v else v}" for k, v in extra.items())
        base = (f"{self.formatTime(record, '%H:%M:%S')} {record.levelname.lower():7s} "
                f"{record.name}: {record.getMessage()}")
        if record.exc_info and record.levelno >= logging.ERROR:
            base += " exc=" + repr(record.exc_info[1])
        return f"{base} {fields}".rstrip()


def configure_logging(verbosity: int = 0) -> None:
    """Warnings only by default; ``-v`` (1) info, ``-vv`` (2) debug; to stderr, key=value lines."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
