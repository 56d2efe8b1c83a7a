"""The device solver: from the measured calibration curves and a device's limits to a plan.

Planning reads only numbers (curve points, the prune ranks, byte counts); nothing is
compressed or run here, so it takes milliseconds. Every candidate is a measured curve point
(prune scale, quant scale) in one of the runtime forms of toco_core.runtime_forms, each
offered when the box runs its format and the analysis has what it needs:

- ``fp32``: float weights at run time, zero channels removed (real RAM and time saving);
- ``nbits``: as fp32, with MatMul/Gemm weights in MatMulNBits 4-bit (saves RAM);
- ``int8``: full QDQ int8 (weights and activations; QLinearConv / QGemm at run time), offered
  when the box runs that format and the analysis measured its cost (the ``int8`` curve).

The forms' memory predictions, point predictions and tie ranks are read from the registry; the
storage prediction is the point's, whatever the form: the storage form the analysis built at that
point (CurvePoint.storage_bytes), or in older analyses an estimate from its coded bits.

Predictions are the curve values themselves (each prune row's logistic fit, toco_core.analysis.row_fit;
the isotonic envelope in analyses before it): a fair estimate of the held-out
disagreement (the self-test compares it with a measurement). Feasible: predicted
disagreement plus one standard error of its measurement <= budget (disagreement_bound; the
base plan needs no bound), storage and estimated memory within limits, and never larger (file
or memory) than the base. Objective ``fidelity`` ranks by predicted disagreement, then KL,
where differences below the measurement's noise floor are ties, then by storage and memory
(the smaller plan wins a tie); ``size`` ranks by storage, then memory, then disagreement.
``nbits`` has no measured cost of its own (its prediction is the fp32 point's), so it is offered
only at points where no measured runtime fits the limits (memory), and after them in a ranking.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from toco_core.analysis_result import AnalysisResult
from toco_core.calibration import KL_NOISE_FLOOR, PLANNED, CurvePoint, noise_floor
from toco_core.device import DeviceProfile, usable_memory, usable_storage
from toco_core.errors import InfeasibleError
from toco_core.onnx_model import WeightInfo
from toco_core.plan import CompressionPlan, Policy
from toco_core.runtime_forms import (
    FLOAT,
    INT8,
    NBITS,
    RUNTIME_FORMS,
    MemoryAnchor,
    RuntimeForm,
    offered_shares,
    runtime_form,
)
from toco_core.runtime_forms import SESSION_OVERHEAD as SESSION_OVERHEAD  # recompress reads it here
from toco_core.units import format_size
from toco_core.weight_source import require_plans

# The estimate of analyses that did not build their points' storage forms (before session 25).
# Per output channel in the storage form: a float16 step (2 B) and LZMA-packed side information
# (~1.3 B); the non-weight bytes of the ONNX file (graph, biases) shrink to ~0.6 under LZMA
# (measured on LeNet-5: 2553 -> 1500 B); the coder's adaptive tables cost a few % over the static
# estimate. Rounded up: a plan predicted within a storage limit should be within it once built
# (recompress checks the real size too).
CHANNEL_SIDE_BYTES = 4
OTHER_CODED_SHARE = 0.7
CODED_BITS_SLACK = 1.03


def _storage(point: CurvePoint, n_weights: int, n_channels: int, other_bytes: int) -> int:
    if point.quant_scale == 0:
        return other_bytes + 4 * n_weights  # float weights travel as a plain ONNX file
    if point.storage_bytes is not None:  # the analysis built it: no estimate needed
        return point.storage_bytes
    bits = point.coded_bits * CODED_BITS_SLACK if point.coded_bits is not None else point.entropy_bits
    return int(OTHER_CODED_SHARE * other_bytes + n_weights * bits / 8 + n_channels * CHANNEL_SIDE_BYTES)


def candidate_points(result: AnalysisResult) -> list[CurvePoint]:
    """Base + every measured weight-level point of the curves (the ``int8`` runtime curve excluded)."""
    base = CurvePoint(disagreement=0.0, kl=0.0, sparsity=0.0, entropy_bits=32.0, fixed_bits=32.0)
    return [base] + [p for k, c in result.curves.items() if k in PLANNED for p in c.points]


def storage_is_built(result: AnalysisResult) -> bool:
    """Whether the analysis built its points' storage forms (CurvePoint.storage_bytes): its storage
    predictions are then the sizes a box's builds have, so no build finds a plan they ruled out."""
    return any(p.storage_bytes is not None for p in candidate_points(result))


