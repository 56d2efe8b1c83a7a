"""`toco demo` as a user runs it: once to the end (`--once`), or up until a plain `kill`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ENV = {**os.environ, "COLUMNS": "160"}  # rich wraps at the terminal's width: wide enough for the step lines


def run_demo(workdir: Path, *extra: str, timeout: float = 1200) -> subprocess.CompletedProcess:
    """Runs `toco demo --once --workdir WORKDIR *extra` to its end; returns the finished process (text output)."""
    return subprocess.run([sys.executable, "-m", "toco_cli", "demo", "--once", "--workdir", str(workdir), *extra],
                          capture_output=True, text=True, timeout=timeout, env=ENV)


def run_demo_until_up_then_kill(workdir: Path, *extra: str) -> subprocess.CompletedProcess:
    """`toco demo` as `make demo` runs it: wait for "press Ctrl-C", then a plain `kill` (SIGTERM).

    Returns the finished process with everything it printed (stdout up to the kill, then the rest).
    If the demo fails before the end of its story, its stdout ends early and no signal is sent.
    """
    proc = subprocess.Popen([sys.executable, "-m", "toco_cli", "demo", "--workdir", str(workdir), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if "press Ctrl-C to stop" in line:
            proc.send_signal(signal.SIGTERM)
            break
    try:  # the demo bounds its own clean-up (toco_cli.demo.STOP_WITHIN_S); past that, fail with what it printed
        out, err = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        err += "\n[the demo did not end within 150 s of the SIGTERM; killed]"
    overdue = workdir / "stop-overdue.txt"
    if overdue.exists():
        err += "\n" + overdue.read_text()
    return subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, err)


def unstopped_agents(workdir: Path, status: dict[str, dict]) -> str:
    """For an assertion's message: the end of the log of every agent whose status.json still says running,
    where its stop hung (agent.run's stop deadline writes every thread's stack there before it exits)."""
    tails = []
    for device, s in status.items():
        if s.get("running"):
            log = workdir / "agents" / device / "agent.log"
            lines = log.read_text(errors="replace").splitlines()[-150:] if log.exists() else ["(no log)"]
            tails.append(f"--- {device}: {log} ---\n" + "\n".join(lines))
    return "\n".join(tails)
