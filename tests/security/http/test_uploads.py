"""Uploads are bounded: a body over the cap is refused with 413 while the server's memory stays flat, and
nothing is left on disk; an accepted upload is registered as before. Against a real `toco-fleet serve`."""

from __future__ import annotations

import socket
import threading

from tests.security.http.conftest import UPLOAD_CAP

MB = 1 << 20


def multipart_stream(total: int, boundary: str = "b0undary"):
    """A multipart body of ``total`` bytes of model data, made chunk by chunk (the client never holds it)."""
    yield (f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\nbig\r\n'
           f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.onnx"\r\n'
           "Content-Type: application/octet-stream\r\n\r\n").encode()
    chunk = b"\x00" * MB
    for _ in range(total // MB):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_an_oversized_upload_is_413_with_flat_memory_and_no_temp_file(http_fleet, lenet_upload):
    api = http_fleet.client(http_fleet.tokens["operator"])
    proc = http_fleet.process
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            done.wait(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        # streamed without a Content-Length (chunked): the server has to count, it cannot trust a header
        r = api.post("/api/models", content=multipart_stream(4 * UPLOAD_CAP),
                     headers={"Content-Type": "multipart/form-data; boundary=b0undary"})
    finally:
        done.set()
        t.join()
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    assert peak[0] - base < 100 * MB, f"server RSS grew {(peak[0] - base) / MB:.0f} MB while receiving"
    assert list((http_fleet.data_dir / "uploads").iterdir()) == []
    # a declared Content-Length over the cap is refused before the body is read
    with socket.create_connection(("127.0.0.1", http_fleet.port), timeout=10) as sock:
        sock.sendall((f"POST /api/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      f"Authorization: Bearer {http_fleet.tokens['operator']}\r\n"
                      f"Content-Type: multipart/form-data; boundary=b0undary\r\n"
                      f"Content-Length: {UPLOAD_CAP + 1}\r\n\r\n").encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    # the server still works, and an upload under the cap is registered as before
    api = http_fleet.client(http_fleet.tokens["operator"])
    m = api.post("/api/models", files=lenet_upload, data={"name": "lenet5-small"})
    assert m.status_code == 200 and m.json()["pool_size"] == 120, m.text
    assert list((http_fleet.data_dir / "uploads").iterdir()) == []
    assert http_fleet.proc.poll() is None


def test_any_other_request_body_is_bounded_too(http_fleet):
    api = http_fleet.client(http_fleet.tokens["operator"])
    proc = http_fleet.process
    base = proc.memory_info().rss

    def json_stream():
        yield b'{"analysis_id": "'
        for _ in range(64):
            yield b"a" * MB
        yield b'", "target": {"all": true}}'

    r = api.post("/api/deployments", content=json_stream(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "body over" in r.json()["detail"]
    assert proc.memory_info().rss - base < 50 * MB
    r = api.post("/api/deployments", json={"analysis_id": "a-nope", "target": {"all": True}})
    assert r.status_code == 404  # a normal body still goes through
