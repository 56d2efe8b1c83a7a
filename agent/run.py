"""``python -m agent.run``: the edge daemon's lean entry point, what ``toco-agent run`` execs into.

The daemon lives for months, so this process never imports typer or rich (the CLI shell's
~3 MB): the shell checks the config, then replaces itself with this (same pid for systemd
and signals).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
from pathlib import Path

from agent.config import load_config
from agent.daemon import Agent
from toco_core.errors import TocoError
from toco_core.log_format import configure_logging
from toco_core.stop_deadline import exit_if_stuck

# Under systemd's TimeoutStopSec (30 s, deploy/systemd/toco-agent.service) and the demo's 25 s wait: a
# stop stuck in one of its parts ends with every thread's stack in the agent's log, not a bare SIGKILL.
STOP_DEADLINE_S = 20.0


def _report_stuck_stop() -> None:
    """What the stop's deadline leaves in the log before the process ends: where each thread was."""
    logging.getLogger("toco.agent").error("the agent did not stop within %.0f s of the signal; exiting now "
                                          "(every thread's stack follows)", STOP_DEADLINE_S)
    faulthandler.dump_traceback(sys.stderr, all_threads=True)
    logging.shutdown()


def _stop_on_signal(stop: threading.Event) -> None:
    """SIGTERM or SIGINT sets ``stop`` (the daemon's clean shutdown) and arms the stop's deadline once."""
    def handler(*_: object) -> None:
        if not stop.is_set():
            exit_if_stuck(STOP_DEADLINE_S, _report_stuck_stop)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


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
        _stop_on_signal(stop)
        Agent(cfg).run_until(stop)
    except TocoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
