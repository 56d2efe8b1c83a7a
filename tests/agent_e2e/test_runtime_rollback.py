"""A model that loads and passes the pre-activation test run but fails at run time on real
digits: after activation the agent rolls it back by itself, once, and says so on the status topic."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.config import load_config
from agent.daemon import Agent
from agent.model_store import CandidateMeta, ModelStore
from agent.status import Journal
from tests.agent_e2e.conftest import wait_for
from toco_core.messages import PlanSummary
from toco_core.runtime import make_session

DEVICE = "box-rt"


def value_dependent_reshape() -> bytes:
    """x[N,1,28,28] -> Reshape to [-1, 784 + 3 * ceil(max(x))] -> MatMul [784, 10].

    An all-zero input (the activation test run) reshapes to [N, 784] and runs; any image with
    a pixel > 0 asks for rows of 787 values, which onnxruntime refuses inside ``run()``.
    """
    w = np.random.default_rng(0).standard_normal((784, 10)).astype(np.float32) * 0.01
    nodes = [helper.make_node("ReduceMax", ["x"], ["m"], keepdims=0),
             helper.make_node("Ceil", ["m"], ["c"]),
             helper.make_node("Cast", ["c"], ["ci"], to=TensorProto.INT64),
             helper.make_node("Mul", ["ci", "grow"], ["delta"]),
             helper.make_node("Add", ["base_shape", "delta"], ["shape"]),
             helper.make_node("Reshape", ["x", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "w"], ["logits"])]
    inits = [numpy_helper.from_array(np.array([0, 3], np.int64), "grow"),
             numpy_helper.from_array(np.array([-1, 784], np.int64), "base_shape"), numpy_helper.from_array(w, "w")]
    graph = helper.make_graph(nodes, "fails-on-real-inputs",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def test_the_broken_model_loads_runs_on_zeros_and_fails_only_on_real_digits(digits):
    session = make_session(value_dependent_reshape(), threads=1)  # loads: no error here
    assert session.run(None, {"x": np.zeros((1, 1, 28, 28), np.float32)})[0].shape == (1, 10)
    with pytest.raises(Exception, match="(?i)reshape"):
        session.run(None, {"x": digits.x_heldout[:1].astype(np.float32)})


def _infer(url: str, x: np.ndarray) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/infer", data=json.dumps({"inputs": x.tolist()}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_runtime_error_after_activation_rolls_back_once_and_is_reported(fleet, keys, lenet5_path, digits, tmp_path):
    store = ModelStore(tmp_path / "state")
    good = store.activate(store.install_candidate(lenet5_path.read_bytes(), CandidateMeta(bundle_id="factory")))
    cfg = load_config(None, device_id=DEVICE, fleet="e2e", broker_url=fleet.broker.url, state_dir=tmp_path / "state",
                      public_key=keys[1], api_port=0, probe_benchmark=False, threads=1, trial_runs=20)
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.link.wait_connected(10)
        journal = Journal(deployment_id="rt-1", bundle_id="b" * 64)
        info = agent.deployer.activate(journal, value_dependent_reshape(), PlanSummary(label="broken"), {})
        assert info is not None and agent.engine.model_version == info.version  # it passed the zero-input test run
        assert agent.engine.on_trial

        x = digits.x_heldout[:1].astype(np.float32)
        code, body = _infer(agent.server.url, x)
        assert code == 500 and info.version in body["error"] and "run time" in body["error"]
        done = fleet.wait_phase(DEVICE, "rt-1", {"rolled_back", "failed"}, 20)
        assert (done.phase.value, done.reason.value) == ("rolled_back", "runtime_error"), done.detail
        assert "Reshape" in done.detail and f"slot {good.slot}" in done.detail

        assert wait_for(lambda: agent.engine.model_version == good.version, 10)
        assert store.active().version == good.version
        assert store.pointer().last_rollback.sha256 == info.meta.sha256
        for i in range(5):  # the old model serves real digits again
            code, body = _infer(agent.server.url, digits.x_heldout[i:i + 1].astype(np.float32))
            assert code == 200 and body["model_version"] == good.version
        time.sleep(1.0)  # never retried: one rollback, one report, no further switches
        phases = [s.phase.value for s in fleet.statuses(DEVICE, "rt-1")]
        assert phases.count("rolled_back") == 1 and phases[-1] == "rolled_back", phases
        assert store.pointer().generation == 3  # factory, broken, back: nothing after that
    finally:
        agent.stop()


def test_errors_after_the_trial_are_answered_not_rolled_back(fleet, keys, lenet5_path, digits, tmp_path):
    """The rule's other side: once its trial runs passed, an odd failure does not switch models."""
    store = ModelStore(tmp_path / "state")
    store.activate(store.install_candidate(lenet5_path.read_bytes(), CandidateMeta(bundle_id="factory")))
    cfg = load_config(None, device_id=DEVICE + "-2", fleet="e2e", broker_url=fleet.broker.url,
                      state_dir=tmp_path / "state", public_key=keys[1], api_port=0, probe_benchmark=False, threads=1,
                      trial_runs=3)
    agent = Agent(cfg)
    agent.start()
    try:
        info = agent.deployer.activate(Journal(deployment_id="rt-2", bundle_id="c" * 64),
                                       value_dependent_reshape(), PlanSummary(label="broken"), {})
        zeros = np.zeros((1, 1, 28, 28), np.float32)
        for _ in range(3):  # three clean runs: the trial is over
            assert _infer(agent.server.url, zeros)[0] == 200
        assert not agent.engine.on_trial
        assert _infer(agent.server.url, digits.x_heldout[:1].astype(np.float32))[0] == 500
        time.sleep(1.0)
        assert agent.engine.model_version == info.version and store.active().version == info.version
        assert "rolled_back" not in [s.phase.value for s in fleet.statuses(DEVICE + "-2", "rt-2")]
    finally:
        agent.stop()
