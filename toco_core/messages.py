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

import functools
import hashlib
import json
import time
import zlib
from enum import StrEnum
from typing import Annotated, Any, Literal, overload

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from toco_core.device import DeviceProfile
from toco_core.drift import MAX_DISPUTED, DisputedSample, DriftReport, StatCheck
from toco_core.errors import TocoError
from toco_core.plan import CompressionPlan, CompressionReport, Runtime

SCHEMA_VERSION = 1
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # no '/', '+', '#': safe inside a topic level
SHA256_PATTERN = r"^[0-9a-f]{64}$"
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 64 * 1024, 256 * 1024
MAX_JSON_PAYLOAD = 4 * 1024 * 1024  # larger JSON is refused before parsing (memory on small boxes)
MAX_CHUNKS_PER_REQUEST = 64
MAX_RANGE_LENGTH = 256 * 1024  # one part reply frame at most; as large as a chunk
MAX_RANGES_PER_REQUEST = 64
# head, band/3 and fine/3 (class 3), prune/0, calib/heldout, base; codes/top, codes/3/7 of older bundles
PART_NAME_PATTERN = r"^[a-z]+(/[a-z0-9]+){0,2}$"

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
    DOWNGRADE = "downgrade"
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


# Spellings older agents (and the what-if before it was typed) used for PlanSummary figures.
# Accepted on the way in so an older agent's birth and status still parse; never written.
_OLD_PLAN_KEYS = {"file_bytes": "runnable_bytes", "predicted_storage": "predicted_storage_bytes",
                  "predicted_memory": "predicted_memory_bytes", "base_bytes": "base_file_bytes",
                  "seconds": "recompress_seconds", "peak_rss_child": "recompress_peak_rss"}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


