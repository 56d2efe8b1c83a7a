"""The inference engine and its HTTP API: real HTTP on a free loopback port, real LeNet-5, real digits."""

from __future__ import annotations

import http.client
import io
import json
import socket
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from agent.inference import InferenceEngine, NotReadyError
from agent.inference_api import ApiSettings, InferenceServer
from agent.inference_input import InputError
from toco_core.preprocessing import Preprocessing

DIGIT_PREP = Preprocessing(size=(28, 28), color="grayscale", scale=1 / 255, mean=(0.0,), std=(1.0,))


class Client:
    """A keep-alive HTTP client for one server (one connection per thread)."""

    def __init__(self, server: InferenceServer) -> None:
        self.host, self.port = server.host, server.server_address[1]
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)

    def request(self, method: str, path: str, body: bytes | None = None, ctype: str | None = None,
                headers: dict | None = None) -> tuple[int, dict]:
        hdrs = {"Content-Type": ctype} if ctype else {}
        self.conn.request(method, path, body=body, headers={**hdrs, **(headers or {})})
        resp = self.conn.getresponse()
        data = resp.read()
        assert resp.getheader("Content-Type") == "application/json"
        if resp.getheader("Connection") == "close":
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        return resp.status, json.loads(data)

    def infer(self, x: np.ndarray) -> tuple[int, dict]:
        return self.request("POST", "/v1/infer", json.dumps({"inputs": x.tolist()}).encode(), "application/json")


@pytest.fixture
def calls():
    return {"infer": [], "feedback": []}


@pytest.fixture
def server(lenet, calls):
    engine = InferenceEngine(max_batch=64, hook=lambda x, out, rid: calls["infer"].append((x, out, rid)),
                             feedback_hook=lambda rid, labels: calls["feedback"].append((rid, labels)))
    engine.load(lenet.base_bytes, "base@1", DIGIT_PREP)
    srv = InferenceServer(engine, ApiSettings(port=0, max_body_bytes=2_000_000))
    srv.start()
    yield srv
    srv.stop()


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def test_outputs_equal_a_bare_session_json_and_npy(server, lenet, digits, calls):
    assert server.url.startswith("http://127.0.0.1:")
    client = Client(server)
    x = digits.x_heldout[:16]
    expected = lenet.base_session.run(None, {"image": x})[0]
    status, body = client.infer(x)
    assert status == 200 and body["model_version"] == "base@1"
    np.testing.assert_array_equal(np.asarray(body["outputs"]["logits"], np.float32), expected)
    status, body2 = client.request("POST", "/v1/infer", npy(x), "application/x-npy")
    assert status == 200
    np.testing.assert_array_equal(np.asarray(body2["outputs"]["logits"], np.float32), expected)
    assert body["request_id"] != body2["request_id"]
    # The drift hook saw exactly what was served, under the id the client got.
    x_seen, out_seen, rid = calls["infer"][-1]
    assert rid == body2["request_id"] and np.array_equal(x_seen, x)
    np.testing.assert_array_equal(out_seen["logits"], expected)
    # Python API gives the same.
    outputs, version, _rid = server.engine.infer(x)
    np.testing.assert_array_equal(outputs["logits"], expected)


def test_npy_bodies_of_a_known_header_are_decoded_like_np_load(server, lenet, digits):
    """The second body with a header is viewed in place: same outputs, and a cut body is still a 400."""
    client = Client(server)
    x = digits.x_heldout[:3]
    expected = lenet.base_session.run(None, {"image": x})[0]
    for body in (npy(x), npy(x), npy(np.asfortranarray(x)), npy(np.asfortranarray(x)), npy(x.astype(">f4"))):
        status, payload = client.request("POST", "/v1/infer", body, "application/x-npy")
        assert status == 200, payload
        np.testing.assert_allclose(np.asarray(payload["outputs"]["logits"], np.float32), expected, rtol=1e-5, atol=1e-5)
    status, payload = client.request("POST", "/v1/infer", npy(x)[:-8], "application/x-npy")
    assert status == 400 and "body is truncated" in payload["error"], payload
    assert client.infer(x)[0] == 200


