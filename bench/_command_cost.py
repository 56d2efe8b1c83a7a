"""What checking a signed command costs the agent daemon: run as its own process by bench/agent.py.

In one fresh process that has imported the daemon's modules (``agent.daemon``, no cryptography):
1. the agent's way: ``CommandGuard.check`` with the signature checked in a child task
   (agent.child_tasks.verify_command), per-command latency and the daemon's RSS after N commands;
2. the alternative, measured after (1) in the same process: importing cryptography's Ed25519 into
   the daemon, its RSS cost, and the per-command latency of checking the signature in-process.
Prints one JSON object.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    """This process's resident set, MB (10^6 bytes)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024 / 1e6
    return 0.0


def main(n: int = 10) -> dict:
    import agent.daemon  # noqa: F401  (the daemon's resident modules)
    from agent import child_tasks
    from agent.command_guard import CommandGuard
    from agent.trust_store import TrustStore
    from toco_core.messages import MessageKind, encode, parse_message

    assert "cryptography" not in sys.modules, "the daemon's modules import cryptography"
    # the signed commands are made by a child (the server's side), so this process stays cryptography-free
    maker = ("import json,sys,time;from toco_core.bundle import *;from toco_core.command_signing import sign_command;"
             "from toco_core.messages import UploadSamplesCommand,encode;k=generate_private_key();p=k.public_key();"
             "print(json.dumps({'fingerprint':key_fingerprint(p),'public_key':public_key_raw(p).hex()}));"
             f"[print(encode(sign_command(UploadSamplesCommand(cmd_id=f'c{{i}}'),k,device_id='box',sequence=i+1,"
             f"expires_at=time.time()+600)).decode()) for i in range({2 * n})]")
    import subprocess

    lines = subprocess.run([sys.executable, "-c", maker], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    from toco_core.messages import TrustedKey

    key = TrustedKey.model_validate_json(lines[0])
    cmds = [parse_message(MessageKind.CMD, c.encode()) for c in lines[1:]]
    state = Path(tempfile.mkdtemp(prefix="bench-cmd-"))
    trust = TrustStore(state, key)
    rss0 = rss_mb()
    guard = CommandGuard("box", trust, lambda c: child_tasks.verify_command(trust.path, encode(c)))
    child_ms = []
    for c in cmds[:n]:
        t0 = time.perf_counter()
        assert guard.admit(c)
        child_ms.append((time.perf_counter() - t0) * 1e3)
    rss_child = rss_mb()
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e6
    # the alternative: cryptography in the daemon
    t0 = time.perf_counter()
    from toco_core.command_signing import public_keys, verify_command

    keys = public_keys(trust.state.keys)
    import_ms = (time.perf_counter() - t0) * 1e3
    guard = CommandGuard("box", trust, lambda c: verify_command(c, keys))
    inproc_ms = []
    for c in cmds[n:]:
        t0 = time.perf_counter()
        assert guard.admit(c)
        inproc_ms.append((time.perf_counter() - t0) * 1e3)
    return {"n": n, "rss_before_mb": rss0, "child": {"p50_ms": statistics.median(child_ms), "max_ms": max(child_ms),
                                                     "daemon_rss_delta_mb": rss_child - rss0,
                                                     "child_peak_rss_mb": child_peak},
            "in_daemon": {"p50_ms": statistics.median(inproc_ms), "max_ms": max(inproc_ms),
                          "import_ms": import_ms, "daemon_rss_delta_mb": rss_mb() - rss_child}}


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)))
