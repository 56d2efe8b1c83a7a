"""Recompression on the box: plan, build, self-test, measure. Numpy + onnx + onnxruntime.

``recompress`` is what `toco recompress` and the agent run: it plans from the analysis
curves (toco_core.solver), builds the best plan (toco_core.plan_build), gates it with the
self-test, steps down to a gentler plan when the gate fails (bounded), and reports predicted vs
measured numbers.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from toco_core.analysis_result import AnalysisResult
from toco_core.device import DeviceProfile
from toco_core.errors import InfeasibleError, SelfTestError
from toco_core.fidelity import OutputKind
from toco_core.measure import PendingMemory, interleaved_p50s, p50_latency
from toco_core.memory_anchors import Shapes, measure_anchors, memory_may_bind
from toco_core.model_inputs import Batch, shapes
from toco_core.onnx_model import WeightInfo, compressible_weights, model_bytes, output_kind
from toco_core.output_tail import fidelity_view
from toco_core.plan import CompressionPlan, CompressionReport, Policy, SelfTestResult
from toco_core.plan_build import BuiltModel, Progress, as_source, build, with_base_means
from toco_core.runtime_forms import FLOAT, INT8, MemoryAnchor, offered_shares
from toco_core.selftest import self_test
from toco_core.solver import (
    SESSION_OVERHEAD,
    device_limits,
    enumerate_plans,
    is_base_plan,
    less_aggressive,
    plans_for,
    plans_for_device,
    storage_is_built,
)
from toco_core.task_kind import TaskSpec
from toco_core.units import format_size
from toco_core.weight_source import WeightSource, require_plans

SLOWER = 1.05  # a candidate more than 5% slower than the base, in interleaved runs, is slower


def _paired_p50(candidate: onnx.ModelProto | bytes, base: onnx.ModelProto | bytes, x1: Batch,
                threads: int) -> tuple[float, float]:
    """(candidate p50, base p50) from runs of the two interleaved (measure.interleaved_p50s); while the candidate
    looks slower, up to twice more, keeping the pair with the candidate's best ratio. The base's p50
    taken once before the first try is no yardstick: on a 25 us LeNet-5 it read 0.025 ms in one
    recompression and 0.045 ms in the next, and an int8 plan 60% slower than the base then passed."""
    pairs: list[tuple[float, float]] = []
    for _ in range(3):
        cand_p50, base_p50 = interleaved_p50s([candidate, base], x1, threads, max_seconds=0.5)
        pairs.append((cand_p50, base_p50))
        if cand_p50 <= base_p50 * SLOWER:
            break
    return min(pairs, key=lambda pair: pair[0] / pair[1])


def does_no_more_work(candidate: onnx.ModelProto, base: onnx.ModelProto) -> bool:
    """Whether ``candidate`` runs no op the base does not run as often and holds no more weights: per op
    type (and domain) at most the base's count of nodes, and at most as many initializer values in all.

    An fp32 plan of dead channels removed is such a model: it cannot be slower than its base, so the
    gate does not time it against the base. On a 25 us LeNet-5 that comparison is noise (the same
    fp32 plan measured 3% slower in one run and 10% faster in the next), and a plan that failed it
    gave way to a gentler one. Takes two ONNX models; returns a bool.
    """
    def ops(m: onnx.ModelProto) -> Counter[tuple[str, str]]:
        return Counter((n.domain or "ai.onnx", n.op_type) for n in m.graph.node)

    def values(m: onnx.ModelProto) -> int:
        return sum(math.prod(t.dims) for t in m.graph.initializer)

    theirs = ops(base)
    return all(k in theirs and n <= theirs[k] for k, n in ops(candidate).items()) and values(candidate) <= values(base)


def _rss_matters(plan: CompressionPlan, memory_limit: int, weight_bytes: int) -> bool:
    """Measure session RSS (a child process, ~1 s) only where it can decide something: the estimate
    is within 2x of the limit, or the weights are a visible part of RSS and the runtime is not
    fp32 (heavier than the base?). Small models far below their limit skip it."""
    return plan.predicted_memory * 2 > memory_limit or (plan.runtime != FLOAT.name and weight_bytes > SESSION_OVERHEAD)


@dataclass
class _Context:
    """What every candidate is checked against: the base's numbers and the limits."""

    model: onnx.ModelProto
    base_bytes: bytes
    base_out: np.ndarray
    x: Batch
    kind: OutputKind
    task: TaskSpec
    threads: int
    base_p50: float
    memory: int
    storage: int
    weight_bytes: int
    measure_memory: bool
    base_rss: list[int | None]  # [] until first measured, then [bytes or None]
    scored: str | None = None  # the analysis' scored tensor (toco_core.output_tail); None: the first output