@pytest.mark.parametrize(("body", "ctype", "status", "message"), [
    (b"{not json", "application/json", 400, "invalid request body"),
    (b'{"input": [1]}', "application/json", 400, "inputs: Field required"),
    (json.dumps({"inputs": np.zeros((2, 28, 28)).tolist()}).encode(), "application/json", 400,
     "shape [2, 28, 28] (3 dims); the model input 'image' is [N, 1, 28, 28]"),
    (json.dumps({"inputs": np.zeros((1, 1, 28, 27)).tolist()}).encode(), "application/json", 400,
     "axis 3 must be 28, got 27"),
    (json.dumps({"inputs": [[[[1, 2], [3]]]]}).encode(), "application/json", 400, "not a numeric array"),
    (json.dumps({"inputs": [[["a"]]]}).encode(), "application/json", 400, "not a numeric array"),
    (json.dumps({"inputs": np.zeros((65, 1, 28, 28)).tolist()}).encode(), "application/json", 400,
     "batch of 65 samples; accepted are 1..64"),
    (npy(np.full((1, 1, 28, 28), np.nan, np.float32)), "application/x-npy", 400, "NaN or infinity"),
    (b"\x93NUMPY garbage", "application/x-npy", 400, "not a valid .npy"),
    (b"1,2,3", "text/csv", 415, "Content-Type 'text/csv' is not accepted"),
    (b"x" * 2_000_001, "application/json", 413, "at most 2000000"),
])
def test_bad_inputs_get_4xx_with_a_reason(server, body, ctype, status, message):
    client = Client(server)
    got, payload = client.request("POST", "/v1/infer", body, ctype)
    assert got == status and message in payload["error"], payload
    # The connection (or its replacement) still serves good requests afterwards.
    assert client.infer(np.zeros((1, 1, 28, 28), np.float32))[0] == 200


def test_routes_methods_feedback_and_stats(server, digits, calls):
    client = Client(server)
    assert client.request("GET", "/v1/health") == (200, {"status": "alive"})
    assert client.request("GET", "/v1/ready") == (200, {"ready": True, "model_version": "base@1"})
    assert client.request("GET", "/v1/nope")[0] == 404
    status, body = client.request("GET", "/v1/infer")
    assert status == 405 and "GET is not allowed" in body["error"]
    assert client.request("DELETE", "/v1/infer")[0] == 405
    status, body = client.request("POST", "/v1/unknown", b'{"a": 1}', "application/json")
    assert status == 404 and "no route" in body["error"]

    _, resp = client.infer(digits.x_heldout[:3])
    rid = resp["request_id"]
    def fb(payload: dict) -> tuple[int, dict]:
        return client.request("POST", "/v1/feedback", json.dumps(payload).encode(), "application/json")

    assert fb({"request_id": rid, "label": [1, 2, 3]}) == (200, {"accepted": 3, "request_id": rid})
    assert calls["feedback"] == [(rid, [1, 2, 3])]
    status, body = fb({"request_id": rid, "label": 4})
    assert status == 400 and "had 3 samples, got 1 labels" in body["error"]
    status, body = fb({"request_id": "nope", "label": 4})
    assert status == 404 and "unknown request_id" in body["error"]
    status, body = fb({"request_id": rid, "label": "seven"})
    assert status == 400 and "label" in body["error"]

    status, stats = client.request("GET", "/v1/stats")
    assert status == 200 and stats["requests"] == 1 and stats["samples"] == 3 and stats["swaps"] == 1
    assert stats["errors"] >= 4 and sum(stats["histogram_ms"]["counts"]) == 1 and stats["p50_ms"] > 0


def test_not_ready_until_a_model_is_loaded(lenet):
    engine = InferenceEngine()
    srv = InferenceServer(engine, ApiSettings(port=0))
    srv.start()
    try:
        client = Client(srv)
        assert client.request("GET", "/v1/health")[0] == 200
        status, body = client.request("GET", "/v1/ready")
        assert status == 503 and body["ready"] is False
        status, body = client.infer(np.zeros((1, 1, 28, 28), np.float32))
        assert status == 503 and "no model is loaded" in body["error"]
        with pytest.raises(NotReadyError):
            engine.infer(np.zeros((1, 1, 28, 28), np.float32))
        engine.load(lenet.base_bytes, "v1")  # no preprocessing declared
        assert client.request("GET", "/v1/ready")[0] == 200
        status, body = client.request("POST", "/v1/infer/image", b"\x89PNG", "image/png")
        assert status == 409 and "declares no image preprocessing" in body["error"]
    finally:
        srv.stop()


def test_hot_swap_while_requests_run(server, lenet, digits):
    x = digits.x_heldout[:4]
    expected = {"base@1": lenet.base_session.run(None, {"image": x})[0],
                "comp@2": lenet.compressed_session.run(None, {"image": x})[0]}
    assert not np.array_equal(expected["base@1"], expected["comp@2"])
    stop = threading.Event()

    def hammer() -> list[str]:
        client, seen = Client(server), []
        while not stop.is_set():
            status, body = client.infer(x)
            assert status == 200, body
            # Each answer comes entirely from the model whose version it reports.
            np.testing.assert_array_equal(np.asarray(body["outputs"]["logits"], np.float32),
                                          expected[body["model_version"]])
            seen.append(body["model_version"])
        return seen

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(hammer) for _ in range(4)]
        for i in range(10):
            model, version = (lenet.compressed_bytes, "comp@2") if i % 2 == 0 else (lenet.base_bytes, "base@1")
            server.engine.load(model, version, DIGIT_PREP)
            threading.Event().wait(0.05)
        stop.set()
        seen = [v for f in futures for v in f.result()]
    assert {"base@1", "comp@2"} <= set(seen) and len(seen) > 40
    assert server.engine.stats.snapshot()["swaps"] == 11