class PlanSummary(BaseModel):
    """A compression plan as the fleet sees it: one name per figure, labelled for what it is.

    ``predicted_*`` figures come from the solver (the analysis's calibration curves); the
    unprefixed ones were measured on the box that built the model. The what-if fills only the
    predictions (:meth:`from_plan`); an agent's recompression fills both (:meth:`from_report`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, description="short human name, e.g. 'prune 60% + quant s=0.28 / fp32'")
    model_name: str | None = Field(None, description="name of the base model the plan compresses")
    runtime: Runtime | None = Field(None, description="runtime form the weights are served in")
    prune_scale: float | None = Field(None, ge=0, description="pruning scale = sparsity share")
    quant_scale: float | None = Field(None, ge=0, description="mixed precision scale on tau_hat (0 = float)")
    sparsity: float | None = Field(None, ge=0, le=1, description="share of compressible weights zeroed")
    entropy_bits: float | None = Field(None, ge=0, description="entropy of the weight codes per weight (32 = float)")
    predicted_disagreement: float | None = Field(None, ge=0, le=1, description="top-1 disagreement with the base")
    predicted_storage_bytes: int | None = Field(None, ge=0, description="solver's size of the storage form")
    predicted_memory_bytes: int | None = Field(None, ge=0, description="solver's session memory estimate")
    base_file_bytes: int | None = Field(None, ge=0, description="the base ONNX model file")
    storage_bytes: int | None = Field(None, ge=0, description="built storage form on the box (entropy-coded codes)")
    download_bytes: int | None = Field(None, ge=0, description="bytes of the bundle parts this plan needs")
    bundle_bytes: int | None = Field(None, ge=0, description="bytes of the full parts bundle, fp32 part excluded")
    runnable_bytes: int | None = Field(None, ge=0, description="built runnable ONNX model file")
    measured_disagreement: float | None = Field(None, ge=0, le=1, description="self-test on the calibration samples")
    session_rss: int | None = Field(None, ge=0, description="measured onnxruntime session memory, bytes")
    base_session_rss: int | None = Field(None, ge=0, description="same for the base model")
    p50_ms: float | None = Field(None, ge=0, description="measured median latency at batch 1")
    base_p50_ms: float | None = Field(None, ge=0, description="same for the base model")
    layer_formats: dict[str, int] = Field(default_factory=dict, description="compressible layers per runtime format")
    attempts: int | None = Field(None, ge=1, description="self-test attempts the recompression needed")
    recompress_seconds: float | None = Field(None, ge=0, description="wall time of the recompression")
    recompress_peak_rss: int | None = Field(None, ge=0, description="peak RSS of the recompression child, bytes")

    @model_validator(mode="before")
    @classmethod
    def _map_old_keys(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not _OLD_PLAN_KEYS.keys() & data.keys():
            return data
        data = dict(data)
        for old, new in _OLD_PLAN_KEYS.items():
            if old in data:
                if new in data:
                    raise ValueError(f"plan gives both {old!r} (the old spelling) and {new!r}; send only {new!r}")
                data[new] = data.pop(old)
        return data

    @classmethod
    def from_plan(cls, plan: CompressionPlan, *, base_file_bytes: int | None = None,
                  **extra: Any) -> PlanSummary:
        """The predictions of a solver plan (nothing built yet).

        Takes the plan, the base model's file size and further PlanSummary fields (``extra``).
        Returns the summary. Raises pydantic's ValidationError for an unknown or invalid field.
        """
        return cls(label=plan.label, runtime=plan.runtime, prune_scale=plan.prune_scale, quant_scale=plan.quant_scale,
                   sparsity=plan.sparsity, entropy_bits=plan.entropy_bits,
                   predicted_disagreement=plan.predicted_disagreement, predicted_storage_bytes=plan.predicted_storage,
                   predicted_memory_bytes=plan.predicted_memory, base_file_bytes=base_file_bytes, **extra)

    @classmethod
    def from_report(cls, report: CompressionReport, *, model_name: str | None = None,
                    recompress_peak_rss: int | None = None) -> PlanSummary:
        """What a recompression predicted and measured: the kept plan's predictions plus the built
        sizes, the self-test, the session memory and latency, and the layers per runtime format.

        Takes the report, the model's name and the recompression child's peak RSS; returns the
        summary. Raises pydantic's ValidationError for out-of-range figures.
        """
        formats: dict[str, int] = {}
        for layer in report.layers:
            formats[layer.runtime_format] = formats.get(layer.runtime_format, 0) + 1
        return cls.from_plan(
            report.plan, base_file_bytes=report.base_file_bytes, model_name=model_name,
            storage_bytes=report.storage_bytes, runnable_bytes=report.file_bytes,
            download_bytes=report.download_bytes, bundle_bytes=report.bundle_bytes,
            measured_disagreement=report.self_test.measured, session_rss=report.session_rss,
            base_session_rss=report.base_session_rss, p50_ms=_ms(report.p50_s), base_p50_ms=_ms(report.base_p50_s),
            layer_formats=formats, attempts=report.attempts, recompress_seconds=round(report.seconds, 3),
            recompress_peak_rss=recompress_peak_rss,
        )


class HardwareInfo(DeviceProfile):
    """What the agent's probe found (a DeviceProfile with the box's configured budgets), as its
    birth carries it. The fields are DeviceProfile's; this class only makes them immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_profile(cls, profile: DeviceProfile) -> HardwareInfo:
        """The birth's form of a probed profile. Raises pydantic's ValidationError for an invalid one."""
        return cls.model_validate(profile.model_dump())

    def to_profile(self) -> DeviceProfile:
        """The DeviceProfile to plan with (the solver and what-if take DeviceProfile)."""
        return DeviceProfile.model_validate(self.model_dump())


class ActiveModel(Message):
    """What a device serves right now."""

    bundle_id: BundleId | None = None
    model_name: str | None = None
    slot: Literal["a", "b"] | None = None
    plan: PlanSummary | None = None


class StateMessage(AgentMessage):
    """Retained device state: the birth when online, the last will when offline.

    ``group`` is the group the agent's config names; the server owns group assignment and
    adopts it only for a device it has not put in a group yet (docs/protocol.md).
    """

    state: Literal["online", "offline"]
    birth: int = Field(ge=0, description="grows with every connection; the will carries the same value")
    agent_version: str | None = None
    hardware: HardwareInfo | None = None
    group: str | None = Field(None, pattern=ID_PATTERN, description="the group the agent's config asks for")
    active: ActiveModel | None = None

    @model_validator(mode="before")
    @classmethod
    def _group_out_of_hardware(cls, data: Any) -> Any:
        # Older agents put their group inside ``hardware``: lift it out. A hardware dict
        # without a device id would get DeviceProfile's default, the receiver's host name.
        if not isinstance(data, dict) or not isinstance(data.get("hardware"), dict):
            return data
        hardware = dict(data["hardware"])
        data = dict(data)
        if "group" in hardware:
            group = hardware.pop("group")
            if data.get("group") is None:
                data["group"] = group
        if "device_id" in data:
            hardware.setdefault("device_id", data["device_id"])
        data["hardware"] = hardware
        return data


