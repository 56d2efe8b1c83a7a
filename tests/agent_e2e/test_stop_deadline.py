"""The agent's stop is bounded: a part stuck in it ends the process with every thread's stack in the
log, before systemd's TimeoutStopSec (or the demo) kills it without a word."""

import os
import signal
import subprocess
import sys
import time

# agent.run's signal handling with a short deadline; what the process then does follows from line 8
_SCRIPT = """import threading, time
import agent.run
agent.run.STOP_DEADLINE_S = {deadline}
stop = threading.Event()
agent.run._stop_on_signal(stop)
print("armed", flush=True)
stop.wait()
"""


def _signalled(deadline: float, shutdown: str) -> subprocess.CompletedProcess:
    """Run the script with ``shutdown`` as what the process does once stopped, SIGTERM it once armed."""
    code = _SCRIPT.format(deadline=deadline) + shutdown
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "armed"
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    took = f"\n[exited {time.monotonic() - t0:.1f} s after SIGTERM]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err + took)


def test_a_stop_stuck_past_the_deadline_exits_1_with_the_stacks_in_the_log():
    proc = _signalled(1.0, "time.sleep(60)  # a clean shutdown that never returns\n")
    assert proc.returncode == 1, proc.stderr
    assert "the agent did not stop within 1 s of the signal; exiting now" in proc.stderr
    assert 'File "<string>", line 8' in proc.stderr, proc.stderr  # the main thread, at the sleep


def test_a_stop_within_the_deadline_ends_normally():
    proc = _signalled(5.0, 'print("stopped", flush=True)\n')
    assert proc.returncode == 0 and proc.stdout.strip() == "stopped", proc.stderr
    assert "did not stop" not in proc.stderr