def _start_memory(ctx: _Context, plan: CompressionPlan, built: BuiltModel) -> list[PendingMemory]:
    """Start the children measuring the candidate's session RSS (and the base's, the first time)
    where it can decide something (_rss_matters), so they run while the self-test does."""
    if not (ctx.measure_memory and _rss_matters(plan, ctx.memory, ctx.weight_bytes)):
        return []
    x1 = shapes(ctx.x[:1])
    pending = [PendingMemory(model_bytes(built.runnable), x1)]
    if not ctx.base_rss:
        pending.append(PendingMemory(ctx.base_bytes, x1))
    return pending


def _check(ctx: _Context, plan: CompressionPlan, built: BuiltModel, policy: Policy,
           ) -> tuple[SelfTestResult, float | None, int | None, str | None]:
    """Gate one built candidate. Returns (self-test, p50 or None, RSS or None, why it fails or None);
    the why starts with the check that failed (fidelity, storage, latency, memory)."""
    pending = _start_memory(ctx, plan, built)
    try:
        gate = self_test(fidelity_view(built.runnable, ctx.scored), ctx.base_out, ctx.x,
                         plan.predicted_disagreement, policy.budget, ctx.kind, ctx.task)
        if not gate.passed:
            return gate, None, None, (f"fidelity: self-test {gate.measured:.2%} > {gate.predicted:.2%} "
                                      f"+ {gate.margin:.2%}")
        storage_limit = min(ctx.storage, len(ctx.base_bytes))
        if len(built.storage) > storage_limit:
            return gate, None, None, (f"storage: {format_size(len(built.storage))} over the limit "
                                      f"{format_size(storage_limit)}")
        # the children end before the p50 runs: a child on the other core would make it noisier
        measured = [m.result() for m in pending]
    finally:
        for m in pending:
            m.cancel()
    rss = measured[0].rss if measured and measured[0] is not None else None
    if len(measured) > 1:
        ctx.base_rss.append(None if measured[1] is None else measured[1].rss)
    if plan.runtime == FLOAT.name and does_no_more_work(built.runnable, ctx.model):
        p50 = p50_latency(built.runnable, ctx.x[:1], ctx.threads)
    else:
        p50, base_p50 = _paired_p50(built.runnable, ctx.model, ctx.x[:1], ctx.threads)
        if p50 > base_p50 * SLOWER:
            return gate, p50, None, (f"latency: slower than the base (p50 {p50 * 1e3:.3g} ms vs "
                                     f"{base_p50 * 1e3:.3g} ms, their runs interleaved)")
    if policy.latency_s is not None and p50 > policy.latency_s:
        return gate, p50, None, f"latency: p50 {p50 * 1e3:.3g} ms over the limit {policy.latency_s * 1e3:.3g} ms"
    if rss is None:
        return gate, p50, rss, None
    if rss > ctx.memory:
        return gate, p50, rss, f"memory: session RSS {format_size(rss)} (limit {format_size(ctx.memory)})"
    base_rss = ctx.base_rss[0] if ctx.base_rss else None
    if base_rss is not None and rss > base_rss and plan.runtime != FLOAT.name:
        return gate, p50, rss, f"memory: session RSS {format_size(rss)} heavier than the base's {format_size(base_rss)}"
    return gate, p50, rss, None


