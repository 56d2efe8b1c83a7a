"""The agent's stop is bounded: a part stuck in it ends the process with every thread's stack in the
log, before systemd's TimeoutStopSec (or the demo) kills it without a word."""

import os
import signal
import subprocess
import sys
import textwrap
import time


def _signalled(code: str, seconds: float) -> subprocess.CompletedProcess:
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "armed"
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=seconds)
    took = f"\n[exited {time.monotonic() - t0:.1f} s after SIGTERM]"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err + took)


def test_a_stop_stuck_past_the_deadline_exits_1_with_the_stacks_in_the_log():
    proc = _signalled("""
        import threading, time
        import agent.run
        agent.run.STOP_DEADLINE_S = 1.0
        stop = threading.Event()
        agent.run._stop_on_signal(stop)
        print("armed", flush=True)
        stop.wait()
        time.sleep(60)  # a clean shutdown that never returns
        """, 30)
    assert proc.returncode == 1, proc.stderr
    assert "the agent did not stop within 1 s of the signal; exiting now" in proc.stderr
    assert 'File "<string>", line 9' in proc.stderr, proc.stderr  # the main thread, at the sleep


def test_a_stop_within_the_deadline_ends_normally():
    proc = _signalled("""
        import threading
        import agent.run
        agent.run.STOP_DEADLINE_S = 5.0
        stop = threading.Event()
        agent.run._stop_on_signal(stop)
        print("armed", flush=True)
        stop.wait()
        print("stopped", flush=True)
        """, 30)
    assert proc.returncode == 0 and proc.stdout.strip() == "stopped", proc.stderr
    assert "did not stop" not in proc.stderr
