"""The local inference HTTP API (stdlib ``http.server``), loopback by default.

Routes (JSON responses; every error is ``{"error": "..."}`` saying what is wrong)::

    POST /v1/infer         {"inputs": nested list} or an .npy body (Content-Type application/x-npy);
                           several model inputs: {"inputs": {name: nested list}} or an .npz body
                           (application/x-npz, numpy.savez with one array per input name)
    POST /v1/infer/image   PNG/JPEG body, preprocessed as the serving model's bundle declares
    POST /v1/feedback      {"request_id": "...", "label": 3 | [3, 1, ...]}
    GET  /v1/health        liveness: the process answers
    GET  /v1/ready         readiness: a model is loaded (503 otherwise)
    GET  /v1/stats         counters and latency histogram

Inference answers ``{"outputs": {name: nested list}, "model_version": ..., "request_id": ...}``.
The handler only translates HTTP to ``InferenceEngine`` calls and errors to status codes.
"""

from __future__ import annotations

import hmac
import io
import ipaddress
import json
import logging
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from agent.inference import InferenceEngine, NotReadyError, UnknownRequestError
from agent.inference_input import InputError, load_npy, load_npz
from toco_core.errors import TocoError
from toco_core.preprocessing import preprocess

log = logging.getLogger(__name__)

NPY_TYPE = "application/x-npy"
NPZ_TYPE = "application/x-npz"
_IMAGE_TYPES = ("image/png", "image/jpeg", "image/jpg", "application/octet-stream")


class ApiSettings(BaseModel):
    """Where the API listens and how much it accepts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="bind address; loopback unless the line needs it")
    port: int = Field(8080, ge=0, le=65535, description="TCP port; 0 picks a free one")
    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024, description="larger bodies get 413")
    max_image_pixels: int = Field(25_000_000, ge=1, description="larger images get 413 before decoding")
    token: str | None = Field(None, repr=False, description="when set, every route but /v1/health needs "
                                                             "'Authorization: Bearer <token>'")


class InferRequest(BaseModel):
    """JSON body of /v1/infer."""

    model_config = ConfigDict(extra="forbid")

    inputs: list[Any] | dict[str, list[Any]] = Field(
        description="batch of samples, batch axis first; one such batch per input name for several inputs")


class FeedbackRequest(BaseModel):
    """JSON body of /v1/feedback."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=200)
    label: StrictInt | list[StrictInt]


class ApiError(Exception):
    """An HTTP error answer: status code and a message for people."""

    def __init__(self, status: HTTPStatus, message: str, close: bool = False) -> None:
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


_TOCO_STATUS = {InputError: HTTPStatus.BAD_REQUEST, NotReadyError: HTTPStatus.SERVICE_UNAVAILABLE,
                UnknownRequestError: HTTPStatus.NOT_FOUND}


def _validation_message(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:3]]
    return "invalid request body: " + "; ".join(parts)


