"""The runtime forms a plan's weights are served in, as one registry.

A runtime form is how the box's onnxruntime runs the compressed weights: ``fp32`` (float
weights, dead channels removed), ``nbits`` (as fp32, MatMul/Gemm weights in MatMulNBits 4-bit)
or ``int8`` (full QDQ int8, activations too). Everything that differs between forms is a field
of its RuntimeForm: the device format the box must run, the share of the weights it can hold,
its session memory prediction, how it predicts a curve point's cost (the int8 form adds its own
measured curve), how it ranks at ties, the build step that turns the runnable float model into
the form, and the activation-range samples that step reads. The solver, the build, the parts
bundle and plan labels read only this registry, so adding a form touches this module (and
toco_core.device.RuntimeFormat plus the probe when it needs a kernel no form uses yet).

Not properties of a form: storage (every plan stores the entropy-coded codes of its point,
toco_core.solver) and latency (not predicted; the box measures it, toco_core.recompress).

The module stays light (no onnx or onnxruntime at import): plan and message types import it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, get_args

from toco_core.curve_operators import CurveOperator
from toco_core.device import DeviceProfile, RuntimeFormat
from toco_core.errors import UnregisteredNameError

if TYPE_CHECKING:
    import onnx

    from toco_core.calibration import CalibrationCurve, CurvePoint
    from toco_core.model_inputs import Batch
    from toco_core.onnx_model import WeightInfo
    from toco_core.plan_table import PlanTable

# The wire names (CompressionPlan.runtime, PlanSummary.runtime, stored plans). A Literal so
# pydantic validates and describes it as before; the registry below must list exactly these.
Runtime = Literal["fp32", "nbits", "int8"]

# onnxruntime's own session + arena cost for a small CPU model, measured here (13.3-14 MB RSS
# growth for LeNet-5 and the MLP, whose weights are < 1 MB).
SESSION_OVERHEAD = 13 * 1024 * 1024
# RSS per byte of run-time weights: onnxruntime keeps the initializer and a repacked copy
# (NCHWc / prepacked GEMM), plus activations; measured on the 5M CNN: fp32 44.8 MB over the
# overhead for 18 MB of weights, QDQ int8 12.1 MB for 4.5 MB.
FP32_RSS_FACTOR = 2.5
INT8_RSS_FACTOR = 2.7


@dataclass(frozen=True)
class MemoryAnchor:
    """A session RSS measured on this box for one build in a form: what that form's memory
    predictions start from instead of the constants above (toco_core.memory_anchors).

    ``rss``: measured session RSS growth, bytes (toco_core.measure.session_rss); ``kept``: the
    run-time weights of that build; ``share``: the share of them the form held.
    """

    rss: int
    kept: float
    share: float = 0.0


@dataclass(frozen=True)
class Prediction:
    """A form's predicted cost at one curve point, plus plan fields only that form sets."""

    disagreement: float
    kl: float
    fields: Mapping[str, float] = field(default_factory=dict)


PointPredictor = Callable[["CurvePoint"], Prediction | None]  # None: the form is not offered at this point


@dataclass(frozen=True)
class BuildStep:
    """What a form's build step starts from: the runnable float model of a plan's point."""

    runnable: onnx.ModelProto  # dead channels already removed
    table: PlanTable
    point: int  # the point's row in the table
    range_x: Batch  # the analysis samples: activation ranges, never the self-test's samples


# the model in the form, and the per-layer format of each layer it converted (others stay fp32)
Converted = tuple["onnx.ModelProto", dict[str, str]]


