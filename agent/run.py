"""``python -m agent.run``: the edge daemon's lean entry point, what ``toco-agent run`` execs into.

The daemon lives for months, so this process never imports typer or rich (the CLI shell's
~3 MB): the shell checks the config, then replaces itself with this (same pid for systemd
and signals).
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from agent.config import load_config
from agent.daemon import Agent
from toco_core.errors import TocoError
from toco_core.log_format import configure_logging


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.run [--config FILE] [-v|-vv]``: run the Agent until SIGTERM or SIGINT.

    Shuts down cleanly on either signal; returns the exit code (a TocoError's, 2 for a bad config).
    """
    ap = argparse.ArgumentParser(prog="toco-agent run", description="the TOCO Fleet edge daemon")
    ap.add_argument("--config", "-c", type=Path, default=None, help="agent TOML file")
    ap.add_argument("-v", dest="verbose", action="count", default=None, help="-v info, -vv debug")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config)
        configure_logging(cfg.log_verbosity if args.verbose is None else args.verbose)
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        Agent(cfg).run_until(stop)
    except TocoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