def decode_image(body: bytes, grayscale: bool, max_pixels: int) -> np.ndarray:
    """PNG/JPEG bytes -> ``[H, W]`` (grayscale) or ``[H, W, 3]`` uint8 via Pillow.

    Raises ApiError 400 for bytes Pillow cannot decode, 413 for too many pixels.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415 - only the image route needs Pillow

    try:
        with Image.open(io.BytesIO(body), formats=["PNG", "JPEG"]) as img:
            if img.width * img.height > max_pixels:
                raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"image is {img.width}x{img.height} pixels; at most {max_pixels} are accepted")
            return np.asarray(img.convert("L" if grayscale else "RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not a PNG or JPEG image Pillow can decode: {exc}") from exc


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the line's client saves a TCP handshake per request
    disable_nagle_algorithm = True  # a reply larger than the buffer goes out in parts: no Nagle + delayed-ACK stall
    wbufsize = 64 * 1024  # headers and body leave in one send() at the end of the request, one client wake-up
    timeout = 30.0  # a client that stalls mid-body loses its connection instead of holding a thread
    server: InferenceServer
    _consumed = False

    # ------------------------------------------------------------- plumbing
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s - %s", self.address_string(), format % args)

    def _send_json(self, status: HTTPStatus, payload: dict[str, Any], close: bool = False) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not supported; send Content-Length",
                           close=True)
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "missing or invalid Content-Length header", close=True)
        size, limit = int(length), self.server.settings.max_body_bytes
        if size > limit:
            # Draining a moderately large body lets the client read the 413 instead of a reset.
            drained = size <= 4 * limit
            if drained:
                for start in range(0, size, 1 << 20):
                    self.rfile.read(min(1 << 20, size - start))
                self._consumed = True
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"body of {size} bytes; at most {limit} are accepted", close=not drained)
        self._consumed = True
        return self.rfile.read(size)

    def _content_type(self) -> str:
        return (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()

    def _dispatch(self, routes: dict[str, Any]) -> None:
        path = self.path.split("?")[0]
        self._consumed = False
        try:
            handler = routes.get(path)
            if handler is not None and path != "/v1/health":
                self._check_token()
            if handler is None:
                other = _GET_ROUTES if routes is _POST_ROUTES else _POST_ROUTES
                if path in other:
                    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not allowed on {path}")
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {path}; see /v1/health, /v1/ready, /v1/infer")
            status, payload = handler(self)
            self._send_json(status, payload)
        except ApiError as exc:
            self._fail(exc.status, exc.message, exc.close)
        except TocoError as exc:
            status = next((s for t, s in _TOCO_STATUS.items() if isinstance(exc, t)), HTTPStatus.INTERNAL_SERVER_ERROR)
            self._fail(status, str(exc), count=False)  # the engine counted its own refusals
        except Exception as exc:  # a bug or a runtime failure must answer, not drop the connection
            log.exception("request %s %s failed", self.command, path)
            self._fail(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {exc}")

    def _check_token(self) -> None:
        """Raises ApiError 401 when the API has a token and the request does not carry it."""
        token = self.server.settings.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        # constant time: the comparison must not tell a prober how much of a guess was right
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise ApiError(HTTPStatus.UNAUTHORIZED, "this inference API needs 'Authorization: Bearer <token>' "
                                                    "(the agent's api_token_file)")

    def _fail(self, status: HTTPStatus, message: str, close: bool = False, count: bool = True) -> None:
        if count:
            self.server.engine.stats.count_error()
        # An unread body would be parsed as the next request on this keep-alive connection.
        unread = not self._consumed and self.headers.get("Content-Length", "0") not in ("", "0")
        self._send_json(status, {"error": message}, close=close or unread)

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch(_GET_ROUTES)

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch(_POST_ROUTES)

    def _not_allowed(self) -> None:
        self._send_json(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{self.command} is not supported; use GET or POST"},
                        close=True)

    do_PUT = do_DELETE = do_PATCH = _not_allowed  # noqa: N815

    # ------------------------------------------------------------- routes
    def health(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """GET /v1/health: the process answers."""
        return HTTPStatus.OK, {"status": "alive"}

    def ready(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """GET /v1/ready: 200 with the model version, 503 before a model is loaded."""
        engine = self.server.engine
        if not engine.ready:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False, "error": "no model is loaded yet"}
        return HTTPStatus.OK, {"ready": True, "model_version": engine.model_version}

    def stats(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """GET /v1/stats: counters and the latency histogram."""
        return HTTPStatus.OK, self.server.engine.stats.snapshot()

    def infer(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """POST /v1/infer: JSON {"inputs": ...}, an .npy body, or an .npz body (several inputs)."""
        body, ctype = self._body(), self._content_type()
        x: np.ndarray | list[Any] | dict[str, Any]
        if ctype == NPY_TYPE:
            try:
                x = load_npy(body)
            except ValueError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not a valid .npy array: {exc}") from exc
        elif ctype == NPZ_TYPE:
            try:
                x = load_npz(body)
            except ValueError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, f"body is not a valid .npz of arrays: {exc}") from exc
        elif ctype in ("application/json", ""):
            try:
                x = InferRequest.model_validate_json(body).inputs
            except ValidationError as exc:
                raise ApiError(HTTPStatus.BAD_REQUEST, _validation_message(exc)) from exc
        else:
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {ctype!r} is not accepted; use application/json, {NPY_TYPE} or {NPZ_TYPE}")
        return self._answer(x)

    def infer_image(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """POST /v1/infer/image: a PNG/JPEG, preprocessed as the serving model declares."""
        body, ctype = self._body(), self._content_type()
        if ctype not in _IMAGE_TYPES:
            raise ApiError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {ctype!r} is not accepted; send image/png or image/jpeg")
        if not self.server.engine.ready:
            raise NotReadyError("no model is loaded yet", "wait for a deployment or check /v1/ready")
        prep = self.server.engine.preprocessing
        if prep is None:
            raise ApiError(HTTPStatus.CONFLICT, "the serving model declares no image preprocessing; "
                           "post arrays to /v1/infer instead")
        image = decode_image(body, prep.color == "grayscale", self.server.settings.max_image_pixels)
        return self._answer(preprocess(image, prep)[None])

    def feedback(self) -> tuple[HTTPStatus, dict[str, Any]]:
        """POST /v1/feedback: ground-truth labels for a recent request."""
        try:
            req = FeedbackRequest.model_validate_json(self._body())
        except ValidationError as exc:
            raise ApiError(HTTPStatus.BAD_REQUEST, _validation_message(exc)) from exc
        labels = self.server.engine.feedback(req.request_id, req.label)
        return HTTPStatus.OK, {"accepted": len(labels), "request_id": req.request_id}

    def _answer(self, x: Any) -> tuple[HTTPStatus, dict[str, Any]]:
        result = self.server.engine.infer(x)
        return HTTPStatus.OK, {"outputs": jsonable_outputs(result.outputs),
                               "model_version": result.model_version, "request_id": result.request_id}


def jsonable_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Every model output as JSON values: arrays as nested lists (strings stay strings); a ZipMap
    output, which onnxruntime returns as a list of {class: probability} dicts, as it is."""
    return {k: v.tolist() if hasattr(v, "tolist") else v for k, v in outputs.items()}


