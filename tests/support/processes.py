"""Ports and child processes: the pieces every real-process test and bench needs."""

from __future__ import annotations

import socket
import subprocess


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that nothing listens on right now (another process may take it later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen | None, timeout: float = 5.0) -> int | None:
    """SIGTERM ``proc``, wait up to ``timeout`` s for a clean exit, then SIGKILL it (and reap it).

    Takes a Popen (or None, and one that has exited already is left alone). Returns its exit code
    (None for None). Raises subprocess.TimeoutExpired only if it survives SIGKILL for 5 s.
    """
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            # a graceful stop that hangs must not hang the test run too
            proc.kill()
            proc.wait(5)
    return proc.returncode
