"""One real agent process, one real mosquitto, the demo CNN: deploy, refuse, survive garbage, watch drift.

The tests run in file order and share the agent (module scope): the first deployment is
the "old model" the later refusals must leave serving.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.agent_e2e.conftest import REPO, AgentProcess, drop_from, wait_for
from toco_core.bundle import generate_private_key
from toco_core.demo.data import shifted_digits
from toco_core.messages import MessageKind, RollbackCommand, UploadSamplesCommand
from toco_core.runtime import make_session

DEVICE = "box-1"
STORAGE_CAP = 60_000
DRIFT: dict[str, Any] = {
    "window_max_samples": 100, "window_min_samples": 20, "window_seconds": 600, "shadow_fraction": 0.5,
    "consecutive_windows": 2, "max_disputed": 8, "min_shadow_samples": 10}
state: dict = {}


@pytest.fixture(scope="module")
def agent(fleet, keys, tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("agent1"), DEVICE, fleet.broker.url, keys[1],
                     storage_cap=f"{STORAGE_CAP}B", bundle_disk_cap="24MB", upload_samples=True,
                     samples_batch_bytes="8KB", drift=DRIFT)
    a.start()
    yield a
    code = a.stop()
    assert code == 0, (code, a.log_text())  # SIGTERM: clean shutdown, exit code 0


def test_bundle_resumes_after_broker_outage_recompresses_within_budget_and_serves(agent, fleet, bundles):
    manifest, data = bundles.make("initial", pad=1_000_000)
    assert manifest.n_chunks > 16
    gate = threading.Event()
    gate.set()
    fleet.faults.by_bundle[manifest.bundle_id] = drop_from(8, gate)
    fleet.announce(manifest, data)
    fleet.deploy(DEVICE, manifest.bundle_id, "d1")
    bid = manifest.bundle_id
    assert wait_for(lambda: all((bid, i) in fleet.publisher.requests for i in range(16)), 20), agent.log_text()
    time.sleep(0.5)  # chunks 0-7 arrive and are written
    fleet.broker.stop()  # disconnect mid-transfer
    gate.clear()
    time.sleep(1.0)
    fleet.broker.start()
    active = fleet.wait_phase(DEVICE, "d1", {"active", "failed", "refused", "rolled_back"}, 90)
    assert active.phase.value == "active", (active.reason, active.detail, agent.log_text())
    # Resumed: what had arrived before the outage was never asked for again.
    assert [fleet.publisher.requests[(bid, i)] for i in range(8)] == [1] * 8
    assert all(fleet.publisher.requests[(bid, i)] >= 1 for i in range(manifest.n_chunks))
    # Within the box's budget, with predicted and measured fidelity reported.
    plan = active.plan
    assert plan.storage_bytes <= STORAGE_CAP < plan.base_file_bytes
    assert plan.measured_disagreement == pytest.approx(1 - active.measured_agreement)
    assert active.predicted_agreement >= 0.99 and active.measured_agreement >= 0.99
    phases = [s.phase.value for s in fleet.statuses(DEVICE, "d1")]
    assert {"recompressing", "self_test", "activating", "active"} <= set(phases)
    # Served over HTTP: the answer equals onnxruntime on the model the store holds.
    x = bundles_digits(8)
    answer = agent.infer(x)
    sess = make_session(agent.served_model())
    expected = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(np.asarray(answer["outputs"][sess.get_outputs()[0].name]), expected, rtol=1e-5,
                               atol=1e-5)
    assert answer["model_version"].startswith(bid)
    state["version"] = answer["model_version"]
    state["bundle_id"] = bid


def test_the_serving_daemon_never_loaded_onnx_cryptography_or_torch(agent):
    """After a whole deployment (signature check, recompression, activation, shadow model) the
    daemon, which ``toco-agent run`` execs into, has none of them mapped: they ran in children."""
    cmdline = Path(f"/proc/{agent.proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"agent.run" in cmdline  # the same pid, now the lean entry point without typer and rich
    maps = Path(f"/proc/{agent.proc.pid}/maps").read_text()
    assert "onnxruntime" in maps  # the check can see native modules
    for heavy in ("/onnx/", "/cryptography/", "/torch/"):
        assert heavy not in maps, heavy


@functools.lru_cache(maxsize=1)
def _heldout() -> np.ndarray:
    from toco_core.demo.data import mnist_splits

    return mnist_splits().x_heldout


def bundles_digits(n: int, kind: str | None = None, seed: int = 0) -> np.ndarray:
    x = _heldout()
    x = x[np.random.default_rng(seed).integers(0, len(x), n)]
    return shifted_digits(x, kind) if kind else x


def _serving_unchanged(agent) -> None:
    code, ready = agent.get("/v1/ready")
    assert code == 200 and ready["model_version"] == state["version"]
    assert agent.infer(bundles_digits(2))["model_version"] == state["version"]


@pytest.mark.parametrize("case", ["bad_signature", "corrupt_chunk", "truncated", "too_big"])
def test_bad_bundles_are_refused_reported_and_the_old_model_keeps_serving(agent, fleet, bundles, case):
    if case == "bad_signature":
        manifest, data = bundles.make(case, key=generate_private_key())
    else:
        manifest, data = bundles.make(case, pad=4_500_000 if case == "too_big" else 0)
    if case == "corrupt_chunk":
        fleet.faults.by_bundle[manifest.bundle_id] = lambda i, p: p[:-10] + bytes(10) if i == 1 else p
    if case == "truncated":
        last = manifest.n_chunks - 1
        fleet.faults.by_bundle[manifest.bundle_id] = lambda i, p: p[:-1000] if i == last else p
    fleet.announce(manifest, data)
    fleet.deploy(DEVICE, manifest.bundle_id, f"bad-{case.replace('_', '-')}")
    expected = {"bad_signature": ("refused", "bad_signature"), "corrupt_chunk": ("failed", "corrupt_chunk"),
                "truncated": ("failed", "corrupt_chunk"), "too_big": ("refused", "no_disk")}[case]
    status = fleet.wait_phase(DEVICE, f"bad-{case.replace('_', '-')}", {"failed", "refused", "rolled_back"}, 30)
    assert (status.phase.value, status.reason.value) == expected, status.detail
    assert status.detail
    if case == "too_big":
        assert not any(k[0] == manifest.bundle_id for k in fleet.publisher.requests)  # no chunk was asked for
    _serving_unchanged(agent)


def test_malformed_payloads_on_every_subscribed_topic_are_dropped(agent, fleet):
    t = fleet.topics
    unknown = hashlib.sha256(b"never published").hexdigest()
    fleet.deploy(DEVICE, unknown, "pending")  # the agent now also listens on its manifest and chunks
    fleet.wait_phase(DEVICE, "pending", {"received"}, 10)
    garbage = [b"not json", b"{}", b"[1,2]", b'{"command":"explode","cmd_id":"x"}',
               b'{"command":"deploy","cmd_id":"x","deployment_id":"y","bundle_id":"../etc"}',
               b'{"command":"rollback","cmd_id":"x","schema_version":99}', b"\xff\xfe" * 100, b"{" * 5000]
    for payload in garbage:
        fleet.listener.publish(t.device(MessageKind.CMD, DEVICE), payload)
        fleet.listener.publish(t.manifest(unknown), payload)
        fleet.listener.publish(t.chunk(unknown, 0), payload)
    fleet.listener.publish(t.chunk(unknown, 0),
                           b'{"schema_version":1,"bundle_id":"%s","index":0}\nxx' % unknown.encode())
    # Still alive, still serving, still obeying a valid command afterwards.
    fleet.command(DEVICE, UploadSamplesCommand(cmd_id="after-garbage", max_bytes=4096))
    assert wait_for(lambda: any(m.cmd_id == "after-garbage" for m in fleet.messages(DEVICE, "samples")), 10)
    assert agent.proc.poll() is None
    _serving_unchanged(agent)
    assert agent.log_text(None).count("dropped invalid payload") >= 3 * len(garbage) - 3


def _feed(agent, kind: str | None, windows: int, seed: int) -> None:
    for b in range(windows * DRIFT["window_max_samples"] // 20):
        agent.infer(bundles_digits(20, kind, seed=seed * 1000 + b))


def _drift(fleet) -> list:
    return sorted(fleet.messages(DEVICE, "drift"), key=lambda m: m.window_index)


def _align(agent, fleet) -> int:
    """Feed clean batches until a window closes: later windows then start exactly at a batch edge."""
    seen = len(_drift(fleet))
    for b in range(DRIFT["window_max_samples"] // 20 + 1):
        agent.infer(bundles_digits(20, seed=500 + b))
        if wait_for(lambda: len(_drift(fleet)) > seen, 0.5, 0.05):
            return len(_drift(fleet))
    raise AssertionError("no drift window closed")


def test_drift_clean_digits_no_alert_shifted_digits_alert_with_disputed_samples(agent, fleet):
    start = _align(agent, fleet)
    _feed(agent, None, 3, seed=1)
    assert wait_for(lambda: len(_drift(fleet)) >= start + 3, 20), agent.log_text()
    clean = _drift(fleet)[start:]
    assert not any(m.alert for m in clean) and all(m.bundle_id == state["bundle_id"] for m in clean)
    assert all(m.n_samples == DRIFT["window_max_samples"] for m in clean)
    assert sum(m.n_shadowed for m in clean) > 0  # the base model ran as shadow
    for k, kind in enumerate(["rotate", "invert", "noise"]):
        seen = len(_drift(fleet))
        _feed(agent, None, 1, seed=10 + k)  # one clean window resets the streak
        _feed(agent, kind, DRIFT["consecutive_windows"], seed=20 + k)
        assert wait_for(lambda: len(_drift(fleet)) >= seen + 1 + DRIFT["consecutive_windows"], 20)
        msgs = _drift(fleet)[seen:]
        assert not msgs[0].alert
        assert [m.alert for m in msgs[1:]] == [False] * (DRIFT["consecutive_windows"] - 1) + [True], kind
        last = msgs[-1]
        assert last.out_of_band and 0 < len(last.disputed) <= DRIFT["max_disputed"]
        refs = {d.ref for d in last.disputed}
        assert wait_for(lambda: refs <= {s.ref for m in fleet.messages(DEVICE, "samples")
                                         if m.window == last.window_index for s in m.samples}, 10), kind
        batches = [m for m in fleet.messages(DEVICE, "samples") if m.window == last.window_index]
        assert all(len(m.model_dump_json()) <= 8 * 1024 + 1024 for m in batches)
    status = json.loads((agent.state_dir / "status.json").read_text())
    assert status["last_drift"]["window"] >= 3 and status["connected"]


def test_second_deployment_then_rollback_command_and_status_cli(agent, fleet, bundles):
    manifest, data = bundles.make("second")
    fleet.announce(manifest, data)
    fleet.deploy(DEVICE, manifest.bundle_id, "d2")
    done = fleet.wait_phase(DEVICE, "d2", {"active", "failed", "refused"}, 60)
    assert done.phase.value == "active", done.detail
    assert agent.get("/v1/ready")[1]["model_version"].startswith(manifest.bundle_id)
    cmd = RollbackCommand(cmd_id="rb1", deployment_id="rb1", reason="test")
    fleet.command(DEVICE, cmd)
    back = fleet.wait_phase(DEVICE, "rb1", {"active", "failed"}, 20)
    assert back.phase.value == "active" and "rolled back" in back.detail
    assert agent.get("/v1/ready")[1]["model_version"] == state["version"]
    # A second rollback has nothing to go back to: reported, not crashed.
    fleet.command(DEVICE, cmd.model_copy(update={"cmd_id": "rb2", "deployment_id": "rb2"}))
    again = fleet.wait_phase(DEVICE, "rb2", {"active", "failed"}, 20)
    assert again.phase.value == "failed" and again.reason.value == "bad_command"
    out = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json", "--config", str(agent.config)],
                         cwd=REPO, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    st = json.loads(out.stdout)
    assert st["active"]["version"] == state["version"] and st["connected"] and st["running"]
