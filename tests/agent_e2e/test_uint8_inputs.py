"""A real agent serving the uint8 NHWC camera model: deployed from a signed bundle and recompressed
on the box, it answers uint8 .npy and JSON integer requests, refuses scaled floats with a reason,
watches drift on the bytes it is fed and uploads disputed inputs as uint8.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from tests.agent_e2e.conftest import CHUNK, AgentProcess, wait_for
from toco_core.analysis.pipeline import analyze
from toco_core.analysis.settings import AnalysisSettings
from toco_core.analysis_result import save_result
from toco_core.bundle import make_manifest, pack_bundle
from toco_core.demo.layouts import nhwc_uint8_digits, nhwc_uint8_model
from toco_core.model_bundle import BundleInfo, bundle_files
from toco_core.onnx_model import load_model, model_hash
from toco_core.runtime import make_session

DEVICE = "camera-1"
DRIFT = {"window_max_samples": 60, "window_min_samples": 20, "window_seconds": 600, "shadow_fraction": 1.0,
         "consecutive_windows": 1, "max_disputed": 8, "min_shadow_samples": 10}


@pytest.fixture(scope="module")
def digits():
    return nhwc_uint8_digits()


@pytest.fixture(scope="module")
def camera_bundle(keys, digits, tmp_path_factory):
    path = nhwc_uint8_model()
    settings = AnalysisSettings(max_rounds=2, initial_samples=48, samples_per_round=48, max_heldout=300)
    result = analyze(load_model(path), digits.x_pool[:600], digits.y_pool[:600], settings, model_name="camera")
    out = save_result(result, tmp_path_factory.mktemp("camera") / "analysis")
    info = BundleInfo(model_name="camera", model_sha256=model_hash(path.read_bytes()), reason="initial")
    data = pack_bundle(bundle_files(path, out, info))
    return make_manifest(data, CHUNK, private_key=keys[0]), data


@pytest.fixture(scope="module")
def agent(fleet, keys, tmp_path_factory):
    a = AgentProcess(tmp_path_factory.mktemp("camera-agent"), DEVICE, fleet.broker.url, keys[1],
                     upload_samples=True, samples_batch_bytes="16KB", drift=DRIFT)
    a.start()
    yield a
    assert a.stop() == 0, a.log_text()


def post(agent, body: bytes, ctype: str) -> tuple[int, dict]:
    req = urllib.request.Request(agent.url + "/v1/infer", data=body, headers={"Content-Type": ctype})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_deployed_and_serving_uint8_npy_and_json_integers(agent, fleet, camera_bundle, digits):
    manifest, data = camera_bundle
    fleet.announce(manifest, data)
    fleet.deploy(DEVICE, manifest.bundle_id, "cam-d1")
    active = fleet.wait_phase(DEVICE, "cam-d1", {"active", "failed", "refused", "rolled_back"}, 90)
    assert active.phase.value == "active", (active.reason, active.detail, agent.log_text())
    assert active.measured_agreement >= 0.99
    x = digits.x_heldout[:8]
    sess = make_session(agent.served_model())
    assert sess.get_inputs()[0].type == "tensor(uint8)" and sess.get_inputs()[0].shape[1:] == [28, 28, 1]
    expected = sess.run(None, {"pixels": x})[0]
    status, answer = post(agent, npy(x), "application/x-npy")
    assert status == 200, answer
    np.testing.assert_allclose(np.asarray(answer["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)
    status, answer = post(agent, json.dumps({"inputs": x.tolist()}).encode(), "application/json")
    assert status == 200, answer
    np.testing.assert_allclose(np.asarray(answer["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["scaled_float_npy", "float_json", "out_of_range_json", "nchw_layout"])
def test_wrong_dtype_range_or_layout_is_a_400_that_says_what_to_send(agent, digits, case):
    x = digits.x_heldout[:2]
    body, ctype = {
        "scaled_float_npy": (npy((x / 255.0).astype(np.float32)), "application/x-npy"),
        "float_json": (json.dumps({"inputs": (x / 255.0).tolist()}).encode(), "application/json"),
        "out_of_range_json": (json.dumps({"inputs": (x.astype(np.int64) + 200).tolist()}).encode(), "application/json"),
        "nchw_layout": (npy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), "application/x-npy"),
    }[case]
    status, answer = post(agent, body, ctype)
    assert status == 400, answer
    want = {"scaled_float_npy": ("float32", "uint8"), "float_json": ("float64", "uint8"),
            "out_of_range_json": ("0..255",), "nchw_layout": ("[N, 28, 28, 1]",)}[case]
    for needle in want:
        assert needle in answer["error"], answer


def _drift(fleet) -> list:
    return sorted(fleet.messages(DEVICE, "drift"), key=lambda m: m.window_index)


def _align(agent, fleet, digits) -> int:
    """Feed clean batches until a window closes: the next window starts exactly at a batch edge."""
    seen = len(_drift(fleet))
    for b in range(int(DRIFT["window_max_samples"]) // 20 + 1):
        post(agent, npy(digits.x_heldout[500 + 20 * b:520 + 20 * b]), "application/x-npy")
        if wait_for(lambda: len(_drift(fleet)) > seen, 0.5, 0.05):
            return len(_drift(fleet))
    raise AssertionError("no drift window closed")


def test_drift_statistics_from_bytes_and_disputed_samples_uploaded_as_uint8(agent, fleet, digits):
    seen = _align(agent, fleet, digits)
    clean = digits.x_heldout[100:160]
    for i in range(0, 60, 20):
        assert post(agent, npy(clean[i:i + 20]), "application/x-npy")[0] == 200
    assert wait_for(lambda: len(_drift(fleet)) > seen, 20), agent.log_text()
    window = _drift(fleet)[seen]
    # input statistics in float from the bytes: the pixel mean of these digits, on the 0..255 scale
    assert window.input_mean == pytest.approx(float(clean.mean()), rel=1e-6)
    assert window.input_std == pytest.approx(float(clean.std()), rel=1e-6)
    # rotated frames (a camera mounted sideways): the compressed model and its base disagree on some
    seen = len(_drift(fleet))
    rotated = np.ascontiguousarray(np.rot90(digits.x_heldout[200:500], k=1, axes=(1, 2)))
    for i in range(0, len(rotated), 20):
        post(agent, npy(rotated[i:i + 20]), "application/x-npy")
        if any(m.alert and m.disputed for m in _drift(fleet)[seen:]):
            break
    assert wait_for(lambda: any(m.alert and m.disputed for m in _drift(fleet)[seen:]), 20), agent.log_text()
    alert = next(m for m in _drift(fleet)[seen:] if m.alert and m.disputed)
    refs = {d.ref for d in alert.disputed}

    def uploaded() -> list:
        return [s for m in fleet.messages(DEVICE, "samples") if m.window == alert.window_index for s in m.samples]

    assert wait_for(lambda: refs <= {s.ref for s in uploaded()}, 10), agent.log_text()
    for s in uploaded():
        assert s.dtype == "uint8" and s.shape[-3:] == [28, 28, 1]
        values = np.frombuffer(base64.b64decode(s.data_b64), np.uint8).reshape(s.shape)
        assert any(np.array_equal(values.reshape(28, 28, 1), r) for r in rotated)  # the very bytes fed
