"""The agent's inference API and drift reporter serving a model with two inputs (uint8 camera bytes
and float gauge readings): real HTTP on a loopback port, real onnxruntime, the real DriftReporter
with the base model as shadow.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time

import numpy as np
import pytest

from agent.drift_reporter import DriftReporter
from agent.inference import InferenceEngine
from agent.inference_api import ApiSettings, InferenceServer
from tests.agent_parts.conftest import quant_noise
from toco_core.demo.layouts import two_input_digits, two_input_model
from toco_core.drift import DriftSettings, build_reference
from toco_core.messages import DriftMessage, SamplesMessage, UploadSamplesCommand
from toco_core.model_inputs import flat_values
from toco_core.onnx_model import load_model, model_bytes
from toco_core.runtime import make_session, run_model

SETTINGS = DriftSettings(window_max_samples=60, window_min_samples=20, window_seconds=600, shadow_fraction=1.0,
                         consecutive_windows=1, max_disputed=8, min_shadow_samples=10)


@pytest.fixture(scope="module")
def two():
    base = load_model(two_input_model())
    compressed = quant_noise(base, 6)
    return base, compressed, two_input_digits()


@pytest.fixture
def served(two):
    base, compressed, digits = two
    sent: list = []
    held = digits.x_heldout[:300]
    reference = build_reference(held, run_model(compressed, held), 0.99, SETTINGS)
    reporter = DriftReporter(sent.append, "box-2in", SETTINGS, seed=0, gather_s=0.01)
    reporter.attach("b" * 64, reference, model_bytes(base))
    engine = InferenceEngine(max_batch=64, hook=reporter.hook)
    engine.load(model_bytes(compressed), "two@1")
    server = InferenceServer(engine, ApiSettings(port=0))
    server.start()
    yield server, sent
    server.stop()
    reporter.close()


def post(server, body: bytes, ctype: str) -> tuple[int, dict]:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": ctype})
    resp = conn.getresponse()
    answer = resp.status, json.loads(resp.read())
    conn.close()
    return answer


def npz(compressed: bool = False, **arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)  # type: ignore[arg-type]  # numpy: **kwds may name allow_pickle
    return buf.getvalue()


def test_both_inputs_by_npz_and_json_give_onnxruntime_outputs(served, two):
    server, _ = served
    _, compressed, digits = two
    x = digits.x_heldout[:8]
    expected = make_session(model_bytes(compressed)).run(None, x.arrays)[0]
    status, answer = post(server, npz(**x.arrays), "application/x-npz")
    assert status == 200, answer
    np.testing.assert_allclose(np.asarray(answer["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)
    body = json.dumps({"inputs": {k: v.tolist() for k, v in x.arrays.items()}}).encode()
    status, answer = post(server, body, "application/json")
    assert status == 200, answer
    np.testing.assert_allclose(np.asarray(answer["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["one_array", "lacking_gauge", "float_pixels", "uneven", "compressed_npz"])
def test_requests_that_do_not_fit_both_inputs_are_400_with_a_reason(served, two, case):
    server, _ = served
    x = two[2].x_heldout[:4].arrays
    body, ctype, needle = {
        "one_array": (json.dumps({"inputs": x["pixels"].tolist()}).encode(), "application/json", "takes 2 inputs"),
        "lacking_gauge": (npz(pixels=x["pixels"]), "application/x-npz", "['pixels'] sent"),
        "float_pixels": (npz(pixels=x["pixels"] / 255.0, gauge=x["gauge"]), "application/x-npz", "input 'pixels'"),
        "uneven": (npz(pixels=x["pixels"], gauge=x["gauge"][:3]), "application/x-npz", "differ in their batch"),
        "compressed_npz": (npz(True, **x), "application/x-npz", "compressed"),
    }[case]
    status, answer = post(server, body, ctype)
    assert status == 400, answer
    assert needle in answer["error"], answer


def test_drift_windows_read_every_input_and_shadow_the_base_on_both(served, two):
    server, sent = served
    x = two[2].x_heldout[400:460]
    for i in range(0, 60, 20):
        assert post(server, npz(**x[i:i + 20].arrays), "application/x-npz")[0] == 200
    deadline = time.monotonic() + 10
    while not any(isinstance(m, DriftMessage) for m in sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    window = next(m for m in sent if isinstance(m, DriftMessage))
    assert window.n_samples == 60 and window.n_shadowed > 0
    flat = flat_values(x)  # pixels (0..255) and gauge readings, one row per sample
    assert window.input_mean == pytest.approx(float(flat.mean()), rel=1e-9)
    assert window.input_std == pytest.approx(float(flat.std()), rel=1e-9)


def test_disputed_samples_are_uploaded_one_array_per_input_in_its_own_dtype(served, two):
    server, sent = served
    x = two[2].x_heldout[500:560]
    for i in range(0, 60, 20):
        assert post(server, npz(**x[i:i + 20].arrays), "application/x-npz")[0] == 200
    deadline = time.monotonic() + 10
    while not any(isinstance(m, DriftMessage) for m in sent) and time.monotonic() < deadline:
        time.sleep(0.05)
    window = next(m for m in sent if isinstance(m, DriftMessage))
    assert window.disputed
    reporter = server.engine.hook.__self__
    assert reporter.upload(UploadSamplesCommand(cmd_id="u1", window=window.window_index, max_bytes=1 << 20)) > 0
    samples = [s for m in sent if isinstance(m, SamplesMessage) for s in m.samples]
    by_ref = {s.ref: s for s in samples}
    for d in window.disputed:
        pixels, gauge = by_ref[f"{d.ref}/pixels"], by_ref[f"{d.ref}/gauge"]
        assert (pixels.dtype, pixels.shape, gauge.dtype, gauge.shape) == ("uint8", [28, 28, 1], "float32", [4])
        values = np.frombuffer(base64.b64decode(pixels.data_b64), np.uint8).reshape(28, 28, 1)
        assert any(np.array_equal(values, p) for p in x.arrays["pixels"])  # the very bytes that were served
