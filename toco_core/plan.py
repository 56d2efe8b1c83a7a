"""Plain types of device-aware compression: the policy, a plan, and the report of a run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from toco_core.runtime_forms import Runtime as Runtime  # the runtime forms' wire names
from toco_core.runtime_forms import runtime_form


class Policy(BaseModel):
    """What the fleet and the box ask for: a fidelity budget and optional resource limits."""

    model_config = ConfigDict(extra="forbid")

    budget: float = Field(0.01, gt=0, lt=1, description="max top-1 disagreement with the base model")
    memory: int | None = Field(None, gt=0, description="session memory limit, bytes")
    storage: int | None = Field(None, gt=0, description="model storage/transfer limit, bytes")
    latency_s: float | None = Field(None, gt=0, description="p50 latency limit at batch 1, seconds")
    objective: Literal["fidelity", "size"] = Field(
        "fidelity", description="fidelity: best predicted fidelity, then smallest; size: smallest within budget")
    max_tries: int = Field(4, ge=1, le=10, description="self-test attempts, each less aggressive")


class CompressionPlan(BaseModel):
    """One candidate: weight-level scales, runtime form, and what the curves predict."""

    prune_scale: float = Field(ge=0, description="pruning scale = sparsity share (prune ranks <= s are zeroed)")
    quant_scale: float = Field(ge=0, description="mixed precision scale on tau_hat (0 = keep float)")
    runtime: Runtime = "fp32"  # toco_core.runtime_forms.FLOAT
    int8_scale: float = Field(0.0, ge=0,
                              description="int8 runtime: scale on tau_hat the int8 weight error must stay within")
    structured: bool = True
    predicted_disagreement: float
    predicted_kl: float = Field(0.0, description="measured KL(base || compressed) at this point")
    predicted_storage: int = Field(description="bytes of the storage/transfer form")
    predicted_memory: int = Field(description="estimated session memory, bytes")
    sparsity: float
    entropy_bits: float

    @property
    def label(self) -> str:
        """Short human name, e.g. ``prune 60% + quant s=0.28 / fp32`` (the form's label last).

        Raises UnregisteredNameError for a runtime no registry holds (only unvalidated plans have one).
        """
        parts = []
        if self.prune_scale > 0:
            parts.append(f"prune {self.prune_scale:.0%}")
        if self.quant_scale > 0:
            parts.append(f"quant s={self.quant_scale:.3g}")
        return (" + ".join(parts) or "base") + f" / {runtime_form(self.runtime).label}"


class LayerDecision(BaseModel):
    """What happened to one compressible weight."""

    name: str
    op_type: str
    weights: int
    sparsity: float
    mean_bits: float = Field(description="mean fixed-width bits of its channels (32 = float)")
    channels_kept: int
    channels: int
    runtime_format: str
    bias_shift: float | None = Field(None, description="largest |change| bias correction made to its bias "
                                                       "(None: the layer's bias was not corrected)")


class SelfTestResult(BaseModel):
    """Measured vs predicted disagreement on the calibration samples."""

    passed: bool
    samples: int
    predicted: float
    measured: float
    margin: float
    kl: float


class CompressionReport(BaseModel):
    """Everything a person or the server wants to know about one recompression."""

    model_sha256: str
    plan: CompressionPlan
    layers: list[LayerDecision]
    base_file_bytes: int
    file_bytes: int = Field(description="runnable ONNX model")
    storage_bytes: int = Field(description="storage form on the box (entropy-coded codes of this plan)")
    download_bytes: int | None = Field(None, description="bytes of the parts bundle this plan needs "
                                                          "(toco_core.parts_bundle.BundleHead.parts_for_plan)")
    bundle_bytes: int | None = Field(None, description="bytes of the full parts bundle, without the optional fp32 part")
    base_session_rss: int | None = None
    session_rss: int | None = None
    base_p50_s: float | None = None
    p50_s: float | None = None
    self_test: SelfTestResult
    attempts: int
    heldout_fidelity: dict[str, Any] | None = None
    seconds: float