@dataclass(frozen=True)
class RuntimeForm:
    """One runtime form: its wire name and label, and every hook the solver and build call.

    ``device_format``: what the box must run to be offered the form (None: every box);
    ``holds(infos)``: share of the weights the form can hold (0: not offered);
    ``weight_rss(n_kept, share)``: session RSS of the run-time weights, bytes;
    ``predictor(curves)``: the point predictor for an analysis (None: it lacks what the form needs);
    ``measured``: its predictions include its own measured cost (else they are the fp32 point's,
    so at equal size it ranks after the measured forms); ``cost_curve``: the curve of that cost;
    ``range_samples``: analysis samples its build reads for activation ranges (0: none);
    ``build(step)``: the form made real (toco_core.plan_build.build).
    """

    name: str
    label: str
    description: str
    device_format: RuntimeFormat | None
    holds: Callable[[Sequence[WeightInfo]], float]
    weight_rss: Callable[[float, float], float]
    predictor: Callable[[Mapping[str, CalibrationCurve]], PointPredictor | None]
    build: Callable[[BuildStep], Converted]
    measured: bool = True
    cost_curve: CurveOperator | None = None
    range_samples: int = 0

    def predict_memory(self, n_kept: float, other_bytes: int, share: float = 0.0,
                       anchor: MemoryAnchor | None = None, fallback: MemoryAnchor | None = None) -> int:
        """Session RSS estimate: what does not scale with the weights + the form's weight RSS.

        Takes the kept weights, the model's non-weight bytes and the share the form holds
        (``holds``); returns bytes. Without anchors the rest is SESSION_OVERHEAD + ``other_bytes``
        (constants measured on other models: 20-26 % low for LeNet-5 under onnxruntime 1.2x). With
        ``anchor`` (a build in this form measured on this box) it is what that measurement leaves
        after its own weights, ``rest = anchor.rss - weight_rss(anchor.kept, anchor.share)``, which
        holds the session, the activations and the graph as this box's onnxruntime lays them out;
        ``fallback`` (the fp32 base measured here) stands in for a form with no anchor of its own:
        ``rest = fallback.rss - FP32.weight_rss(fallback.kept)``.
        """
        if anchor is not None:
            rest = anchor.rss - self.weight_rss(anchor.kept, anchor.share)
        elif fallback is not None:
            rest = fallback.rss - FP32_RSS_FACTOR * 4.0 * fallback.kept
        else:
            rest = SESSION_OVERHEAD + other_bytes
        return int(max(rest, 0) + self.weight_rss(n_kept, share))


def _all_weights(infos: Sequence[WeightInfo]) -> float:
    return 1.0


def _matmul_weights(infos: Sequence[WeightInfo]) -> float:
    # MatMulNBits holds 2-D MatMul/Gemm weights only
    total = sum(i.size for i in infos)
    return sum(i.size for i in infos if i.op_type in ("MatMul", "Gemm") and len(i.shape) == 2) / total


def _point_itself(point: CurvePoint) -> Prediction | None:
    return Prediction(point.disagreement, point.kl)


def _quantized_point(point: CurvePoint) -> Prediction | None:
    # the base point runs as it is; every other form starts from the master's codes
    return None if point.quant_scale == 0 else Prediction(point.disagreement, point.kl)


def _int8_predictor(curves: Mapping[str, CalibrationCurve]) -> PointPredictor | None:
    """The point's cost plus the int8 curve's: d = d_point + d_int8, KL = KL_point + KL_int8."""
    from toco_core.calibration import int8_scale  # calibration imports this module

    curve = curves.get(CurveOperator.INT8)
    if curve is None or not curve.points:
        return None
    cost, free_scale = curve.points[0], int8_scale(curves)

    def predict(point: CurvePoint) -> Prediction | None:
        scale = max(free_scale, point.quant_scale)
        if point.quant_scale == 0 or not scale > 0:
            return None
        return Prediction(min(1.0, point.disagreement + cost.disagreement), point.kl + cost.kl,
                          {"int8_scale": scale})

    return predict


def _as_float(step: BuildStep) -> Converted:
    return step.runnable, {}


def _as_int8(step: BuildStep) -> Converted:
    from toco_core.compression.qdq_int8 import (  # slow import
        nodes_of_weights,
        quantize_qdq_int8,
        without_zero_bias_points,
    )

    layers = [t for k, t in enumerate(step.table.tensors) if step.table.int8[step.point, k]]
    nodes = nodes_of_weights(step.runnable, layers)
    if not nodes:
        return step.runnable, {}
    # activation ranges from the analysis samples, not the calibration samples: the self-test
    # on the latter must stay out of sample (ranges fitted to them looked 0.5 points better
    # than on unseen digits for the MLP)
    runnable = without_zero_bias_points(quantize_qdq_int8(step.runnable, nodes, step.range_x[:INT8.range_samples]))
    return runnable, {k: RuntimeFormat.QDQ_INT8.value for k in layers}