class TelemetryMessage(AgentMessage):
    """Periodic resources and inference counters (QoS 1, not kept in the outbox: a box offline drops them)."""

    mem_available: int = Field(ge=0, description="bytes")
    disk_free: int = Field(ge=0, description="bytes in the state dir's file system")
    cpu_load: float = Field(ge=0, description="share of all cores busy, 0..1")
    temperature_c: float | None = None
    inferences: int = Field(0, ge=0, description="since the agent started")
    latency_ms_p50: float | None = Field(None, ge=0)
    latency_ms_p99: float | None = Field(None, ge=0)
    refused_commands: dict[str, int] = Field(default_factory=dict,
                                             description="commands refused since provisioning, per reason")


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
    plan: PlanSummary | None = None
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


class DriftCheck(Message, StatCheck):
    """One statistic of a window against its band (the fields are toco_core.drift.StatCheck's)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DisputedRef(Message, DisputedSample):
    """An input worth the server's re-analysis (toco_core.drift.DisputedSample); the input itself
    travels on ``samples`` by ``ref``."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DriftMessage(AgentMessage, DriftReport):
    """One closed drift window: the fields (and their bounds) are toco_core.drift.DriftReport's,
    plus the sender and the bundle it serves. Build it with :meth:`from_report`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bundle_id: BundleId | None = None
    # the report's nested types again, as strict versioned wire types (same fields)
    checks: list[DriftCheck] = Field(default_factory=list)  # type: ignore[assignment]  # narrower wire type
    disputed: list[DisputedRef] = Field(default_factory=list, max_length=MAX_DISPUTED)  # type: ignore[assignment]

    @classmethod
    def from_report(cls, report: DriftReport, *, device_id: str, bundle_id: str | None) -> DriftMessage:
        """The message of one closed window. Raises pydantic's ValidationError for a bad id."""
        return cls(device_id=device_id, bundle_id=bundle_id, **report.model_dump(exclude={"schema_version"}))


# the numeric dtypes a model input (and so an uploaded field sample) may have
SampleDtype = Literal["float32", "uint8", "float16", "float64", "int8", "uint16", "int16", "int32", "int64"]


class Sample(Message):
    """One uploaded input array (raw little-endian bytes, base64)."""

    ref: str = Field(min_length=1, max_length=128, description="DisputedRef.ref")
    dtype: SampleDtype = Field(description="the model input's own dtype: uint8 camera bytes stay uint8")
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
    """Fields every command shares, with the signed envelope (toco_core.command_signing).

    The envelope fields are optional in the schema so an unsigned command still parses and can
    be refused with a reason (and counted); the agent accepts only a command whose every
    envelope field is set and whose signature verifies (docs/protocol.md, "Signed commands").
    """

    cmd_id: str = Field(pattern=ID_PATTERN)
    sent_at: float = Field(default_factory=time.time)
    device_id: DeviceId | None = Field(None, description="the one device this command is for")
    deployment_id: str | None = Field(None, pattern=ID_PATTERN, description="the deployment it belongs to, if any")
    expires_at: float | None = Field(None, description="unix seconds after which the device refuses it")
    sequence: int | None = Field(None, ge=1, description="server-wide monotonic; the device refuses one not above "
                                                          "the highest it accepted")
    signer: str | None = Field(None, description="fingerprint of the signing key")
    signature: str | None = Field(None, description="base64 Ed25519 over the canonical JSON without this field")


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
    """Switch back to the previous slot; with ``bundle_id``, go back to that bundle, which the
    device then accepts although its sequence is below the highest it took for the model."""

    command: Literal["rollback"] = "rollback"
    reason: str = ""
    bundle_id: BundleId | None = Field(None, description="the older bundle this rollback allows and activates")


