"""The device solver: from the measured calibration curves and a device's limits to a plan.

Planning reads only numbers (curve points, the prune ranks, byte counts); nothing is
compressed or run here, so it takes milliseconds. Every candidate is a measured curve point
(prune scale, quant scale) in one of the runtime forms:

- ``fp32``: float weights at run time, zero channels removed (real RAM and time saving);
- ``nbits``: as fp32, with MatMul/Gemm weights in MatMulNBits 4-bit (saves RAM).

Feasible: predicted disagreement <= budget, storage and estimated memory within limits, and
never larger than the base. Objective ``fidelity`` ranks by predicted disagreement, then
KL, then storage; ``size`` by storage, then disagreement.
"""

from __future__ import annotations

import math

import numpy as np

from toco_core.analysis_result import AnalysisResult
from toco_core.calibration import CurvePoint
from toco_core.errors import InfeasibleError
from toco_core.onnx_model import WeightInfo
from toco_core.plan import CompressionPlan, Policy
from toco_core.units import format_size

# onnxruntime's own session + arena cost for a small CPU model, measured here (~10 MB).
SESSION_OVERHEAD = 10 * 1024 * 1024
# Per output channel in the storage form: step (2-4 B) and side information (~1.5 B).
CHANNEL_SIDE_BYTES = 4
UCB_Z = 1.0


def _channel_max_rank(rank: np.ndarray, out_axis: int) -> np.ndarray:
    return np.moveaxis(rank, out_axis, 0).reshape(rank.shape[out_axis], -1).max(axis=1)


def kept_weight_share(infos: list[WeightInfo], ranks: dict[str, np.ndarray], prune_scale: float) -> float:
    """Share of weights left after removing channels that pruning zeroes entirely.

    A channel goes when every weight's prune rank is <= s; its consumer loses the matching
    inputs too, which this estimate ignores (conservative).
    """
    total = sum(i.size for i in infos)
    removed = 0
    for info in infos:
        dead = _channel_max_rank(ranks[info.name], info.out_axis) <= prune_scale
        if dead.all():
            dead[np.argmax(_channel_max_rank(ranks[info.name], info.out_axis))] = False
        removed += int(dead.sum()) * (info.size // info.shape[info.out_axis])
    return 1.0 - removed / total


def _storage(point: CurvePoint, n_weights: int, n_channels: int, other_bytes: int) -> int:
    if point.quant_scale == 0:
        return other_bytes + 4 * n_weights  # float weights travel as a plain ONNX file
    return int(other_bytes + n_weights * point.entropy_bits / 8 + n_channels * CHANNEL_SIDE_BYTES)


def upper_disagreement(measured: float, n: int, z: float = UCB_Z) -> float:
    """A cautious reading of a disagreement measured on n samples: d + z sqrt(max(d, 1/n)(1 - d)/n).

    The solver picks the most aggressive point that looks within budget, so plain measured values
    carry a winner's curse; one standard error above them keeps held-out surprises rare.
    """
    d = max(measured, 0.0)
    return min(1.0, d + z * math.sqrt(max(d, 1.0 / n) * (1 - d) / n))


def candidate_points(result: AnalysisResult) -> list[CurvePoint]:
    """Base + every measured point of the curves, with disagreement read cautiously (upper bound)."""
    base = CurvePoint(disagreement=0.0, kl=0.0, sparsity=0.0, entropy_bits=32.0, fixed_bits=32.0)
    return [base] + [p.model_copy(update={"disagreement": upper_disagreement(p.disagreement, c.samples)})
                     for c in result.curves.values() for p in c.points]


def enumerate_plans(result: AnalysisResult, infos: list[WeightInfo], base_file_bytes: int,
                    nbits_share: float = 0.0) -> list[CompressionPlan]:
    """Every candidate plan with its predictions (unfiltered).

    ``nbits_share`` is the share of weights in MatMul/Gemm layers eligible for 4-bit MatMulNBits
    (0 disables the nbits runtime).
    """
    n = sum(i.size for i in infos)
    channels = sum(i.shape[i.out_axis] for i in infos)
    other = max(base_file_bytes - 4 * n, 0)
    plans = []
    for p in candidate_points(result):
        kept = kept_weight_share(infos, result.tolerances.prune_rank, p.prune_scale)
        runtimes = ["fp32"] + (["nbits"] if nbits_share > 0 and p.quant_scale > 0 else [])
        for rt in runtimes:
            bytes_per_w = 4.0 if rt == "fp32" else 4.0 * (1 - nbits_share) + 0.56 * nbits_share
            plans.append(CompressionPlan(
                prune_scale=p.prune_scale, quant_scale=p.quant_scale, runtime=rt,
                predicted_disagreement=p.disagreement, predicted_kl=p.kl, predicted_storage=_storage(p, n, channels, other),
                predicted_memory=int(SESSION_OVERHEAD + other + bytes_per_w * n * kept),
                sparsity=p.sparsity, entropy_bits=p.entropy_bits,
            ))
    return plans


def _rank_key(plan: CompressionPlan, objective: str):
    if objective == "size":
        return (plan.predicted_storage, plan.runtime != "fp32", plan.predicted_memory, plan.predicted_disagreement)
    # disagreement comes in steps of 1/n samples; KL is the finer fidelity signal between ties
    # fp32 runtime before nbits at equal storage: its numbers are exactly the measured curve's,
    # while MatMulNBits also rounds activations; nbits wins only where memory limits need it
    return (round(plan.predicted_disagreement, 6), round(plan.predicted_kl, 5), plan.predicted_storage,
            plan.runtime != "fp32", plan.predicted_memory)


def feasible_plans(plans: list[CompressionPlan], policy: Policy, memory_limit: int | None,
                   storage_limit: int | None, base_file_bytes: int) -> list[CompressionPlan]:
    """Plans within budget and limits, best first. Raises InfeasibleError with the numbers."""
    within = [p for p in plans if p.predicted_disagreement <= policy.budget]
    ok = [p for p in within
          if (storage_limit is None or p.predicted_storage <= storage_limit)
          and (memory_limit is None or p.predicted_memory <= memory_limit)
          and p.predicted_storage <= max(base_file_bytes, 1)]
    if ok:
        return sorted(ok, key=lambda p: _rank_key(p, policy.objective))
    smallest = min(within, key=lambda p: (p.predicted_storage, p.predicted_memory), default=None)
    needed = {"storage": storage_limit, "memory": memory_limit, "budget": policy.budget}
    best = {} if smallest is None else {"storage": smallest.predicted_storage, "memory": smallest.predicted_memory,
                                        "disagreement": smallest.predicted_disagreement}
    msg = "no plan within the fidelity budget {:.2%} meets the limits".format(policy.budget)
    if smallest is not None:
        parts = []
        if storage_limit is not None and smallest.predicted_storage > storage_limit:
            parts.append(f"storage {format_size(smallest.predicted_storage)} needed vs {format_size(storage_limit)} allowed")
        if memory_limit is not None and smallest.predicted_memory > memory_limit:
            parts.append(f"memory {format_size(smallest.predicted_memory)} needed vs {format_size(memory_limit)} allowed")
        msg += ": the smallest plan within budget needs " + ", ".join(parts)
    raise InfeasibleError(msg, needed=needed, best=best)


def less_aggressive(plans: list[CompressionPlan], failed: CompressionPlan) -> list[CompressionPlan]:
    """The plans strictly gentler than ``failed`` in at least one scale (the self-test step-down)."""
    return [p for p in plans if not (p.prune_scale >= failed.prune_scale and p.quant_scale >= failed.quant_scale)]