def memory_estimate(runtime: str, n_kept: float, other_bytes: int, share: float = 0.0) -> int:
    """Session RSS estimate of a registered runtime form (RuntimeForm.predict_memory).

    Takes the form's wire name, the kept weights, the non-weight bytes and the share of the
    weights the form holds (MatMulNBits' MatMul/Gemm share; ignored by fp32 and int8). Returns
    bytes. Raises UnregisteredNameError for an unknown form.
    """
    return runtime_form(runtime).predict_memory(n_kept, other_bytes, share)


def _flag_shares(nbits_share: float, int8: bool) -> dict[str, float]:
    # the older spelling of the offered forms: fp32 always, nbits by its share, int8 by a flag
    return {FLOAT.name: 1.0, NBITS.name: nbits_share, INT8.name: 1.0 if int8 else 0.0}


def enumerate_plans(result: AnalysisResult, infos: list[WeightInfo], base_file_bytes: int,
                    nbits_share: float = 0.0, int8: bool = False, *, shares: Mapping[str, float] | None = None,
                    forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS,
                    anchors: Mapping[str, MemoryAnchor] | None = None) -> list[CompressionPlan]:
    """Every candidate plan with its predictions (unfiltered): each curve point in each offered form.

    ``shares`` maps the offered forms to the share of the weights each holds
    (toco_core.runtime_forms.offered_shares; a form absent or at 0 is not offered). Without it,
    fp32, nbits at ``nbits_share`` (MatMul/Gemm weights eligible for 4-bit MatMulNBits) and, when
    ``int8``, full QDQ int8. A form is also left out where the analysis lacks what it needs (int8:
    its measured cost curve, added to each point's). ``forms`` is the registry to read;
    ``anchors`` maps form names to session RSS measured on the box (RuntimeForm.predict_memory;
    the fp32 one stands in for forms without their own). Returns the plans point by point, a
    point's forms in registry order.
    """
    offered = _flag_shares(nbits_share, int8) if shares is None else shares
    n = sum(i.size for i in infos)
    channels = sum(i.shape[i.out_axis] for i in infos)
    other = max(base_file_bytes - 4 * n, 0)
    predictors = [(form, offered[name], predict) for name, form in forms.items()
                  if offered.get(name, 0.0) > 0 and (predict := form.predictor(result.curves)) is not None]
    kept_share = require_plans(result).kept
    anchored = anchors or {}
    plans = []
    for p in candidate_points(result):
        kept = n * kept_share(p.prune_scale)
        common = dict(prune_scale=p.prune_scale, quant_scale=p.quant_scale,
                      predicted_storage=_storage(p, n, channels, other), sparsity=p.sparsity,
                      entropy_bits=p.entropy_bits)
        for form, share, predict in predictors:
            cost = predict(p)
            if cost is not None:
                plans.append(_plan(**common, runtime=form.name, **cost.fields, predicted_disagreement=cost.disagreement,
                                   predicted_kl=cost.kl, predicted_memory=form.predict_memory(
                                       kept, other, share, anchored.get(form.name), anchored.get(FLOAT.name))))
    return plans


def _plan(**fields: Any) -> CompressionPlan:
    # the solver computes every field itself; skipping validation keeps planning in milliseconds
    return CompressionPlan.model_construct(**fields)


