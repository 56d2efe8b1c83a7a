"""Receiving a multipart upload with a byte cap: streamed to files on disk, never whole in memory.

``receive_form`` reads the request body chunk by chunk (as the client sends it), feeds
python-multipart's streaming parser, and appends each file part to its own file in a fresh
folder under ``{data_dir}/uploads``. The moment the body passes the cap (or the declared
Content-Length already does) it stops reading, deletes the folder and raises UploadTooLargeError
(the API answers 413). Server memory is one chunk plus the small text fields, whatever is sent.

``BodyLimitMiddleware`` bounds every other request body (JSON requests are read whole by the
framework) the same way: a declared or counted size over the limit is a 413.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import Request

from toco_core.errors import TocoError
from toco_core.units import format_size

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

_MAX_FIELD_BYTES = 64 * 1024  # text fields (name, preprocessing JSON) are small


class UploadError(TocoError):
    """Raised when an upload is not a usable multipart form (HTTP 400)."""


class UploadTooLargeError(UploadError):
    """Raised when an upload's body is over the server's cap (HTTP 413)."""


class MissingPartError(UploadError):
    """Raised when a required form part is missing (HTTP 422, as for any malformed request)."""


@dataclass
class ReceivedForm:
    """An accepted upload: text ``fields``, and ``files`` (form name -> path on disk) in ``folder``.

    Use it as a context manager, or call ``discard()``: the folder is deleted either way.
    """

    folder: Path
    fields: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    def discard(self) -> None:
        """Delete the received files. Raises nothing."""
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> ReceivedForm:
        return self

    def __exit__(self, *exc) -> None:
        self.discard()


class _Parts:
    """python-multipart callbacks: route each part's bytes to a file or a text field."""

    def __init__(self, form: ReceivedForm, file_names: set[str], field_names: set[str]) -> None:
        self.form, self.file_names, self.field_names = form, file_names, field_names
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._name: str | None = None
        self._sink: BinaryIO | None = None
        self._text: bytearray | None = None

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self._begin, "on_header_field": self._hfield, "on_header_value": self._hvalue,
                "on_header_end": self._hend, "on_headers_finished": self._headers_done,
                "on_part_data": self._data, "on_part_end": self._end}

    def _begin(self) -> None:
        self._disposition, self._name, self._sink, self._text = b"", None, None, None

    def _hfield(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _hvalue(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _hend(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_done(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name in self.form.files or name in self.form.fields:
            raise UploadError(f"the form field {name!r} is sent twice", "send each field once")
        self._name = name
        if name in self.file_names:
            path = self.form.folder / name
            self._sink = open(path, "wb")  # noqa: SIM115 - closed in _end or by the caller's cleanup
            self.form.files[name] = path
        elif name in self.field_names:
            self._text = bytearray()
        # any other part is read (it counts against the cap) and dropped

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._sink is not None:
            self._sink.write(data[start:end])
        elif self._text is not None:
            self._text += data[start:end]
            if len(self._text) > _MAX_FIELD_BYTES:
                raise UploadError(f"the form field {self._name!r} is over {format_size(_MAX_FIELD_BYTES)}",
                                  "send it as a file part")

    def _end(self) -> None:
        if self._sink is not None:
            self._sink.close()
        elif self._text is not None and self._name is not None:
            self.form.fields[self._name] = self._text.decode("utf-8", "replace")
        self._sink, self._text = None, None

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()


async def receive_form(request: Request, *, folder: Path, max_bytes: int, files: set[str],
                       fields: set[str], required: set[str]) -> ReceivedForm:
    """Stream a multipart/form-data body into a new folder under ``folder``.

    ``files``: the part names saved as files; ``fields``: the part names kept as text; other parts
    are dropped; ``required``: the names that must be present. Returns a ReceivedForm (the caller
    discards it). Raises UploadTooLargeError when the body is over ``max_bytes`` (the rest of it is
    not read), MissingPartError for a missing required part, UploadError for a body that is not
    multipart; whenever it raises, nothing is left on disk.
    """
    ctype = request.headers.get("content-type", "")
    kind, params = parse_options_header(ctype)
    if kind != b"multipart/form-data" or b"boundary" not in params:
        raise UploadError(f"expected a multipart/form-data body, got {ctype or 'no Content-Type'!r}",
                          "send the model and pool as form file parts")
    too_large = UploadTooLargeError(f"upload over the server's limit of {format_size(max_bytes)}",
                                    "the limit is the max_upload_bytes setting (TOCO_FLEET_MAX_UPLOAD_BYTES)")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large  # refused before a byte of the body is read
    folder.mkdir(parents=True, exist_ok=True)
    form = ReceivedForm(Path(tempfile.mkdtemp(prefix="upload-", dir=folder)))
    parts = _Parts(form, files, fields)
    try:
        parser = MultipartParser(params[b"boundary"], parts.callbacks())
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise too_large
            parser.write(chunk)
        parser.finalize()
        missing = sorted(required - form.files.keys() - form.fields.keys())
        if missing:
            raise MissingPartError(f"invalid request: the form has no {', '.join(missing)} part",
                                   f"send the form parts {', '.join(sorted(required))}")
    except MultipartParseError as exc:  # a malformed body (bad boundary, broken headers): the client's fault
        parts.close()
        form.discard()
        raise UploadError(f"the upload is not a valid multipart body: {exc}",
                          "send a multipart/form-data form") from None
    except BaseException:  # refused, disconnected or cancelled: nothing may stay on disk
        parts.close()
        form.discard()
        raise
    return form


class BodyLimitMiddleware:
    """ASGI middleware: a request body over ``max_bytes`` is refused with 413, except on ``streamed`` routes
    (``{(method, path)}``), which read their body under their own cap (receive_form)."""

    def __init__(self, app, max_bytes: int, streamed: frozenset[tuple[str, str]]) -> None:
        self.app, self.max_bytes, self.streamed = app, max_bytes, streamed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.streamed:
            await self.app(scope, receive, send)
            return
        detail = f"request body over {format_size(self.max_bytes)}; only model uploads may be larger"
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await JSONResponse({"detail": detail}, status_code=413)(scope, receive, send)
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                # an HTTPException passes through the framework's body parsing and is answered as 413
                raise HTTPException(413, detail)
            return message

        await self.app(scope, counted, send)
