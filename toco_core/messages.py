"""Every payload of the fleet's MQTT protocol as a strict pydantic model (docs/protocol.md).

All JSON payloads carry ``schema_version``; every agent message carries the sender's
``device_id`` and a per-connection sequence number ``seq`` (0 = the birth on that connection),
and the state message a ``birth`` counter that grows with every connection (the Sparkplug B
bdSeq habit), so the server can see gaps, replays and stale births. Chunks are the one binary
payload: a one-line JSON header, ``\\n``, then the raw bytes (no base64 on the hot path).

``parse_message(kind, payload)`` is the single entry point for bytes from the wire; it raises
:class:`MessageError` with a one-line account of what was wrong.
"""

from __future__ import annotations

import json
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from toco_core.errors import TocoError

SCHEMA_VERSION = 1
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no '/', '+', '#': safe inside a topic level
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 * 1024, 256 * 1024
MAX_JSON_PAYLOAD = 4 * 1024 * 1024  # larger JSON is refused before parsing (memory on small boxes)
MAX_CHUNKS_PER_REQUEST = 64
MAX_RANGE_LENGTH = 256 * 1024  # one part reply frame at most; as large as a chunk
MAX_RANGES_PER_REQUEST = 64
PART_NAME_PATTERN = r"^[a-z]+(/[a-z0-9]+)?$"  # head, codes/top, codes/3, prune/0, calib/heldout, base

DeviceId = Annotated[str, Field(pattern=ID_PATTERN)]
BundleId = Annotated[str, Field(pattern=SHA256_PATTERN, description="sha256 hex of the packed bundle")]


class MessageError(TocoError):
    """Raised when a payload from the wire is not valid JSON or does not match its schema."""