def test_image_endpoint_with_png_and_jpeg(server, lenet, digits):
    client = Client(server)
    pixels = (digits.x_heldout[:1, 0, 0:28, 0:28] * 255).round().astype(np.uint8)[0]
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    status, body = client.request("POST", "/v1/infer/image", buf.getvalue(), "image/png")
    assert status == 200, body
    expected = lenet.base_session.run(None, {"image": (pixels / 255).astype(np.float32)[None, None]})[0]
    np.testing.assert_allclose(np.asarray(body["outputs"]["logits"]), expected, rtol=1e-5, atol=1e-5)
    # An RGB JPEG at twice the size is converted to grayscale and shrunk; same class.
    big = Image.fromarray(np.kron(pixels, np.ones((2, 2), np.uint8))).convert("RGB")
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=95)
    status, body = client.request("POST", "/v1/infer/image", buf.getvalue(), "image/jpeg")
    assert status == 200 and np.argmax(body["outputs"]["logits"][0]) == expected.argmax()
    status, body = client.request("POST", "/v1/infer/image", b"GIF89a not an image", "image/png")
    assert status == 400 and "not a PNG or JPEG" in body["error"]
    status, body = client.request("POST", "/v1/infer/image", b"x", "application/json")
    assert status == 415


def test_engine_python_api_refuses_bad_inputs_with_typed_errors(lenet):
    engine = InferenceEngine(max_batch=8)
    engine.load(lenet.base_bytes, "v")
    with pytest.raises(InputError, match="axis 1 must be 1, got 3"):
        engine.infer(np.zeros((1, 3, 28, 28), np.float32))
    with pytest.raises(InputError, match="batch of 0"):
        engine.infer(np.zeros((0, 1, 28, 28), np.float32))
    assert engine.stats.snapshot()["errors"] == 2


def test_a_client_hanging_up_mid_request_is_no_traceback_and_the_server_keeps_serving(server, digits, capfd):
    host, port = server.server_address[:2]
    for _ in range(3):
        sock = socket.create_connection((host, port), timeout=5)
        sock.sendall(b"POST /v1/infer HTTP/1.1\r\nContent-Length: 999999\r\n")  # headers never finish
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        sock.close()
    time.sleep(0.3)
    status, body = Client(server).infer(digits.x_heldout[:1])
    assert status == 200 and len(body["outputs"]) == 1
    assert "Traceback" not in capfd.readouterr().err


def test_a_token_guards_every_route_but_health(lenet, digits, tmp_path, caplog):
    from agent.config import read_api_token
    from toco_core.errors import ConfigError

    (tmp_path / "token").write_text("s3cret-token\n")
    token = read_api_token(tmp_path / "token")
    assert token == "s3cret-token" and read_api_token(None) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        read_api_token(tmp_path / "empty")
    with pytest.raises(ConfigError, match="cannot read"):
        read_api_token(tmp_path / "missing")
    engine = InferenceEngine()
    engine.load(lenet.base_bytes, "v1", DIGIT_PREP)
    srv = InferenceServer(engine, ApiSettings(port=0, token=token))
    srv.start()
    try:
        client = Client(srv)
        assert client.request("GET", "/v1/health")[0] == 200  # liveness probes carry no secret
        x = json.dumps({"inputs": digits.x_heldout[:1].tolist()}).encode()
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"}):
            status, body = client.request("POST", "/v1/infer", x, "application/json", headers)
            assert status == 401 and "Authorization: Bearer" in body["error"]
            assert client.request("GET", "/v1/stats", headers=headers)[0] == 401
        status, body = client.request("POST", "/v1/infer", x, "application/json",
                                      {"Authorization": "Bearer s3cret-token"})
        assert status == 200 and len(body["outputs"]) == 1
    finally:
        srv.stop()
    # off loopback without a token the operator is told, once, at start
    with caplog.at_level("WARNING", logger="agent.inference_api"):
        open_srv = InferenceServer(InferenceEngine(), ApiSettings(host="0.0.0.0", port=0))
        open_srv.server_close()
    assert "without a token" in caplog.text