def _anchors(source: WeightSource, result: AnalysisResult, infos: list[WeightInfo], base_bytes: bytes,
             profile: DeviceProfile, memory_limit: int, x1_shapes: Shapes,
             ) -> dict[str, MemoryAnchor]:
    """This box's session memory of the base (and of an int8 build when it may run int8) where the
    memory limit can decide the plan (toco_core.memory_anchors); {} where it cannot."""
    n = sum(i.size for i in infos)
    prediction = FLOAT.predict_memory(n, max(len(base_bytes) - 4 * n, 0))
    if not memory_may_bind(memory_limit, prediction, 4 * n):
        return {}
    shares = offered_shares(infos, profile)
    int8_plans = ([p for p in enumerate_plans(result, infos, len(base_bytes), shares=shares) if p.runtime == INT8.name]
                  if INT8.name in shares else [])
    kept_share = require_plans(result).kept
    return measure_anchors(base_bytes, x1_shapes, n, shares, int8_plans, lambda p: n * kept_share(p.prune_scale),
                           lambda p: model_bytes(build(source, result, p, correct_biases=False).runnable))


def fitting_after_overshoot(plans: list[CompressionPlan], predicted: int, measured: int,
                            limit: int) -> list[CompressionPlan]:
    """The plans still expected to fit the storage limit once a built model overshot its prediction.

    Every remaining prediction is scaled by the observed error (measured / predicted): the next
    try goes to a plan that fits with the coder's real cost, not to the same size in another
    runtime. Returns them in the original order.
    """
    ratio = measured / max(predicted, 1)
    return [p for p in plans if p.predicted_storage * ratio <= limit]


def plans_by_coded_storage(model: onnx.ModelProto | WeightSource, result: AnalysisResult, base_file_bytes: int,
                           profile: DeviceProfile | None, policy: Policy, infeasible: InfeasibleError,
                           anchors: dict[str, MemoryAnchor] | None = None,
                           before_build: Callable[[CompressionPlan], None] | None = None) -> list[CompressionPlan]:
    """The plans expected to fit the storage limit by the coder's measured cost, when their predictions
    ruled every one out.

    In an analysis that did not build its points' storage forms (before session 25: solver.storage_is_built)
    predicted storage is an entropy estimate of the full model's codes; the storage form codes the model
    that runs (reduced_codes) with adaptive contexts, and comes out smaller (LeNet-5's size plan: 13.0 KB
    predicted, 11.6 KB coded). The smallest plan within budget and memory is built
    once and every prediction scaled by its measured / predicted ratio (fitting_after_overshoot), as
    after an overshoot; each try still checks its real storage form. ``infeasible`` is the planner's
    error, re-raised when memory or the budget rule every plan out; when even the smallest plan's
    coded form is over the limit, a new InfeasibleError names that coded size (and the prediction);
    ``anchors`` and ``before_build`` as in recompress (a box missing the smallest plan's parts stops
    there and fetches them). Returns the plans best first, as plans_for_device.
    """
    memory, storage = device_limits(profile, policy)
    if storage is None or storage_is_built(result):  # no storage limit to meet, or no estimate to correct
        raise infeasible
    source = as_source(model, result)
    infos = compressible_weights(source.reference)
    try:
        within = plans_for(result, infos, base_file_bytes, policy, memory, None, shares=offered_shares(infos, profile),
                           anchors=anchors)
    except InfeasibleError:
        raise infeasible from None
    smallest = min(within, key=lambda p: p.predicted_storage)
    if is_base_plan(smallest):
        raise infeasible
    if before_build is not None:
        before_build(smallest)
    measured = len(build(source, result, smallest).storage)
    fitting = fitting_after_overshoot(within, smallest.predicted_storage, measured, storage)
    if not fitting:  # the number that rules them out is now the coded one, not the prediction
        raise InfeasibleError(
            f"no plan within the fidelity budget {policy.budget:.2%} meets the limits: within budget, the smallest "
            f"plan's storage form is {format_size(measured)} (predicted {format_size(smallest.predicted_storage)}) "
            f"vs {format_size(storage)} allowed",
            needed=infeasible.needed, best={**infeasible.best, "storage": measured})
    return fitting