class Message(BaseModel):
    """Base of every payload: strict fields and a schema version this code understands."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    schema_version: int = Field(SCHEMA_VERSION, ge=1)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION:
            raise ValueError(f"schema version {v} is newer than this software ({SCHEMA_VERSION}); update it")
        return v


class AgentMessage(Message):
    """Sent by an agent: who, when (unix seconds) and the per-connection sequence number."""

    device_id: DeviceId
    seq: int = Field(0, ge=0, description="stamped by the MQTT link when the message goes out")
    sent_at: float = Field(default_factory=time.time)


class FailureReason(StrEnum):
    """Why a deployment step failed; compared as codes, never as English text."""

    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad_signature"
    BAD_MANIFEST = "bad_manifest"
    CORRUPT_CHUNK = "corrupt_chunk"
    BUNDLE_HASH_MISMATCH = "bundle_hash_mismatch"
    TRANSFER_STALLED = "transfer_stalled"
    NO_DISK = "no_disk"
    NO_MEMORY = "no_memory"
    INFEASIBLE = "infeasible"
    SELF_TEST_FAILED = "self_test_failed"
    LOAD_FAILED = "load_failed"
    RUNTIME_ERROR = "runtime_error"
    BAD_COMMAND = "bad_command"
    INTERNAL = "internal"


class Phase(StrEnum):
    """Deployment progress on one device; the last four are terminal."""

    RECEIVED = "received"
    DOWNLOADING = "downloading"
    VERIFIED = "verified"
    RECOMPRESSING = "recompressing"
    SELF_TEST = "self_test"
    ACTIVATING = "activating"
    ACTIVE = "active"
    FAILED = "failed"
    REFUSED = "refused"
    ROLLED_BACK = "rolled_back"


FAILING_PHASES = {Phase.FAILED, Phase.REFUSED, Phase.ROLLED_BACK}


class ActiveModel(Message):
    """What a device serves right now."""

    bundle_id: BundleId | None = None
    model_name: str | None = None
    slot: Literal["a", "b"] | None = None
    plan: dict[str, Any] | None = Field(None, description="plan summary: formats, size vs base, predicted fidelity")


class StateMessage(AgentMessage):
    """Retained device state: the birth when online, the last will when offline."""

    state: Literal["online", "offline"]
    birth: int = Field(ge=0, description="grows with every connection; the will carries the same value")
    agent_version: str | None = None
    # Carries toco_core.device.DeviceProfile.model_dump(): memory, storage, cores, formats, speed.
    hardware: dict[str, Any] | None = None
    active: ActiveModel | None = None


class TelemetryMessage(AgentMessage):
    """Periodic resources and inference counters (QoS 0: a lost one is replaced by the next)."""

    mem_available: int = Field(ge=0, description="bytes")
    disk_free: int = Field(ge=0, description="bytes in the state dir's file system")
    cpu_load: float = Field(ge=0, description="share of all cores busy, 0..1")
    temperature_c: float | None = None
    inferences: int = Field(0, ge=0, description="since the agent started")
    latency_ms_p50: float | None = Field(None, ge=0)
    latency_ms_p99: float | None = Field(None, ge=0)


class StatusMessage(AgentMessage):
    """Deployment progress and result; a failing phase must say why."""

    phase: Phase
    deployment_id: str | None = None
    bundle_id: BundleId | None = None
    progress: float | None = Field(None, ge=0, le=1)
    reason: FailureReason | None = None
    detail: str = Field("", max_length=2000)
    predicted_agreement: float | None = Field(None, ge=0, le=1)
    measured_agreement: float | None = Field(None, ge=0, le=1)
    plan: dict[str, Any] | None = None
    # Box storage, sent with ``active``: bytes of the bundle's parts received for this deployment,
    # the whole state dir, and what the drift shadow runs (agent.deployer.storage_fields).
    download_bytes: int | None = Field(None, ge=0, description="bundle bytes received for this deployment")
    state_dir_bytes: int | None = Field(None, ge=0, description="sum of the file sizes under the state dir")
    shadow: Literal["fp32", "master", "none"] | None = Field(
        None, description="drift shadow: the fp32 base, the master model rebuilt from all bit planes, or none")

    @model_validator(mode="after")
    def _reason_iff_failing(self) -> StatusMessage:
        if (self.phase in FAILING_PHASES) != (self.reason is not None):
            raise ValueError(f"phase {self.phase.value!r} needs a reason exactly when it is failed/refused/rolled_back")
        return self


class DriftCheck(Message):
    """One statistic of a window against its band; ``in_band`` None = too few samples to judge."""

    name: Literal["agreement", "confidence", "entropy_psi", "input_shift", "accuracy"]
    value: float | None
    reference: float | None
    low: float | None
    high: float | None
    n: int = Field(ge=0)
    in_band: bool | None


class DisputedRef(Message):
    """An input worth the server's re-analysis; the input itself travels on ``samples`` by ``ref``."""

    ref: str = Field(min_length=1, max_length=128)
    reason: Literal["disagreement", "low_confidence"]
    confidence: float
    model_class: int
    base_class: int | None = None


class DriftMessage(AgentMessage):
    """One closed drift window; the fields mirror toco_core.drift.DriftReport one for one.

    Build it as ``DriftMessage(device_id=..., bundle_id=..., **report.model_dump(exclude={"schema_version"}))``.
    """

    bundle_id: BundleId | None = None
    window_index: int = Field(ge=0)
    opened_at: float
    closed_at: float
    n_samples: int = Field(ge=0)
    n_shadowed: int = Field(0, ge=0, description="inputs also run on the base model")
    n_labeled: int = Field(0, ge=0)
    predicted_agreement: float | None = Field(None, ge=0, le=1)
    measured_agreement: float | None = Field(None, ge=0, le=1)
    accuracy: float | None = Field(None, ge=0, le=1)
    mean_confidence: float
    mean_entropy: float
    input_mean: float
    input_std: float
    checks: list[DriftCheck] = Field(default_factory=list)
    out_of_band: list[str] = Field(default_factory=list, description="names of the checks outside their band")
    consecutive_out_of_band: int = Field(0, ge=0)
    alert: bool = False
    disputed: list[DisputedRef] = Field(default_factory=list, max_length=1000)