class UploadSamplesCommand(ServerCommand):
    """Send disputed inputs (of one window, or by id) in batches of at most max_bytes."""

    command: Literal["upload-samples"] = "upload-samples"
    window: int | None = None
    refs: list[str] | None = Field(None, max_length=1000)
    max_bytes: int = Field(1_000_000, gt=0, le=MAX_JSON_PAYLOAD // 2)


class RebaseDriftCommand(ServerCommand):
    """Judge drift from now on against a reference moved onto the last ``windows`` closed windows
    (toco_core.drift_rebase): an operator accepted the new data as normal, or a re-analysis built
    for these inputs is now served (convergence)."""

    command: Literal["rebase-drift"] = "rebase-drift"
    windows: int = Field(4, ge=1, le=4, description="closed windows to pool into the new reference")
    reason: Literal["accepted", "converged"] = "accepted"
    alert_id: str | None = Field(None, pattern=ID_PATTERN, description="the server's drift alert this answers")


class TrustedKey(BaseModel):
    """One Ed25519 public key a device trusts: its 32 raw bytes as hex, and their fingerprint."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    fingerprint: str = Field(pattern=r"^[0-9a-f]{16}$", description="sha256(raw key) hex, first 16 digits")
    public_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="the raw public key, hex")

    @model_validator(mode="after")
    def _fingerprint_matches(self) -> TrustedKey:
        if hashlib.sha256(bytes.fromhex(self.public_key)).hexdigest()[:16] != self.fingerprint:
            raise ValueError(f"fingerprint {self.fingerprint} does not name public key {self.public_key[:12]}...")
        return self


class TrustKeysCommand(ServerCommand):
    """Replace the device's trusted key set (key rotation): signed by a key the device trusts now,
    it names every key to trust from here on; a key left out is retired on the device."""

    command: Literal["trust-keys"] = "trust-keys"
    keys: list[TrustedKey] = Field(min_length=1, max_length=8)


Command = Annotated[
    DeployCommand | RecompressCommand | RollbackCommand | UploadSamplesCommand | TrustKeysCommand
    | RebaseDriftCommand,
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
    chunks: list[Annotated[str, Field(pattern=SHA256_PATTERN)]] = Field(min_length=1,
                                                                       description="sha256 hex per chunk")
    files: list[FileEntry]
    created_at: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    # Anti-rollback (docs/bundles.md): the server's model id and a per-model sequence that grows with
    # every bundle it builds; a manifest without them (older servers) counts as sequence 0.
    model_id: str | None = Field(None, pattern=ID_PATTERN, description="the server's id of the bundle's model")
    sequence: int | None = Field(None, ge=1, description="per model, monotonic; signed with the manifest")
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
    refetch: bool = Field(False, description="the box threw these ranges away (their part failed its signed "
                                             "hash): serve them even if they just went out")


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


_ADAPTERS: dict[MessageKind, TypeAdapter[Any]] = {
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
            TrustKeysCommand: MessageKind.CMD, RebaseDriftCommand: MessageKind.CMD,
            PartRequest: MessageKind.GET, Part: MessageKind.PART}


def kind_of(message: Message) -> MessageKind:
    """The MessageKind of a model instance. Raises MessageError for a type with no topic."""
    try:
        return _KIND_OF[type(message)]
    except KeyError:
        raise MessageError(f"{type(message).__name__} is not sent on its own topic",
                           "send the enclosing message") from None


def encode(message: Message) -> bytes:
    """Wire bytes of a message: compact JSON, deflated for a bundle manifest (its part hashes are
    hex: every box receives a manifest before any part, 8.3 KB of JSON for LeNet-5's 54 parts, 3.1
    KB deflated), or the binary frame for a Chunk or Part."""
    if isinstance(message, BundleManifest):
        return zlib.compress(message.model_dump_json(exclude_none=False).encode(), 9)
    if isinstance(message, Chunk):
        return encode_chunk(message.bundle_id, message.index, message.data)
    if isinstance(message, Part):
        return encode_part(message.bundle_id, message.part, message.offset, message.data)
    return message.model_dump_json(exclude_none=False).encode()


def encode_chunk(bundle_id: str, index: int, data: bytes) -> bytes:
    """``{"schema_version":1,"bundle_id":..,"index":..}\\n`` followed by the raw chunk bytes."""
    header = json.dumps({"schema_version": SCHEMA_VERSION, "bundle_id": bundle_id, "index": index},
                        separators=(",", ":"))
    return header.encode() + b"\n" + bytes(data)


def encode_part(bundle_id: str, part: str, offset: int, data: bytes) -> bytes:
    """``{"schema_version":1,"bundle_id":..,"part":..,"offset":..}\\n`` followed by the raw bytes of the range.

    Byte for byte what ``json.dumps`` with compact separators gives; the header up to the offset is made once
    per (bundle, part), since a server answering 2,000 boxes encodes the same one ~100,000 times (json.dumps took a
    third of its part serving time)."""
    return b"".join((_part_header_prefix(bundle_id, part), str(int(offset)).encode(), b"}\n", data))


@functools.lru_cache(maxsize=4096)
def _part_header_prefix(bundle_id: str, part: str) -> bytes:
    """``{"schema_version":1,"bundle_id":"..","part":"..","offset":`` (names JSON-escaped as json.dumps does)."""
    return (f'{{"schema_version":{SCHEMA_VERSION},"bundle_id":{json.dumps(bundle_id)},'
            f'"part":{json.dumps(part)},"offset":').encode()


def _explain(kind: str, exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "payload"
        parts.append(f"{where}: {err.get('msg')}")
    more = f" (+{exc.error_count() - 3} more)" if exc.error_count() > 3 else ""
    return f"invalid {kind} message: " + "; ".join(parts) + more


@overload
def parse_message(kind: Literal[MessageKind.STATE, "state"], payload: bytes | bytearray) -> StateMessage: ...
@overload
def parse_message(kind: Literal[MessageKind.TELEMETRY, "telemetry"],
                  payload: bytes | bytearray) -> TelemetryMessage: ...
@overload
def parse_message(kind: Literal[MessageKind.STATUS, "status"], payload: bytes | bytearray) -> StatusMessage: ...
@overload
def parse_message(kind: Literal[MessageKind.DRIFT, "drift"], payload: bytes | bytearray) -> DriftMessage: ...
@overload
def parse_message(kind: Literal[MessageKind.SAMPLES, "samples"], payload: bytes | bytearray) -> SamplesMessage: ...
@overload
def parse_message(kind: Literal[MessageKind.CMD, "cmd"], payload: bytes | bytearray) -> ServerCommand: ...
@overload
def parse_message(kind: Literal[MessageKind.MANIFEST, "manifest"], payload: bytes | bytearray) -> BundleManifest: ...
@overload
def parse_message(kind: Literal[MessageKind.GET, "get"], payload: bytes | bytearray) -> ChunkRequest | PartRequest: ...
@overload
def parse_message(kind: Literal[MessageKind.CHUNK, "chunk"], payload: bytes | bytearray) -> Chunk: ...
@overload
def parse_message(kind: Literal[MessageKind.PART, "part"], payload: bytes | bytearray) -> Part: ...
@overload
def parse_message(kind: MessageKind | str, payload: bytes | bytearray) -> Message: ...
def parse_message(kind: MessageKind | str, payload: bytes | bytearray) -> Message:
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
        raise MessageError(f"{kind.value} payload of {len(payload)} bytes exceeds {MAX_JSON_PAYLOAD}",
                           "send less per message")
    if kind is MessageKind.MANIFEST and payload[:1] == b"\x78":  # zlib's header; JSON starts with "{"
        payload = _inflate(payload, kind.value)
    try:
        message: Message = _ADAPTERS[kind].validate_json(payload)
        return message
    except ValidationError as exc:
        if exc.errors() and exc.errors()[0].get("type") == "json_invalid":
            raise MessageError(f"{kind.value} payload is not valid JSON: {exc.errors()[0].get('msg')}",
                               "the sender must send UTF-8 JSON") from None
        raise MessageError(_explain(kind.value, exc), "the sender must follow docs/protocol.md") from None


def _inflate(payload: bytes, what: str) -> bytes:
    """A deflated JSON payload inflated, at most MAX_JSON_PAYLOAD bytes. Raises MessageError."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(payload, MAX_JSON_PAYLOAD)
    except zlib.error as exc:
        raise MessageError(f"{what} payload does not inflate: {exc}", "the sender must deflate whole JSON") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise MessageError(f"{what} payload inflates beyond {MAX_JSON_PAYLOAD} bytes or is cut short",
                           "send a complete manifest of at most 4 MiB")
    return out


def _frame(payload: bytes, what: str, max_data: int) -> tuple[dict[str, Any], bytes]:
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