def device_plans(model: onnx.ModelProto | WeightSource, result: AnalysisResult, base_file_bytes: int,
                 profile: DeviceProfile | None, policy: Policy, anchors: dict[str, MemoryAnchor] | None = None,
                 before_build: Callable[[CompressionPlan], None] | None = None) -> list[CompressionPlan]:
    """The plans a box tries, best first: solver.plans_for_device, or plans_by_coded_storage where
    predicted storage alone rules every plan out. The one planning path of recompress and the fleet
    server's what-if. Raises InfeasibleError as plans_by_coded_storage does."""
    infos = compressible_weights(model.reference if isinstance(model, WeightSource) else model)
    try:
        return plans_for_device(result, infos, base_file_bytes, profile, policy, anchors)
    except InfeasibleError as exc:
        return plans_by_coded_storage(model, result, base_file_bytes, profile, policy, exc, anchors, before_build)


def fitting_after_memory_miss(plans: list[CompressionPlan], missed: CompressionPlan, measured: int,
                              limit: int) -> list[CompressionPlan]:
    """The plans still expected to fit the memory limit once ``missed``'s session RSS (``measured``) missed it.

    The miss is carried over as an offset, not a ratio: most of a session's RSS is onnxruntime's own
    code and arena, the same for every plan of a model (docs/analysis.md), so a plan predicted at P
    is expected at P + (measured - predicted). What remains is therefore lighter, i.e. more pruned,
    than the plan that missed: P + measured - predicted <= limit. Returns them in the original order.

    The offset also carries the missed plan's own prediction error, the size of the differences
    between light plans (0.1-0.3 MB on the 224x224 model: bench/compression.py --models large). So
    when it rules out every plan, the lightest plan lighter than the one that missed is returned
    alone, for one measurement. The prediction counts the weights a prune level keeps, not the whole
    channels a coarser rounding zeroes and the build removes: a plan of the same runtime at least as
    aggressive in both scales is lighter even where its prediction ties (on the 224x224 model, prune
    80% measured 20.5 MB at quant s=0.2 and 20.3 MB at s=0.32), and among equal predictions the most
    aggressive goes first. Once nothing lighter is left the list is empty.
    """
    offset = measured - missed.predicted_memory
    expected = [p for p in plans if p.predicted_memory + offset <= limit]
    lighter = [p for p in plans if p.predicted_memory < missed.predicted_memory or _harsher(p, missed)]
    return expected or ([min(lighter, key=lambda p: (p.predicted_memory, -p.prune_scale, -p.quant_scale))]
                        if lighter else [])


def _harsher(plan: CompressionPlan, than: CompressionPlan) -> bool:
    """Same runtime and prediction, at least as aggressive in both scales, more in one."""
    return (plan.runtime == than.runtime and plan.predicted_memory == than.predicted_memory
            and plan.prune_scale >= than.prune_scale and plan.quant_scale >= than.quant_scale
            and (plan.prune_scale, plan.quant_scale) != (than.prune_scale, than.quant_scale))


# what to do when every try failed the same check; the failure lines start with its name (_check)
_HINTS = {"fidelity": "re-run the analysis with more pool samples, or relax the fidelity budget",
          "storage": "relax the storage limit", "latency": "relax the latency limit or run on a faster box",
          "memory": "relax the memory limit"}


def _failure_hint(why: list[str]) -> str:
    """The hint for a search that ended without a model: the one check every try failed, else all."""
    kinds = {line.split(": ", 2)[1] for line in why if line.count(": ") >= 2}
    return _HINTS[kinds.pop()] if len(kinds) == 1 and kinds <= _HINTS.keys() else \
        "relax the limits, or re-run the analysis with more pool samples"