class Sample(Message):
    """One uploaded input array (raw little-endian bytes, base64)."""

    ref: str = Field(min_length=1, max_length=128, description="DisputedRef.ref")
    dtype: Literal["float32", "uint8", "float16"]
    shape: list[int] = Field(max_length=8)
    data_b64: str
    reason: Literal["disagreement", "low_confidence", "requested"] = "disagreement"


class SamplesMessage(AgentMessage):
    """A size-capped batch of disputed inputs, answering an upload-samples command."""

    cmd_id: str | None = None
    window: int | None = None
    batch: int = Field(0, ge=0)
    last: bool = True
    samples: list[Sample] = Field(max_length=1000)


class ServerCommand(Message):
    """Fields every command shares."""

    cmd_id: str = Field(pattern=ID_PATTERN)
    sent_at: float = Field(default_factory=time.time)


class DeployCommand(ServerCommand):
    """Download, verify, recompress and activate a bundle."""

    command: Literal["deploy"] = "deploy"
    deployment_id: str = Field(pattern=ID_PATTERN)
    bundle_id: BundleId
    fidelity_budget: float | None = Field(None, gt=0, lt=1, description="max disagreement; None = device config")


class RecompressCommand(ServerCommand):
    """Derive the compression again from the active bundle, optionally with new budgets."""

    command: Literal["recompress"] = "recompress"
    memory_bytes: int | None = Field(None, gt=0)
    storage_bytes: int | None = Field(None, gt=0)
    latency_ms: float | None = Field(None, gt=0)
    fidelity_budget: float | None = Field(None, gt=0, lt=1)


class RollbackCommand(ServerCommand):
    """Switch back to the previous slot."""

    command: Literal["rollback"] = "rollback"
    deployment_id: str | None = None
    reason: str = ""


class UploadSamplesCommand(ServerCommand):
    """Send disputed inputs (of one window, or by id) in batches of at most max_bytes."""

    command: Literal["upload-samples"] = "upload-samples"
    window: int | None = None
    refs: list[str] | None = Field(None, max_length=1000)
    max_bytes: int = Field(1_000_000, gt=0, le=MAX_JSON_PAYLOAD // 2)


Command = Annotated[
    DeployCommand | RecompressCommand | RollbackCommand | UploadSamplesCommand,
    Field(discriminator="command"),
]


class FileEntry(Message):
    """Where one named file lies inside the packed bundle."""

    name: str
    offset: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256_PATTERN)


