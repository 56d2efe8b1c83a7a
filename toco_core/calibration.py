"""Calibration curves: what a compression scale really costs, measured on held-out samples.

The quadratic prediction 1/2 sum F delta^2 is 10-100x too optimistic once many weights move
(docs/design_notes.md), so each operator is applied for real on a grid of scales and the
disagreement, KL (and accuracy with labels) against the base are measured with onnxruntime, in
the analysis' task kind (toco_core.task_kind: for the kinds that are not classifiers ``kl``
holds the kind's continuous divergence, also in nats).
Curves are stored as a monotone envelope (disagreement never decreases with the scale), the
conservative reading for a device predicting its fidelity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import onnx
from pydantic import BaseModel, Field, field_serializer

from toco_core.curve_operators import PLANNED as PLANNED  # the curves a plan is taken from
from toco_core.curve_operators import CurveOperator, curve_operator
from toco_core.fidelity import OutputKind
from toco_core.model_inputs import Batch
from toco_core.runtime import run_model
from toco_core.runtime_forms import INT8
from toco_core.task_kind import CLASSIFIER, TaskSpec, compare

# calibration samples onnxruntime's int8 calibrator sees (activation ranges), as a box's int8 build
INT8_CALIBRATION_SAMPLES = INT8.range_samples
# Besides the PLANNED curves an analysis holds ``master``, the sweep that fixed the master
# precision (its points are not functions of the final master), and ``int8``, a runtime's own cost.

# KL(base || compressed) below this (nats per sample) is indistinguishable from float rounding
# and sample noise on a few hundred samples: the int8 runtime alone measures 1e-5-1.2e-4. At
# 1e-3 the MLP's roomy plan flipped 0.4% of unseen digits while its curve said 0.07%.
KL_NOISE_FLOOR = 2e-4
# Significant digits a curve point's measurements keep when written. They come from a few hundred
# samples, so the seventh digit is noise; every box reads the curves in its bundle head (LeNet-5:
# 3.6 -> 1.9 KB after LZMA). Rounded on every write, so the server's what-if (from the analysis
# directory) and a box (from its bundle) plan from the same numbers.
MEASURED_DIGITS = 6


class CurvePoint(BaseModel):
    """One measured point: the scales used and what they cost."""

    prune_scale: float = 0.0
    quant_scale: float = 0.0
    disagreement: float = Field(ge=0, le=1)
    kl: float = Field(ge=0)
    accuracy: float | None = None
    sparsity: float
    entropy_bits: float = Field(description="zero-order entropy of the codes, bits per weight")
    coded_bits: float | None = Field(None, description="bits per weight the storage coder writes (estimate); "
                                                       "None in older analyses: use entropy_bits")
    fixed_bits: float = Field(description="mean fixed-width bits per weight")
    storage_bytes: int | None = Field(None, ge=0, description="bytes of the storage form a box builds at this "
                                                               "point, measured by the analysis; None in older "
                                                               "analyses and on curves no plan reads")

    @field_serializer("disagreement", "kl", "accuracy", "sparsity", "entropy_bits", "coded_bits", "fixed_bits")
    def _measured(self, v: float | None) -> float | None:
        return None if v is None else float(f"{v:.{MEASURED_DIGITS}g}")


class CalibrationCurve(BaseModel):
    """Measured points of one operator, ordered by its scale, with a monotone disagreement."""

    operator: CurveOperator
    samples: int
    points: list[CurvePoint]


def _isotonic(x: list[float], y: list[float]) -> np.ndarray:
    """Least-squares non-decreasing fit of y over x (pool-adjacent-violators), one value per x.

    Measurements at one x are pooled first (their mean, weighted by their count), as scikit-learn's
    IsotonicRegression does; scipy's isotonic_regression then fits the pooled means (scipy.optimize
    imports in a third of scikit-learn's 1.1 s, a cost every ``toco analyze`` paid).
    Unlike a running maximum it does not ride on the noisiest high measurement.
    """
    from scipy.optimize import isotonic_regression  # analysis side only

    _, at, counts = np.unique(np.asarray(x, float), return_inverse=True, return_counts=True)
    means = np.bincount(at, weights=np.asarray(y, float)) / counts
    fit: np.ndarray = isotonic_regression(means, weights=counts.astype(float), increasing=True).x
    return fit[at]


def monotone(points: list[CurvePoint], key: str) -> list[CurvePoint]:
    """Sort by ``key``; disagreement and KL become isotonic (non-decreasing) fits of the measurements."""
    pts = sorted(points, key=lambda p: getattr(p, key))
    xs = [getattr(p, key) for p in pts]
    dis = _isotonic(xs, [p.disagreement for p in pts])
    kl = _isotonic(xs, [p.kl for p in pts])
    return [p.model_copy(update={"disagreement": float(d), "kl": float(k)})
            for p, d, k in zip(pts, dis, kl, strict=True)]


def monotone_2d(points: list[CurvePoint]) -> list[CurvePoint]:
    """Non-decreasing in both scales: isotonic along the quant scale within each prune level,
    then a running maximum across prune levels at equal quant scale.

    A more aggressive pair is never predicted better than a gentler one.
    """
    rows: dict[float, list[CurvePoint]] = {}
    for p in points:
        rows.setdefault(p.prune_scale, []).append(p)
    fitted = {ps: monotone(row, "quant_scale") for ps, row in sorted(rows.items())}
    out: list[CurvePoint] = []
    best: dict[float, tuple[float, float]] = {}
    for ps in sorted(fitted):
        for p in fitted[ps]:
            d = max(p.disagreement, best.get(p.quant_scale, (0.0, 0.0))[0])
            k = max(p.kl, best.get(p.quant_scale, (0.0, 0.0))[1])
            best[p.quant_scale] = (d, k)
            out.append(p.model_copy(update={"disagreement": d, "kl": k}))
    return out


def measure_int8(model: onnx.ModelProto, x: Batch, base_out: np.ndarray, labels: np.ndarray | None,
                 kind: OutputKind, task: TaskSpec = CLASSIFIER) -> CalibrationCurve:
    """The measured cost of the full QDQ int8 runtime (weights per channel + activations) on x.

    Activation ranges come from the first INT8_CALIBRATION_SAMPLES of x, as a device builds
    them from the bundle's calibration samples. One point: prune and quant scale 0, fixed
    bits 8. A device adds it to the cost of its weight-level point (the two errors are small
    and nearly independent; the self-test measures the sum). Raises ModelError when
    onnxruntime cannot quantize the model.
    """
    from toco_core.compression.qdq_int8 import quantize_qdq_int8  # onnxruntime.quantization: slow import

    q = quantize_qdq_int8(model, None, x[:INT8_CALIBRATION_SAMPLES])
    fid = compare(task, base_out, run_model(q, x), labels, kind)
    point = CurvePoint(disagreement=fid.disagreement, kl=fid.kl, accuracy=fid.accuracy, sparsity=0.0,
                       entropy_bits=32.0, fixed_bits=8.0)
    return CalibrationCurve(operator=CurveOperator.INT8, samples=len(x), points=[point])


def noise_floor(samples: int) -> float:
    """The smallest disagreement a curve of ``samples`` measurements can tell from zero: 1/n."""
    return 1.0 / max(samples, 1)


def int8_scale(curves: Mapping[str, CalibrationCurve]) -> float:
    """Quant scale up to which the quantize curve measured no cost beyond its noise floor.

    The int8 runtime keeps a layer in int8 only where its weight error is within tau_hat times
    this scale (or the plan's own quant scale, if larger). 0 when no such point exists.
    """
    curve = curves.get(CurveOperator.QUANTIZE)
    if curve is None:
        return 0.0
    free = [p.quant_scale for p in curve.points
            if p.disagreement <= noise_floor(curve.samples) and p.kl <= KL_NOISE_FLOOR]
    return max(free, default=0.0)


def monotone_curve(operator: str, points: list[CurvePoint], samples: int) -> CalibrationCurve:
    """A curve of already measured points, made monotone in its operator's scale (both for a joint one).

    Raises UnregisteredNameError for an operator name no registry holds.
    """
    op = curve_operator(operator)
    fitted = monotone_2d(points) if op.spec.joint else monotone(points, op.spec.scale)
    return CalibrationCurve(operator=op, samples=samples, points=fitted)


def measure_points(
    operator: str,
    grid: list[tuple[float, float]],
    measure: Callable[[float, float], CurvePoint],
    stop_above: float = 0.5,
    on_point: Callable[[int, int], None] | None = None,
) -> list[CurvePoint]:
    """Measure ``grid`` (prune, quant) scale pairs in order; stop a 1-D sweep once it is useless.
    Returns the measured points as measured (no fit).

    For single operators the grid is sorted by aggression and the sweep stops after the first
    point whose disagreement exceeds ``stop_above``. Raises UnregisteredNameError for an
    operator name no registry holds.
    """
    joint = curve_operator(operator).spec.joint
    points: list[CurvePoint] = []
    for i, (ps, qs) in enumerate(grid):
        p = measure(ps, qs)
        points.append(p)
        if on_point:
            on_point(i + 1, len(grid))
        if not joint and p.disagreement > stop_above:
            break
    return points