def disagreement_bound(predicted: float, samples: int) -> float:
    """One-standard-error upper bound of a disagreement measured on ``samples`` calibration inputs.

    bound = d + sqrt(max(d, 1/n) * (1 - d) / n). The solver keeps a plan only when the bound is
    within the budget: choosing the smallest of ~100 measured points by its own measurement
    favours lucky ones (on the MLP, a point measured at 0.8% flipped 2.0% of unseen digits).
    """
    n = max(samples, 1)
    d = min(max(predicted, 0.0), 1.0)
    return d + float(np.sqrt(max(d, 1.0 / n) * (1.0 - d) / n))


def _samples(result: AnalysisResult) -> int:
    return min((c.samples for c in result.curves.values()), default=1)


def _rank_key(plan: CompressionPlan, objective: str, floor: float,
              forms: Mapping[str, RuntimeForm]) -> tuple[float, ...]:
    unmeasured = not runtime_form(plan.runtime, forms).measured
    if objective == "size":
        return (plan.predicted_storage, unmeasured, plan.predicted_memory, plan.predicted_disagreement)
    # differences a curve cannot resolve (d <= 1/n, KL below its floor) are ties: the smaller plan
    # (storage, then run-time memory) wins them. A form whose own rounding is not on any curve
    # (nbits: its prediction is the fp32 point's) comes after the measured forms among ties.
    d = 0.0 if plan.predicted_disagreement <= floor else round(plan.predicted_disagreement, 6)
    kl = 0.0 if plan.predicted_kl <= KL_NOISE_FLOOR else round(plan.predicted_kl, 5)
    return (d, kl, plan.predicted_storage, unmeasured, plan.predicted_memory)


def is_base_plan(plan: CompressionPlan) -> bool:
    """True for the plan that keeps the base model as it is (no pruning, no quantization, fp32)."""
    return plan.runtime == FLOAT.name and plan.prune_scale == 0 and plan.quant_scale == 0


def _unmeasured_where_needed(plans: list[CompressionPlan], forms: Mapping[str, RuntimeForm]) -> list[CompressionPlan]:
    """``plans`` without a form that has no measured cost of its own (nbits: its prediction is the fp32
    point's) at a point where a measured form fits the same limits: it is there for memory that
    nothing measured leaves. Order kept.

    As a fallback it ran with error nobody predicted: LeNet-5 bn-s1's size plan, fp32 0.9% of
    1,000 unseen digits, nbits 2.1% (both predicted 0.4%), when a noisy p50 at 25 us failed the fp32
    try as slower than the base.
    """
    measured = {(p.prune_scale, p.quant_scale) for p in plans if runtime_form(p.runtime, forms).measured}
    return [p for p in plans
            if runtime_form(p.runtime, forms).measured or (p.prune_scale, p.quant_scale) not in measured]