class BundleManifest(Message):
    """Everything an agent checks before and after a download; signed (see toco_core.bundle)."""

    bundle_id: BundleId
    size: int = Field(gt=0)
    chunk_size: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    chunks: list[Annotated[str, Field(pattern=SHA256_PATTERN)]] = Field(min_length=1, description="sha256 hex per chunk")
    files: list[FileEntry]
    created_at: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    signer: str | None = Field(None, description="fingerprint of the signing key")
    signature: str | None = Field(None, description="base64 Ed25519 over the canonical JSON without this field")

    @model_validator(mode="after")
    def _chunks_cover_size(self) -> BundleManifest:
        expected = -(-self.size // self.chunk_size)
        if len(self.chunks) != expected:
            raise ValueError(f"{len(self.chunks)} chunk hashes for {self.size} bytes in chunks of "
                             f"{self.chunk_size}; expected {expected}")
        return self

    @property
    def n_chunks(self) -> int:
        """Number of chunks."""
        return len(self.chunks)

    def chunk_len(self, i: int) -> int:
        """Byte length of chunk ``i`` (the last one may be short)."""
        return min(self.chunk_size, self.size - i * self.chunk_size)


class ChunkRequest(AgentMessage):
    """Ask the server for some chunks of a bundle (a window, never the whole list)."""

    bundle_id: BundleId
    chunks: list[Annotated[int, Field(ge=0)]] = Field(min_length=1, max_length=MAX_CHUNKS_PER_REQUEST)


class Chunk(Message):
    """One chunk: on the wire ``header JSON`` + ``\\n`` + raw bytes (see encode_chunk)."""

    bundle_id: BundleId
    index: int = Field(ge=0)
    data: bytes = Field(exclude=True, repr=False)


class PartRange(Message):
    """Bytes ``offset .. offset + length`` of one part (a file of a parts bundle's manifest)."""

    part: str = Field(pattern=PART_NAME_PATTERN, max_length=64)
    offset: int = Field(ge=0)
    length: int = Field(gt=0, le=MAX_RANGE_LENGTH)


class PartRequest(AgentMessage):
    """Ask the server for ranges of a parts bundle; each is answered on the asker's own part topic."""

    bundle_id: BundleId
    ranges: list[PartRange] = Field(min_length=1, max_length=MAX_RANGES_PER_REQUEST)


class Part(Message):
    """One range of a part: on the wire ``header JSON`` + ``\\n`` + raw bytes (see encode_part)."""

    bundle_id: BundleId
    part: str = Field(pattern=PART_NAME_PATTERN, max_length=64)
    offset: int = Field(ge=0)
    data: bytes = Field(exclude=True, repr=False)


class MessageKind(StrEnum):
    """The last level(s) of a topic, naming the payload type."""

    STATE = "state"
    TELEMETRY = "telemetry"
    STATUS = "status"
    DRIFT = "drift"
    SAMPLES = "samples"
    CMD = "cmd"
    MANIFEST = "manifest"
    GET = "get"
    CHUNK = "chunk"
    PART = "part"


_ADAPTERS: dict[MessageKind, TypeAdapter] = {
    MessageKind.STATE: TypeAdapter(StateMessage),
    MessageKind.TELEMETRY: TypeAdapter(TelemetryMessage),
    MessageKind.STATUS: TypeAdapter(StatusMessage),
    MessageKind.DRIFT: TypeAdapter(DriftMessage),
    MessageKind.SAMPLES: TypeAdapter(SamplesMessage),
    MessageKind.CMD: TypeAdapter(Command),
    MessageKind.MANIFEST: TypeAdapter(BundleManifest),
    # a request names chunks (format-1 bundles) or part ranges; extra="forbid" tells them apart
    MessageKind.GET: TypeAdapter(ChunkRequest | PartRequest),
}
_KIND_OF = {StateMessage: MessageKind.STATE, TelemetryMessage: MessageKind.TELEMETRY, StatusMessage: MessageKind.STATUS,
            DriftMessage: MessageKind.DRIFT, SamplesMessage: MessageKind.SAMPLES, BundleManifest: MessageKind.MANIFEST,
            ChunkRequest: MessageKind.GET, Chunk: MessageKind.CHUNK, DeployCommand: MessageKind.CMD,
            RecompressCommand: MessageKind.CMD, RollbackCommand: MessageKind.CMD, UploadSamplesCommand: MessageKind.CMD,
            PartRequest: MessageKind.GET, Part: MessageKind.PART}


def kind_of(message: Message) -> MessageKind:
    """The MessageKind of a model instance. Raises MessageError for a type with no topic."""
    try:
        return _KIND_OF[type(message)]
    except KeyError:
        raise MessageError(f"{type(message).__name__} is not sent on its own topic", "send the enclosing message") from None


def encode(message: Message) -> bytes:
    """Wire bytes of a message: compact JSON, or the binary frame for a Chunk."""
    if isinstance(message, Chunk):
        return encode_chunk(message.bundle_id, message.index, message.data)
    if isinstance(message, Part):
        return encode_part(message.bundle_id, message.part, message.offset, message.data)
    return message.model_dump_json(exclude_none=False).encode()


def encode_chunk(bundle_id: str, index: int, data: bytes) -> bytes:
    """``{"schema_version":1,"bundle_id":..,"index":..}\\n`` followed by the raw chunk bytes."""
    header = json.dumps({"schema_version": SCHEMA_VERSION, "bundle_id": bundle_id, "index": index}, separators=(",", ":"))
    return header.encode() + b"\n" + bytes(data)


def encode_part(bundle_id: str, part: str, offset: int, data: bytes) -> bytes:
    """``{"schema_version":1,"bundle_id":..,"part":..,"offset":..}\\n`` followed by the raw bytes of the range."""
    header = json.dumps({"schema_version": SCHEMA_VERSION, "bundle_id": bundle_id, "part": part, "offset": offset},
                        separators=(",", ":"))
    return header.encode() + b"\n" + bytes(data)


def _explain(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
        parts.append(f"{where}: {err.get('msg')}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"invalid {kind} message: " + "; ".join(parts) + more


def parse_message(kind: MessageKind | str, payload: bytes) -> Message:
    """Validate wire bytes as the payload type of ``kind`` (a MessageKind value).

    Returns the model (for ``cmd`` the concrete command class; for ``chunk`` a Chunk).
    Raises MessageError for an unknown kind, an oversized payload, bad JSON or a schema mismatch.
    """
    try:
        kind = MessageKind(kind)
    except ValueError:
        raise MessageError(f"unknown message kind {kind!r}", f"use one of {[k.value for k in MessageKind]}") from None
    payload = bytes(payload)
    if kind is MessageKind.CHUNK:
        return _parse_chunk(payload)
    if kind is MessageKind.PART:
        return _parse_part(payload)
    if len(payload) > MAX_JSON_PAYLOAD:
        raise MessageError(f"{kind.value} payload of {len(payload)} bytes exceeds {MAX_JSON_PAYLOAD}", "send less per message")
    try:
        return _ADAPTERS[kind].validate_json(payload)
    except ValidationError as exc:
        if exc.errors() and exc.errors()[0].get("type") == "json_invalid":
            raise MessageError(f"{kind.value} payload is not valid JSON: {exc.errors()[0].get('msg')}",
                               "the sender must send UTF-8 JSON") from None
        raise MessageError(_explain(kind.value, exc), "the sender must follow docs/protocol.md") from None


def _frame(payload: bytes, what: str, max_data: int) -> tuple[dict, bytes]:
    """Split a binary frame into its JSON header object and its data. Raises MessageError."""
    head, sep, data = payload.partition(b"\n")
    if not sep or len(head) > 1024:
        raise MessageError(f"{what} payload has no JSON header line", f"frame {what}s with encode_{what}")
    try:
        fields = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"{what} header is not valid JSON: {exc}", f"frame {what}s with encode_{what}") from None
    if not isinstance(fields, dict):
        raise MessageError(f"{what} header is not a JSON object", f"frame {what}s with encode_{what}")
    if len(data) > max_data:
        raise MessageError(f"{what} of {len(data)} bytes exceeds {max_data}", "request smaller ranges")
    return fields, data


def _parse_part(payload: bytes) -> Part:
    fields, data = _frame(payload, "part", MAX_RANGE_LENGTH)
    try:
        return Part(**fields, data=data)
    except (ValidationError, TypeError) as exc:
        msg = _explain("part", exc) if isinstance(exc, ValidationError) else f"invalid part header: {exc}"
        raise MessageError(msg, "frame parts with encode_part") from None


def _parse_chunk(payload: bytes) -> Chunk:
    head, sep, data = payload.partition(b"\n")
    if not sep or len(head) > 1024:
        raise MessageError("chunk payload has no JSON header line", "frame chunks with encode_chunk")
    try:
        fields = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MessageError(f"chunk header is not valid JSON: {exc}", "frame chunks with encode_chunk") from None
    if not isinstance(fields, dict):
        raise MessageError("chunk header is not a JSON object", "frame chunks with encode_chunk")
    if len(data) > MAX_CHUNK_SIZE:
        raise MessageError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_SIZE}", "use a smaller chunk size")
    try:
        return Chunk(**fields, data=data)
    except (ValidationError, TypeError) as exc:
        msg = _explain("chunk", exc) if isinstance(exc, ValidationError) else f"invalid chunk header: {exc}"
        raise MessageError(msg, "frame chunks with encode_chunk") from None
