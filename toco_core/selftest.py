"""The self-test gate: a compressed model is only accepted if it behaves as predicted."""

from __future__ import annotations

import math

import numpy as np
import onnx

from toco_core.fidelity import OutputKind
from toco_core.model_inputs import Batch
from toco_core.plan import SelfTestResult
from toco_core.runtime import run_model
from toco_core.task_kind import CLASSIFIER, TaskSpec, compare


def gate_margin(predicted: float, budget: float, n: int) -> float:
    """Allowed excess over the prediction: two binomial standard errors at max(predicted, budget),
    at least 0.2 percentage points: sqrt(p (1 - p) / n) * 2."""
    p = max(predicted, budget)
    return max(0.002, 2.0 * math.sqrt(p * (1 - p) / max(n, 1)))


def self_test(
    candidate: onnx.ModelProto | bytes,
    base_out: np.ndarray,
    x: Batch,
    predicted: float,
    budget: float,
    kind: OutputKind = "logits",
    task: TaskSpec = CLASSIFIER,
) -> SelfTestResult:
    """Run the candidate on the calibration samples ``x`` and compare with the base outputs in the
    analysis' task kind (``task``, toco_core.task_kind: a share of disagreeing samples for every kind).

    Passes when measured disagreement <= predicted + gate_margin, measured <= budget + 1/n
    (the curves were measured on these same samples, so a measurement over the budget is not
    noise: it is the runtime's own error, e.g. int8 activations on top of the weight point's)
    and the outputs are finite.
    A model that onnxruntime cannot run fails (measured = 1).
    """
    n = len(x)
    margin = gate_margin(predicted, budget, n)
    try:
        out = run_model(candidate, x)
    except Exception:  # a candidate that cannot run is simply a failing candidate
        return SelfTestResult(passed=False, samples=n, predicted=predicted, measured=1.0, margin=margin,
                              kl=float("inf"))
    if out.shape != base_out.shape or not np.isfinite(out).all():
        return SelfTestResult(passed=False, samples=n, predicted=predicted, measured=1.0, margin=margin,
                              kl=float("inf"))
    fid = compare(task, base_out, out, output_kind=kind)
    ok = fid.disagreement <= predicted + margin and fid.disagreement <= budget + 1.0 / n + 1e-12
    return SelfTestResult(passed=ok, samples=n, predicted=predicted,
                          measured=fid.disagreement, margin=margin, kl=fid.kl)