def feasible_plans(plans: list[CompressionPlan], policy: Policy, memory_limit: int | None,
                   storage_limit: int | None, base_file_bytes: int, samples: int = 500,
                   forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS) -> list[CompressionPlan]:
    """Plans within budget and limits, best first. Raises InfeasibleError with the numbers.

    ``samples`` is the calibration curves' sample count (its 1/n is the tie floor of the
    fidelity objective); ``forms`` the registry the plans' runtimes are in. A plan never uses
    more storage or estimated memory than the base plan, which is always within the fidelity
    budget (it is the base model), however few the samples. Raises UnregisteredNameError for a
    plan whose runtime is not in ``forms``.
    """
    base_memory = max((p.predicted_memory for p in plans if is_base_plan(p)), default=None)
    # the base plan is the base model itself: nothing measured, nothing to bound
    within = [p for p in plans
              if is_base_plan(p) or disagreement_bound(p.predicted_disagreement, samples) <= policy.budget]
    ok = [p for p in within
          if (storage_limit is None or p.predicted_storage <= storage_limit)
          and (memory_limit is None or p.predicted_memory <= memory_limit)
          and p.predicted_storage <= max(base_file_bytes, 1)
          and (base_memory is None or p.predicted_memory <= base_memory)]
    if ok:
        floor = noise_floor(samples)
        return sorted(_unmeasured_where_needed(ok, forms), key=lambda p: _rank_key(p, policy.objective, floor, forms))
    smallest = min(within, key=lambda p: (p.predicted_storage, p.predicted_memory), default=None)
    needed = {"storage": storage_limit, "memory": memory_limit, "budget": policy.budget}
    best = {} if smallest is None else {"storage": smallest.predicted_storage, "memory": smallest.predicted_memory,
                                        "disagreement": smallest.predicted_disagreement}
    msg = f"no plan within the fidelity budget {policy.budget:.2%} meets the limits"
    if smallest is not None:
        lightest = min(within, key=lambda p: p.predicted_memory)
        parts = []
        if storage_limit is not None and smallest.predicted_storage > storage_limit:
            parts.append(f"the smallest plan needs storage {format_size(smallest.predicted_storage)} "
                         f"vs {format_size(storage_limit)} allowed")
        if memory_limit is not None and lightest.predicted_memory > memory_limit:
            best["memory"] = lightest.predicted_memory
            parts.append(f"the lightest needs memory {format_size(lightest.predicted_memory)} "
                         f"vs {format_size(memory_limit)} allowed")
        if parts:
            msg += ": within budget, " + "; ".join(parts)
    raise InfeasibleError(msg, needed=needed, best=best)


def plans_for(result: AnalysisResult, infos: list[WeightInfo], base_file_bytes: int, policy: Policy,
              memory_limit: int | None, storage_limit: int | None, nbits_share: float = 0.0,
              int8: bool = False, *, shares: Mapping[str, float] | None = None,
              forms: Mapping[str, RuntimeForm] = RUNTIME_FORMS,
              anchors: Mapping[str, MemoryAnchor] | None = None) -> list[CompressionPlan]:
    """enumerate_plans + feasible_plans with the tie floor taken from the curves' sample count."""
    plans = enumerate_plans(result, infos, base_file_bytes, nbits_share, int8, shares=shares, forms=forms,
                            anchors=anchors)
    return feasible_plans(plans, policy, memory_limit, storage_limit, base_file_bytes, _samples(result), forms)


def device_limits(profile: DeviceProfile | None, policy: Policy) -> tuple[int | None, int | None]:
    """(memory, storage) bytes a plan may use: the tighter of the profile's usable ones and the policy's."""
    def tighter(*values: int | None) -> int | None:
        present = [v for v in values if v is not None]
        return min(present) if present else None

    if profile is None:
        return policy.memory, policy.storage
    return tighter(usable_memory(profile), policy.memory), tighter(usable_storage(profile), policy.storage)


def plans_for_device(result: AnalysisResult, infos: list[WeightInfo], base_file_bytes: int,
                     profile: DeviceProfile | None, policy: Policy,
                     anchors: Mapping[str, MemoryAnchor] | None = None) -> list[CompressionPlan]:
    """The plans a box gets, best first: its runtime forms, its limits (device_limits), the curves' tie floor.

    The one planning path of the agent's recompression and the server's what-if, so a what-if
    answer is the plan the box will try first. ``profile=None``: the policy's limits, and only the
    forms that need no device format (fp32). ``anchors``: session RSS the box measured
    (toco_core.memory_anchors); the what-if has none and predicts memory from constants.
    Raises InfeasibleError with the numbers when no plan fits.
    """
    memory, storage = device_limits(profile, policy)
    return plans_for(result, infos, base_file_bytes, policy, memory, storage, shares=offered_shares(infos, profile),
                     anchors=anchors)


def less_aggressive(plans: list[CompressionPlan], failed: CompressionPlan) -> list[CompressionPlan]:
    """The plans strictly gentler than ``failed`` in at least one scale (the self-test step-down)."""
    return [p for p in plans if not (p.prune_scale >= failed.prune_scale and p.quant_scale >= failed.quant_scale)]