def recompress(
    model: onnx.ModelProto | WeightSource,
    result: AnalysisResult,
    profile: DeviceProfile,
    policy: Policy,
    progress: Progress = lambda *a: None,
    measure_memory: bool = True,
    before_build: Callable[[CompressionPlan], None] | None = None,
) -> tuple[BuiltModel, CompressionReport]:
    """Plan, build, gate and measure the best model for this device.

    A candidate is accepted when it passes the self-test, its storage form is within the
    limit, it is not slower than the base (p50 at batch 1), meets the latency limit, and -
    where session RSS is measured (see _rss_matters; ``measure_memory=False`` never measures) -
    is not heavier than the base nor over the memory limit. The self-test compares the analysis'
    scored tensor; the built model keeps the base's post-processing tail and every output.
    ``model`` is the fp32 base or a
    WeightSource built from parts, whose master model stands in for the base in the p50 and RSS
    gates. ``before_build(plan)`` runs before each candidate is built and may raise to stop the
    search (a box holding only some parts stops at the first plan needing parts it lacks).
    Raises AnalysisError when the analysis belongs to another model or has no plan table,
    InfeasibleError when no plan meets the limits within budget, SelfTestError when every
    attempt fails.
    """
    t0 = time.perf_counter()
    source = with_base_means(as_source(model, result), result)
    model = source.reference
    infos = compressible_weights(model)
    base_bytes = model_bytes(model)
    mem, sto = device_limits(profile, policy)
    assert mem is not None and sto is not None, "a device profile gives both limits"
    x = result.heldout_x
    anchors = _anchors(source, result, infos, base_bytes, profile, mem, shapes(x[:1])) if measure_memory else {}
    plans = device_plans(source, result, len(base_bytes), profile, policy, anchors, before_build)
    all_plans = list(plans)
    threads = 1 if profile.physical_cores <= 1 else 0
    scored = result.manifest.scored_output
    base_rss: list[int | None] = [anchors[FLOAT.name].rss] if FLOAT.name in anchors else []
    ctx = _Context(model, base_bytes, source.base_out, x, output_kind(fidelity_view(model, scored)), result.task,
                   threads, p50_latency(model, x[:1], threads), mem, sto, 4 * sum(i.size for i in infos),
                   measure_memory, base_rss, scored)
    attempts, why = 0, []
    while plans and attempts < policy.max_tries:
        plan = plans[0]
        attempts += 1
        progress("build", attempts, policy.max_tries)
        if before_build is not None:
            before_build(plan)
        built = build(source, result, plan)
        if plan.runtime != FLOAT.name and all(layer.runtime_format == FLOAT.name for layer in built.layers):
            # no layer fitted the format: this is the fp32 plan of the same scales, say so
            plan = next((p for p in all_plans if p.runtime == FLOAT.name and (p.prune_scale, p.quant_scale)
                         == (plan.prune_scale, plan.quant_scale)), plan)
        gate, p50, rss, failure = _check(ctx, plan, built, policy)
        if failure is None:
            break
        why.append(f"{plan.label}: {failure}")
        if not gate.passed:
            plans = less_aggressive(plans, plan)
        elif len(built.storage) > ctx.storage:
            plans = fitting_after_overshoot(plans, plan.predicted_storage, len(built.storage), ctx.storage)
        elif rss is not None and rss > ctx.memory:
            # stepping down the ranking would try gentler plans, heavier than the one that missed
            plans = fitting_after_memory_miss(plans, plan, rss, ctx.memory)
        else:
            plans = plans[1:]
        plans = [p for p in plans if p != plan]
    else:
        raise SelfTestError(f"no candidate passed its checks within {attempts} attempts: " + "; ".join(why),
                            _failure_hint(why))
    runnable = model_bytes(built.runnable)
    report = CompressionReport(
        model_sha256=result.manifest.model_sha256, plan=plan, layers=built.layers,
        base_file_bytes=len(base_bytes), file_bytes=len(runnable), storage_bytes=len(built.storage),
        base_session_rss=ctx.base_rss[0] if ctx.base_rss else None, session_rss=rss,
        base_p50_s=ctx.base_p50, p50_s=p50, self_test=gate, attempts=attempts, seconds=time.perf_counter() - t0,
    )
    return built, report
