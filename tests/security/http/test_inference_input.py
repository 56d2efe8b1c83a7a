"""The edge inference API answers a forged .npy header or an unsupported dtype with a one-line 400 (never a
MemoryError or a silent cast), and keeps serving. The agent's real HTTP server on a socket, the demo LeNet."""

from __future__ import annotations

import http.client
import io
import json
from pathlib import Path

import numpy as np
import pytest

from agent.inference import InferenceEngine
from agent.inference_api import ApiSettings, InferenceServer


@pytest.fixture(scope="module")
def api():
    from toco_core.demo.train import demo_model

    engine = InferenceEngine(max_batch=64)
    engine.load(Path(demo_model("lenet5")).read_bytes(), "base@1")
    srv = InferenceServer(engine, ApiSettings(port=0, max_body_bytes=1_000_000))
    srv.start()
    yield srv
    srv.stop()


def post(srv: InferenceServer, body: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(srv.host, srv.server_address[1], timeout=10)
    try:
        conn.request("POST", "/v1/infer", body=body, headers={"Content-Type": "application/x-npy"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def forged(shape: tuple, dtype: str = "<f4", data: bytes = b"\x00" * 16) -> bytes:
    """An .npy header claiming ``shape`` of ``dtype``, followed by only ``data``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("body, reason", [
    (forged((1_000_000, 1_000_000, 28, 28)), "declares shape [1000000, 1000000, 28, 28]"),  # 3 PB claimed
    (forged((1, 1, 28, 28)), "3136 bytes"),                                                   # plain truncation
    (forged((1, 1, 28, 28), "<c8", b"\x00" * 6272), "dtype complex64 is not supported"),
    (npy(np.zeros((1, 1, 28, 28), np.complex128)), "dtype complex128 is not supported"),
    (npy(np.array([{"a": 1}], dtype=object)), "dtype object is not supported"),               # never unpickled
    (npy(np.array(["28x28"])), "is not supported"),
    (npy(np.zeros(2, dtype=[("x", "<f4"), ("y", "<f4")])), "is not supported"),
    (forged((1, 1, 28, 28), "<f4", b"")[:20], "bad .npy header"),
])
def test_a_bad_npy_body_is_a_one_line_400(api, body, reason):
    status, payload = post(api, body)
    assert status == 400 and reason in payload["error"], payload
    assert "\n" not in payload["error"]
    ok, out = post(api, npy(np.zeros((1, 1, 28, 28), np.float32)))  # and it keeps serving
    assert ok == 200 and len(next(iter(out["outputs"].values()))[0]) == 10