def _as_nbits(step: BuildStep) -> Converted:
    from toco_core.compression.matmul_nbits import quantize_matmul_nbits
    from toco_core.onnx_model import compressible_weights

    table, i = step.table, step.point
    blocks = {t: (4, int(table.nbits_block[i, k])) for k, t in enumerate(table.tensors) if table.nbits_block[i, k]}
    shrunk = {w.name for w in compressible_weights(step.runnable)}
    choices = {k: c for k, c in blocks.items() if k in shrunk}
    if not choices:
        return step.runnable, {}
    return quantize_matmul_nbits(step.runnable, choices), {k: f"nbits{b}/b{blk}" for k, (b, blk) in choices.items()}


FP32 = RuntimeForm(
    name="fp32", label="fp32", description="float weights, zero output channels removed",
    device_format=None, holds=_all_weights,
    weight_rss=lambda n_kept, share: FP32_RSS_FACTOR * 4.0 * n_kept,
    predictor=lambda curves: _point_itself, build=_as_float)
NBITS = RuntimeForm(
    name="nbits", label="nbits", description="as fp32, MatMul/Gemm weights in MatMulNBits 4-bit blocks",
    device_format=RuntimeFormat.MATMUL_NBITS4, holds=_matmul_weights,
    # 0.56 B per held weight: 4 bits + the block scales
    weight_rss=lambda n_kept, share: FP32_RSS_FACTOR * (4.0 * (1 - share) + 0.56 * share) * n_kept,
    # its own rounding is on no curve: it predicts the fp32 point's cost
    predictor=lambda curves: _quantized_point, build=_as_nbits, measured=False)
INT8 = RuntimeForm(
    name="int8", label="int8", description="full QDQ int8, weights and activations (QLinearConv / QGemm)",
    device_format=RuntimeFormat.QDQ_INT8, holds=_all_weights,
    weight_rss=lambda n_kept, share: INT8_RSS_FACTOR * 1.0 * n_kept,
    predictor=_int8_predictor, build=_as_int8, cost_curve=CurveOperator.INT8,
    # onnxruntime's calibrator needs no more for activation ranges; more add time, not accuracy
    range_samples=100)

# name -> form, in the order the solver lists a point's plans (ties keep this order)
RUNTIME_FORMS: Mapping[str, RuntimeForm] = MappingProxyType({f.name: f for f in (FP32, NBITS, INT8)})
# the form of the base plan and of every layer no other form converted
FLOAT = FP32

if set(get_args(Runtime)) != set(RUNTIME_FORMS):
    raise ImportError(f"Runtime {get_args(Runtime)} and the registry {tuple(RUNTIME_FORMS)} disagree")


def runtime_form(name: str, forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS) -> RuntimeForm:
    """The form called ``name`` on the wire.

    Takes a name such as ``"int8"`` and optionally a registry other than RUNTIME_FORMS;
    returns its RuntimeForm. Raises UnregisteredNameError naming the known forms otherwise.
    """
    try:
        return forms[name]
    except KeyError:
        raise UnregisteredNameError("runtime form", name, list(forms)) from None


def offered_shares(infos: Sequence[WeightInfo], profile: DeviceProfile | None,
                   forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS) -> dict[str, float]:
    """The forms a box can be offered, each with the share of the weights it holds.

    Takes the compressible weights and the box's profile (None: no profile, only forms that
    need no device format). Returns {form name: share > 0}, in registry order.
    """
    out = {}
    for form in forms.values():
        if form.device_format is not None and (profile is None or form.device_format not in profile.formats):
            continue
        share = form.holds(infos)
        if share > 0:
            out[form.name] = share
    return out


def cost_curves(forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS) -> tuple[CurveOperator, ...]:
    """The curves of the forms' own measured costs (a box plans from them with the planned ones)."""
    return tuple(f.cost_curve for f in forms.values() if f.cost_curve is not None)


def range_samples_needed(curves: Mapping[str, object], forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS) -> int:
    """Analysis samples a box needs for the activation ranges of any form this analysis offers.

    A form is offered when its cost curve was measured (``curves``' keys). Returns 0 when none reads ranges.
    """
    return max((f.range_samples for f in forms.values() if f.cost_curve is not None and f.cost_curve in curves),
               default=0)
