"""The whole analysis of one ONNX model: QBC loop, closed-form tolerances, iterated pruning
rounds, calibration curves. Torch (through the graph evaluator and Fisher) plus onnxruntime.

Phases, each reported to ``progress(phase, done, total)``:
1. ``qbc``: Fisher on the analysis set S, tolerance, committee at a scale that disagrees a
   little, add the most disputed pool samples to S; stop on a stable tolerance map.
2. ``prune``: order the weights by the K-FAC greedy pruning score (prune_order.py), in
   ``prune_rounds`` rounds re-measured at the pruned point; the order is the prune rank.
3. ``calibrate``: each operator applied for real on a grid of scales, measured on held-out.
4. ``storage``: every planned point's storage form built as a box builds it; its size is the
   point's storage prediction (storage_forms.py).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import onnx
import torch

from toco_core.analysis.fisher import FisherAccumulator
from toco_core.analysis.graph_eval import GraphEvaluator
from toco_core.analysis.input_moments import InputMoments
from toco_core.analysis.nested_calibration import GridMap, NestedCalibration
from toco_core.analysis.pool_split import PoolSplit, pool_outputs, split_pool
from toco_core.analysis.prune_order import prune_scores
from toco_core.analysis.row_fit import row_fitted_curves
from toco_core.analysis.settings import AnalysisSettings
from toco_core.analysis.side_by_side import local_map
from toco_core.analysis.storage_forms import with_storage_forms
from toco_core.analysis.torch_inputs import to_torch
from toco_core.analysis_result import AnalysisManifest, AnalysisResult, RoundStats
from toco_core.bias_parts import PointDeltas
from toco_core.calibration import PLANNED, CalibrationCurve, int8_scale, measure_int8, measure_points, monotone_curve
from toco_core.compression.bias_correction import BiasCorrection
from toco_core.compression.compensated_rounding import layer_hessians
from toco_core.errors import ModelError, PoolError
from toco_core.fidelity import OutputKind
from toco_core.malloc_tuning import fix_mmap_threshold
from toco_core.model_inputs import Batch
from toco_core.onnx_model import WeightInfo, compressible_weights, input_spec, model_hash, output_kind, read_weights
from toco_core.output_tail import scored_head, scored_output
from toco_core.plan_table import PlanTable
from toco_core.qbc import committee_outputs, select_top
from toco_core.rounding_parts import PointRounding
from toco_core.runtime import run_model
from toco_core.task_kind import (
    CLASSIFIER,
    TaskKind,
    TaskSpec,
    committee_disagreement,
    committee_score,
    detect_task_kind,
    output_width,
    parse_task_kind,
    prepare,
    task_spec,
)
from toco_core.tolerance import closed_form_tolerance, log_tolerance_change, scaled
from toco_core.tolerance_map import ToleranceMap, as_stored

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
_SCALE_SAMPLES = 128  # held-out samples the committee-scale bisection runs on (7 steps x 4 members)
PRUNE_GRID = [0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95]
QUANT_GRID = [float(q) for q in np.geomspace(3e-3, 3.0, 16)]
# the combined grid is dense where 1% budgets are usually met (measured on the demo models): 1.25x
# steps in the quant scale and 5-point steps in sparsity between 0.55 and 0.8, where the size of
# a 1% plan is decided (a coarse grid makes the solver settle for the next gentler point)
COMBO_PRUNE = [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8]
COMBO_QUANT = [float(q) for q in np.geomspace(0.1, 0.8, 10)]


def _noop(phase: str, done: int, total: int) -> None:
    pass


def _check_evaluator(ev: GraphEvaluator, model: onnx.ModelProto, x: Batch) -> None:
    """Refuse to analyse if the torch evaluation differs from onnxruntime (never a silent wrong answer)."""
    with torch.no_grad():
        mine = ev(to_torch(x)).numpy()
    ref = run_model(model, x)
    err = float(np.abs(mine - ref).max()) / max(1.0, float(np.abs(ref).max()))
    if err > 1e-3:
        raise ModelError(f"the differentiable evaluation of {model.graph.name!r} differs from onnxruntime "
                         f"(relative error {err:.2g})", "please report the model; analysis would be wrong")


def _committee_scale(model: onnx.ModelProto, weights: dict[str, np.ndarray], tau_hat: dict[str, np.ndarray],
                     x: Batch, base_lp: np.ndarray, kind: OutputKind, s: AnalysisSettings,
                     previous: float | None = None, task: TaskSpec = CLASSIFIER) -> tuple[float, float]:
    """Bisect log2 s until the committee disagrees with the base on ~committee_target of x.

    The first round searches [2^-8, 2^2] in 7 steps; later rounds start from the previous scale
    (+-2 octaves, 4 steps): the map changes little between rounds.
    """
    if previous is None:
        lo, hi, steps = -8.0, 2.0, 7
    else:
        lo, hi, steps = np.log2(previous) - 2, np.log2(previous) + 2, 4
    scale, dis = 1.0, 0.0
    for _ in range(steps):
        scale = float(np.exp2((lo + hi) / 2))
        members = committee_outputs(model, weights, scaled(tau_hat, scale), x, 4, s.seed, task, kind)
        dis = committee_disagreement(task, base_lp, members)
        lo, hi = (np.log2(scale), hi) if dis < s.committee_target else (lo, np.log2(scale))
    return scale, dis


def _fisher(ev: GraphEvaluator, weights: dict[str, np.ndarray], kind: str, x: Batch, seed: int,
            sampled: bool = False, task: TaskSpec = CLASSIFIER) -> FisherAccumulator:
    acc = FisherAccumulator(ev, {k: torch.from_numpy(v) for k, v in weights.items()}, kind=kind, seed=seed,
                            sampled=sampled, task=task)
    acc.add_batch(x)
    return acc


def qbc_rounds(model: onnx.ModelProto, ev: GraphEvaluator, weights: dict[str, np.ndarray], kind: OutputKind,
               pool_x: Batch, heldout_x: Batch, s: AnalysisSettings, progress: Progress,
               task: TaskSpec = CLASSIFIER,
               ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray], list[RoundStats]]:
    """Grow the analysis set by committee disagreement (vote entropy for a classifier, committee
    variance for the other task kinds: toco_core.task_kind.committee_score). Returns (S indices,
    fisher, tau_hat, rounds)."""
    rng = np.random.default_rng(s.seed)
    base_pool = prepare(task, run_model(model, pool_x), kind)
    base_held = prepare(task, run_model(model, heldout_x[:_SCALE_SAMPLES]), kind)
    chosen = rng.choice(len(pool_x), size=min(s.initial_samples, len(pool_x)), replace=False)
    acc = _fisher(ev, weights, kind, pool_x[chosen], s.seed, task=task)
    rounds: list[RoundStats] = []
    tau_prev = None
    for r in range(1, s.max_rounds + 1):
        t0 = time.perf_counter()
        tau_hat = closed_form_tolerance(acc.result(), weights, floor_rel=s.floor_rel)
        change = None if tau_prev is None else log_tolerance_change(tau_hat, tau_prev, weights)
        # the bisection's last step measured the committee on held-out samples: its disagreement is
        # the round's held-out figure (a second committee on all of them cost 8 more model runs)
        scale, held_dis = _committee_scale(model, weights, tau_hat, heldout_x[:_SCALE_SAMPLES], base_held, kind, s,
                                           rounds[-1].committee_scale if rounds else None, task)
        members = committee_outputs(model, weights, scaled(tau_hat, scale), pool_x, s.committee_members, s.seed + r,
                                    task, kind)
        scores = committee_score(task, base_pool, members)
        room = np.setdiff1d(np.arange(len(pool_x)), chosen)
        pick = select_top(scores, s.samples_per_round, exclude=chosen)
        rand = rng.choice(room, size=min(len(pick), len(room)), replace=False) if len(room) else room
        rounds.append(RoundStats(
            round=r, samples=len(chosen), committee_scale=scale,
            committee_disagreement_heldout=held_dis,
            selected_score_mean=float(scores[pick].mean()) if len(pick) else 0.0,
            random_score_mean=float(scores[rand].mean()) if len(rand) else 0.0,
            tolerance_change=change, seconds=time.perf_counter() - t0,
        ))
        log.info("qbc round", extra={"fields": rounds[-1].model_dump()})
        progress("qbc", r, s.max_rounds)
        stable = change is not None and change < s.tolerance_change_stop
        if stable or len(pick) == 0 or r == s.max_rounds:
            break
        acc.add_batch(pool_x[pick])
        chosen = np.concatenate([chosen, pick])
        tau_prev = tau_hat
    fisher = acc.result()
    return chosen, fisher, closed_form_tolerance(fisher, weights, floor_rel=s.floor_rel), rounds


def prune_ranks(ev: GraphEvaluator, weights: dict[str, np.ndarray], fisher: dict[str, np.ndarray], kind: OutputKind,
                x: Batch, s: AnalysisSettings, progress: Progress,
                task: TaskSpec = CLASSIFIER) -> dict[str, np.ndarray]:
    """Pruning order from the K-FAC greedy scores (prune_order.py); r_i = the sparsity at which
    weight i is pruned (exact zeros: 0).

    Round j of ``prune_rounds`` prunes to sparsity 1 - (1 - max_sparsity)^(j / rounds) by the
    lowest scores among the survivors, scored with the Fisher and input moments measured on
    ``x`` at the model pruned so far (round 1: the base and the QBC Fisher); the last round
    orders all survivors. Measured on LeNet-300-100 (no retraining, 1000 held-out digits): 77%
    sparsity at 98% agreement vs 64% with layer-normalised OBD in six Fisher-refreshed rounds.
    """
    names = list(weights)
    sizes = np.cumsum([weights[k].size for k in names])[:-1]
    pruned = np.concatenate([(weights[k] == 0).ravel() for k in names])
    n = pruned.size
    rank = np.where(pruned, 0.0, 1.0)
    done = int(pruned.sum())
    current = dict(weights)
    for j in range(1, s.prune_rounds + 1):
        if j > 1:
            fisher = _fisher(ev, current, kind, x, s.seed + j, sampled=n > 300_000, task=task).result()
        acc = InputMoments(ev, names)
        acc.add_batch(x)
        masks = {k: m.reshape(weights[k].shape) for k, m in zip(names, np.split(pruned, sizes), strict=True)}
        score = prune_scores(current, fisher, acc.result(), masks, s.floor_rel)
        order = np.argsort(np.concatenate([score[k].ravel() for k in names]), kind="stable")
        order = order[~pruned[order]]  # survivors, least important first
        last = j == s.prune_rounds
        target = n if last else int(round(n * (1 - (1 - s.max_sparsity) ** (j / s.prune_rounds))))
        take = order[: max(target - done, 0)]
        hi = 1.0 if last else target / n
        rank[take] = done / n + (hi - done / n) * (np.arange(1, len(take) + 1) / max(len(take), 1))
        pruned[take] = True
        done += len(take)
        current = {k: np.where(m.reshape(weights[k].shape), 0, weights[k]).astype(np.float32)
                   for k, m in zip(names, np.split(pruned, sizes), strict=True)}
        progress("prune", j, s.prune_rounds)
    return {k: r.reshape(weights[k].shape).astype(np.float32)
            for k, r in zip(names, np.split(rank, sizes), strict=True)}


def prune_grid() -> list[float]:
    """Every prune scale a curve measures, ascending: the prune classes a box receives."""
    return sorted(set(PRUNE_GRID) | set(COMBO_PRUNE))


class Calibrated(NamedTuple):
    """What calibrate measured: curves, plan table, per-point bias deltas and code differences."""

    curves: dict[str, CalibrationCurve]
    table: PlanTable
    deltas: PointDeltas
    rounding: PointRounding | None


def calibrate(model: onnx.ModelProto, infos: list[WeightInfo], weights: dict[str, np.ndarray], tmap: ToleranceMap,
              kind: OutputKind, x: Batch, y: np.ndarray | None, progress: Progress,
              correction_x: Batch | None = None, task: TaskSpec = CLASSIFIER,
              grid_map: GridMap = map, hessians: dict[str, np.ndarray] | None = None) -> Calibrated:
    """Fix the master, then measure each operator on the held-out samples as boxes build it
    (toco_core.analysis.nested_calibration), with biases corrected on ``correction_x`` when given.

    The prune+quantize combination grid's points are independent and are measured through
    ``grid_map`` (default: the builtin, sequential ``map``; a caller may spread them over other
    processes); the 1-D sweeps stop early on their own results, so they stay sequential here.

    With ``hessians`` (compensated_rounding.layer_hessians) every point is rounded against the
    layers' output error.

    Returns the curves (prune scale = sparsity; the ``master`` sweep kept for inspection, never
    planned from), the plan table of every planned point, the bias deltas each was measured
    with, by table row ({} without correction), and the code differences of compensated rounding
    (None without).
    """
    base = run_model(model, x)
    correction = None if correction_x is None else BiasCorrection(model, infos, correction_x)
    nested = NestedCalibration(model, infos, weights, tmap, kind, x, y, base, correction, prune_grid(), task=task,
                               hessians=hessians)
    step = {"n": 0, "total": 2 * len(QUANT_GRID) + len(PRUNE_GRID) + len(COMBO_PRUNE) * len(COMBO_QUANT)}
    ticks = threading.Lock()  # points measured side by side tick from their threads

    def tick(*_: object) -> None:
        with ticks:
            step["n"] += 1
            progress("calibrate", step["n"], step["total"])

    sweep = nested.choose_master(QUANT_GRID, 1.0 / len(x), tick)
    sm = nested.master_scale
    quant = [(0.0, q) for q in QUANT_GRID if q >= sm]
    combos = sorted({(p, max(q, sm)) for p in COMBO_PRUNE for q in COMBO_QUANT})
    step["total"] = step["n"] + len(quant) + len(PRUNE_GRID) + len(combos)
    sweeps = {"prune": [(p, sm) for p in PRUNE_GRID], "quantize": quant}
    here = local_map(sum(i.size for i in infos))
    measured = dict(zip(sweeps, here(lambda op: measure_points(op, sweeps[op], nested.sweep_measure(sweeps[op]),
                                                               on_point=tick), list(sweeps)), strict=True))
    if grid_map is map:  # here: compensated rounding in batches of points; elsewhere each worker rounds its own
        grid = []
        for batch in nested.batches(combos):
            nested.prepare(batch)
            grid += nested.measure_grid(batch, here, tick)
    else:
        nested.prepare([])
        grid = nested.measure_grid(combos, grid_map, tick)
    measured["prune+quantize"] = grid
    curves = {"master": monotone_curve("quantize", sweep, len(x)), **row_fitted_curves(measured, len(x))}
    try:  # the full int8 runtime's own cost; a model onnxruntime cannot quantize simply has no int8 curve
        curves["int8"] = measure_int8(model, x, base, y, kind, task)
    except ModelError as exc:
        log.warning("no int8 calibration: %s", exc)
    points = sorted({(p.prune_scale, p.quant_scale) for k, c in curves.items() if k in PLANNED for p in c.points})
    return Calibrated(curves, nested.final_table(points, int8_scale(curves)), nested.point_deltas(points),
                      nested.point_rounding(points))


def _producer_op(model: onnx.ModelProto) -> str | None:
    """The op type that produces the model's (the head's) first output; None for a graph input."""
    out = model.graph.output[0].name
    return next((str(n.op_type) for n in model.graph.node if out in n.output), None)


def analysis_task(model: onnx.ModelProto, pool_x: Batch | PoolSplit, s: AnalysisSettings) -> TaskSpec:
    """The task kind of the analysis of ``model`` (the head at the scored output) with its metric's numbers.

    ``pool_x`` is the pool or its split (toco_core.analysis.pool_split). ``s.task`` or detected
    (toco_core.task_kind.detect_task_kind) from the scored tensor's producer and width; a
    regression's or score's scale is the base output's spread on the whole pool. Raises
    ConfigError for a kind the output cannot have, PoolError for a constant output where a scale
    is needed.
    """
    # one sample tells the width; only a regression's or score's scale needs the whole pool's outputs
    # (a classifier's analysis does not pay an extra pass over a large image pool)
    first = run_model(model, (pool_x.held_x if isinstance(pool_x, PoolSplit) else pool_x)[:1])
    kind = parse_task_kind(s.task) if s.task else detect_task_kind(_producer_op(model), output_width(first),
                                                                   s.threshold)
    base = _whole_pool_outputs(model, pool_x) if kind in (TaskKind.REGRESSION, TaskKind.SCORE) else first
    return task_spec(kind, base, s.task_tolerance, s.threshold)


def _whole_pool_outputs(model: onnx.ModelProto, pool_x: Batch | PoolSplit) -> np.ndarray:
    if not isinstance(pool_x, PoolSplit):
        return run_model(model, pool_x)
    cand_x = pool_x.cand_x
    if cand_x is None:
        raise PoolError("this pool split was analysed already", "split the pool again for another analysis")
    return pool_outputs(pool_x, run_model(model, pool_x.held_x), run_model(model, cand_x))


def analyze(
    model: onnx.ModelProto,
    pool_x: Batch | PoolSplit,
    pool_y: np.ndarray | None = None,
    settings: AnalysisSettings | None = None,
    progress: Progress = _noop,
    model_name: str = "model",
    grid_map: GridMap = map,
) -> AnalysisResult:
    """Run the full analysis of ``model`` on an unlabeled pool (labels optional).

    The analysis scores one tensor (``settings.output`` or detected, toco_core.output_tail) and
    works on the sub-graph up to it; post-processing after it is left to the device model.
    ``pool_x`` is the pool or its split (toco_core.analysis.pool_split.split_pool, with the
    same ``settings``): a caller that splits first and drops its pool holds the pool once, not
    twice; both give the same result. The split's candidate half is taken from it (freed once
    QBC has picked the analysis samples). Returns the AnalysisResult (not yet saved). Raises
    ModelError / UnsupportedOpError for a model it cannot analyse (or an unknown
    ``settings.output``) and PoolError for a pool too small to split (or a split analysed already).
    ``grid_map`` measures the calibration's combination grid (see calibrate); any map gives the same result.
    """
    s = settings or AnalysisSettings()
    t_start = time.perf_counter()
    given = model  # a box builds its plans from the model as given, tail included
    # the calibration grid creates and frees hundreds of sessions: without a fixed threshold
    # glibc keeps their freed blocks on the heap and RSS creeps up (toco_core.malloc_tuning)
    fix_mmap_threshold()
    sha = model_hash(model)  # of the model as given: boxes check it against their base
    scored = scored_output(model, s.output)
    # everything below works on the head: a pass-through tail (ArgMax, label lookup, ZipMap) has
    # no weights to analyse and ops the evaluator need not know
    model = scored_head(model, scored)
    infos = compressible_weights(model)
    weights = read_weights(model, infos)
    kind = output_kind(model)
    # one copy of each half for the whole analysis: a 400-image RGB 224x224 pool is 241 MB, and
    # indexing it afresh per phase held up to three copies at once
    split = pool_x if isinstance(pool_x, PoolSplit) else split_pool(pool_x, s)
    del pool_x  # a caller that split first holds no whole pool at all
    held, held_x, cand_x = split.held, split.held_x, split.take_candidates()
    ev = GraphEvaluator(model, [w.name for w in infos])
    _check_evaluator(ev, model, held_x[:8])
    timings = {}
    t = time.perf_counter()
    task = analysis_task(model, PoolSplit(held, split.cand, held_x, cand_x, split.size), s)
    chosen, fisher, tau_hat, rounds = qbc_rounds(model, ev, weights, kind, cand_x, held_x, s, progress, task)
    timings["qbc"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis_x = cand_x[chosen]
    del cand_x
    ranks = prune_ranks(ev, weights, fisher, kind, analysis_x[: s.prune_round_samples], s, progress, task)
    timings["prune_rounds"] = time.perf_counter() - t
    tmap = as_stored(ToleranceMap(quant=tau_hat, prune_rank=ranks))
    t = time.perf_counter()
    # labels are classes: they mean nothing to the other task kinds' metrics
    hy = None if pool_y is None or task.kind is not TaskKind.CLASSIFIER else pool_y[held]
    hessians = layer_hessians(model, infos, analysis_x) if s.compensated_rounding else None
    curves, table, deltas, rounding = calibrate(model, infos, weights, tmap, kind, held_x, hy, progress,
                                                analysis_x if s.bias_correction else None, task, grid_map, hessians)
    timings["calibrate"] = time.perf_counter() - t
    spec = input_spec(model)
    base_acc = None
    if hy is not None:
        base_acc = float((run_model(model, held_x).argmax(1) == hy).mean())
    manifest = AnalysisManifest(
        model_name=model_name, model_sha256=sha, input_name=spec.name,
        input_shape=list(spec.shape), output_kind=kind, scored_output=scored, weights=sum(w.size for w in infos),
        settings=s.model_dump(), rounds=rounds, samples_used=len(chosen), pool_size=split.size,
        heldout_size=len(held), base_accuracy=base_acc, timings=timings, tensors=tmap.summary(),
        task=None if task == CLASSIFIER else task,
    )
    result = AnalysisResult(manifest, tmap, curves, analysis_x, held_x, hy, plans=table, bias_deltas=deltas or None,
                            rounding=rounding)
    t = time.perf_counter()
    result = with_storage_forms(given, result, progress)
    timings["storage_forms"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_start
    return dataclasses.replace(result, manifest=manifest.model_copy(update={"timings": timings}))