_GET_ROUTES = {"/v1/health": _Handler.health, "/v1/ready": _Handler.ready, "/v1/stats": _Handler.stats}
_POST_ROUTES = {"/v1/infer": _Handler.infer, "/v1/infer/image": _Handler.infer_image,
                "/v1/feedback": _Handler.feedback}


class InferenceServer(ThreadingHTTPServer):
    """The HTTP server bound to an engine; one thread per connection."""

    daemon_threads = True

    def __init__(self, engine: InferenceEngine, settings: ApiSettings | None = None) -> None:
        self.engine, self.settings = engine, settings or ApiSettings()
        super().__init__((self.settings.host, self.settings.port), _Handler)
        if self.settings.token is None and not ipaddress.ip_address(self.host).is_loopback:
            log.warning("the inference API listens on %s without a token: anyone on that network may call it; "
                        "set api_token_file", self.server_address[0])

    @property
    def host(self) -> str:
        """The address it listens on (an IPv4 server's is always a str)."""
        host = self.server_address[0]
        return host if isinstance(host, str) else bytes(host).decode()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        return f"http://{self.host}:{self.server_address[1]}"

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; returns it. Stop with ``stop()``."""
        thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                                  name="inference-api", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up mid-request is routine (debug); anything else is logged once, not printed."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            log.debug("client went away", extra={"fields": {"client": client_address[0], "error": str(exc)}})
        else:
            log.exception("inference API request failed", extra={"fields": {"client": client_address[0]}})
