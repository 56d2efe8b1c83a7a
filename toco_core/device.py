"""What a box offers a compressed model: the DeviceProfile and pure helpers around it.

A profile is probed on the box (toco_core.probe) or loaded from a JSON file to plan for a box
you are not on. Budgets ("use at most 64 MB for the model") cap what the solver may use:
``usable_memory(p) = min(available_memory, memory_budget)``, same for storage.
"""

from __future__ import annotations

import json
import socket
from enum import Enum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from toco_core.errors import ConfigError, DeviceError

SCHEMA_VERSION = 1

# Instruction-set flags that decide int8/float speed, as /proc/cpuinfo spells them
# (x86 "flags", arm "Features"). asimddp is arm's dot product (the int8 fast path).
ISA_FLAGS = (
    "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
    "amx_int8", "neon", "asimd", "asimddp", "i8mm", "sve", "sve2", "bf16",
)
_FAST_INT8 = {"avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm"}


class RuntimeFormat(str, Enum):
    """Model formats the box's onnxruntime can run."""

    FP32 = "fp32"
    QDQ_INT8 = "qdq_int8"  # QuantizeLinear/DequantizeLinear around int8 kernels
    MATMUL_NBITS4 = "matmul_nbits4"  # com.microsoft MatMulNBits, 4-bit blocks
    MATMUL_NBITS8 = "matmul_nbits8"  # com.microsoft MatMulNBits, 8-bit blocks


class Benchmark(BaseModel):
    """A short measured GEMM through onnxruntime: float MatMul and int8 MatMulInteger."""

    model_config = ConfigDict(extra="forbid")

    gemm_size: int = Field(gt=0, description="n of the n x n x n GEMM")
    fp32_gflops: float = Field(gt=0, description="float32 MatMul, 2 n^3 / best time, GFLOP/s")
    int8_gops: float | None = Field(None, gt=0, description="uint8 x int8 MatMulInteger, GOP/s; None if it failed")
    seconds: float = Field(ge=0, description="wall time of the whole benchmark")


class DeviceProfile(BaseModel):
    """Hardware and runtime facts of one box plus the budgets its owner configured (bytes, seconds)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = Field(SCHEMA_VERSION, ge=1, le=SCHEMA_VERSION)
    device_id: str = Field(default_factory=socket.gethostname, min_length=1)
    total_memory: int = Field(gt=0, description="physical memory (or the cgroup limit), bytes")
    available_memory: int = Field(ge=0, description="memory free for new allocations, bytes")
    free_storage: int = Field(ge=0, description="free bytes in the model storage directory")
    physical_cores: int = Field(ge=1)
    logical_cores: int = Field(ge=1)
    cpu_model: str = ""
    isa: list[str] = Field(default_factory=list, description="instruction-set flags from ISA_FLAGS")
    ort_version: str = Field(min_length=1)
    providers: list[str] = Field(default_factory=lambda: ["CPUExecutionProvider"])
    benchmark: Benchmark | None = None
    formats: list[RuntimeFormat] = Field(default_factory=lambda: [RuntimeFormat.FP32])
    memory_budget: int | None = Field(None, gt=0, description="most memory the model may use, bytes")
    storage_budget: int | None = Field(None, gt=0, description="most storage the model may use, bytes")
    latency_budget_s: float | None = Field(None, gt=0, description="p50 latency limit at batch 1, seconds")

    @model_validator(mode="after")
    def _consistent(self) -> DeviceProfile:
        if self.available_memory > self.total_memory:
            raise ValueError(f"available_memory {self.available_memory} exceeds total_memory {self.total_memory}")
        if self.logical_cores < self.physical_cores:
            raise ValueError(f"logical_cores {self.logical_cores} < physical_cores {self.physical_cores}")
        return self


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """CPU model name and the ISA_FLAGS present, from the text of /proc/cpuinfo (x86 or arm)."""
    model, flags = "", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and not model:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    return model, [f for f in ISA_FLAGS if f in flags]


def has_fast_int8(profile: DeviceProfile) -> bool:
    """True when the CPU has an int8 dot-product instruction (VNNI, AMX, arm dotprod/i8mm)."""
    return bool(_FAST_INT8 & set(profile.isa))


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:3]:
        where = ".".join(str(p) for p in err.get("loc", ())) or "profile"
        parts.append(f"field {where!r}: {err.get('msg')}")
    more = len(exc.errors()) - 3
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def profile_from_dict(data: object, source: str = "profile") -> DeviceProfile:
    """Validate a dict as a DeviceProfile. Raises DeviceError naming the offending field."""
    try:
        return DeviceProfile.model_validate(data)
    except ValidationError as exc:
        raise DeviceError(f"{source} is not a valid device profile: {_validation_message(exc)}",
                          "fix the field or probe the box again with `toco probe --json FILE`") from None


def load_profile(path: str | Path) -> DeviceProfile:
    """Read a profile from a JSON file.

    Raises DeviceError for a missing/unreadable file, invalid JSON, or a wrong, missing or
    unknown field (the message names it).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DeviceError(f"device profile {path} does not exist",
                          "check the path or run `toco probe --json`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceError(f"device profile {path} cannot be read: {exc}", "check the file") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeviceError(f"device profile {path} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}",
                          "fix the file or write it again with `toco probe --json`") from None
    return profile_from_dict(data, f"device profile {path}")


def save_profile(profile: DeviceProfile, path: str | Path) -> Path:
    """Write the profile as indented JSON (parent directories created). Returns the path.

    Raises DeviceError when the file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(profile.model_dump_json(indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise DeviceError(f"cannot write device profile {path}: {exc}", "choose a writable path") from None
    return path


def with_budgets(profile: DeviceProfile, memory: int | None = None, storage: int | None = None,
                 latency_s: float | None = None) -> DeviceProfile:
    """Copy of the profile with the given budgets set (a given value replaces the old budget).

    Takes bytes for memory/storage and seconds for latency. Raises ConfigError for a value <= 0.
    """
    updates = {"memory_budget": memory, "storage_budget": storage, "latency_budget_s": latency_s}
    for key, value in updates.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key.replace('_', ' ')} must be > 0, got {value}", "give a positive size or time")
    changes = {k: v for k, v in updates.items() if v is not None}
    return profile.model_copy(update=changes)


def usable_memory(profile: DeviceProfile) -> int:
    """Bytes the model may use at run time: min(available_memory, memory_budget)."""
    if profile.memory_budget is None:
        return profile.available_memory
    return min(profile.available_memory, profile.memory_budget)


def usable_storage(profile: DeviceProfile) -> int:
    """Bytes the model may occupy on disk: min(free_storage, storage_budget)."""
    if profile.storage_budget is None:
        return profile.free_storage
    return min(profile.free_storage, profile.storage_budget)
