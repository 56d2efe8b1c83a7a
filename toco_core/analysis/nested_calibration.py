"""Calibration with the nested quantiser: the master, the curves measured as boxes build them,
and the plan table that lets a box rebuild every point from parts.

1. Master sweep: the unpruned model at per-channel steps from s * tau_hat (the coverage rule of
   toco_core.compression.mixed_precision), s up the quant grid, until the first point whose
   disagreement exceeds the noise floor 1/n or whose KL exceeds KL_NOISE_FLOOR. The master is
   the last point at the floor: its steps D_c and codes q = rint(w / D_c).
2. Every curve point (p, s) is then built from q alone: channel octaves chosen by coverage of
   s * tau_hat on the weights that survive pruning at p (octave 0, the master, for s <= the
   master's scale), pruned weights zeroed by prune class, biases corrected, measured. The
   octaves are recorded: a box builds exactly this point.
3. Per point, the int8 and MatMulNBits decisions that read tolerances are made here too.
With the layers' input Hessians, each point's codes are rounded against the layer's output
error (toco_core.compression.compensated_rounding) at the same steps and prune mask, and the
code differences are recorded: a box adds them to the nested codes.
Numpy + onnxruntime (no torch): the per-point work is the same a box does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple, Protocol, TypeVar

import numpy as np
import onnx

from toco_core.calibration import KL_NOISE_FLOOR, CurvePoint
from toco_core.compression.bias_correction import BiasCorrection, biased_layers
from toco_core.compression.compensated_rounding import (
    code_differences,
    compensated_many,
    inverse_factor,
    with_differences,
)
from toco_core.compression.dead_parts import fold_rounding
from toco_core.compression.matmul_nbits import best_nbits_choice
from toco_core.compression.mixed_precision import channel_steps
from toco_core.compression.nested import CodeLadder, choose_octaves, master_codes, prune_classes, prune_level
from toco_core.compression.qdq_int8 import int8_fits
from toco_core.compression.storage import QuantizedTensor, dequantize
from toco_core.compression.tolerance_compress import CompressedTensor, summary
from toco_core.fidelity import OutputKind
from toco_core.model_inputs import Batch
from toco_core.onnx_model import WeightInfo, with_weights
from toco_core.plan_table import PlanTable, plan_codes
from toco_core.rounding_parts import decode_point, encode_point
from toco_core.runtime import run_with_weights
from toco_core.task_kind import CLASSIFIER, TaskSpec, compare
from toco_core.tolerance_map import ToleranceMap

_T = TypeVar("_T")
_R = TypeVar("_R")
Point = tuple[float, float]  # (prune scale, quant scale)
Octaves = dict[str, np.ndarray]  # per-channel octaves of each weight at one point
BiasDeltas = dict[str, np.ndarray]  # {bias initializer: float16 delta} of one point; {} without correction
CodeDifferences = dict[str, np.ndarray]  # {weight: int16 compensated - plain codes} of one point
Prepared = tuple[Octaves, list[QuantizedTensor], CodeDifferences]  # a point rounded ahead of its measurement
_BATCH_WEIGHTS = 4_000_000  # weights of one layer rounded at once over a batch of points (32 MB of float64)


class MeasuredPoint(NamedTuple):
    """One curve point built from the master codes as a box builds it: its measurement, its octaves,
    the bias deltas its build applied (kept so no later build has to fit them again) and, with
    compensated rounding, its code differences (None without)."""

    measured: CurvePoint
    octaves: Octaves
    bias_deltas: BiasDeltas
    rounding: bytes | None = None  # toco_core.rounding_parts.encode_point of the differences


class GridMap(Protocol):
    """A ``map``: ``grid_map(fn, items)`` yields ``fn(item)`` for each item, in the items' order.

    The builtin ``map`` is the sequential default. A caller may pass one that runs the calls
    elsewhere (other processes or machines): ``fn`` is then a picklable bound method whose object
    holds the model and the held-out samples, so a map should ship it once, not once per item.
    """

    def __call__(self, fn: Callable[[_T], _R], items: Iterable[_T], /) -> Iterable[_R]: ...


def kept_shares(infos: list[WeightInfo], classes: dict[str, np.ndarray], levels: int) -> np.ndarray:
    """Share of weights left at each prune level once channels pruning empties are removed.

    Index 0: no pruning (1.0); index j + 1: pruning at grid level j. One channel per layer always
    stays; the consumer's matching inputs are not counted (conservative).
    """
    total = sum(i.size for i in infos)
    out = np.ones(levels + 1)
    for j in range(levels):
        removed = 0
        for info in infos:
            top = np.moveaxis(classes[info.name], info.out_axis, 0).reshape(info.shape[info.out_axis], -1).max(axis=1)
            dead = int((top <= j).sum())
            removed += min(dead, len(top) - 1) * (info.size // info.shape[info.out_axis])
        out[j + 1] = 1.0 - removed / total
    return out


class NestedCalibration:
    """Measures points built from the master codes; collects the octaves of the plan table."""

    def __init__(self, model: onnx.ModelProto, infos: list[WeightInfo], weights: dict[str, np.ndarray],
                 tmap: ToleranceMap, kind: OutputKind, x: Batch, y: np.ndarray | None,
                 base_out: np.ndarray, correction: BiasCorrection | None, prune_grid: list[float],
                 coverage: float = 0.99, task: TaskSpec = CLASSIFIER,
                 hessians: dict[str, np.ndarray] | None = None) -> None:
        """``hessians``: the layers' input Hessians (compensated_rounding.layer_hessians) to round
        every curve point against; None rounds to nearest."""
        self.model, self.infos, self.weights, self.tmap = model, infos, weights, tmap
        self.factors = None if hessians is None else {k: inverse_factor(h) for k, h in hessians.items()}
        self._shapes = {i.name: i.shape for i in infos}
        self.kind, self.x, self.y, self.base_out, self.correction = kind, x, y, base_out, correction
        self.prune_grid, self.coverage, self.task = sorted(prune_grid), coverage, task
        self.classes = {i.name: prune_classes(tmap.prune_rank[i.name], self.prune_grid) for i in infos}
        self.master_scale = 0.0
        self.steps: dict[str, np.ndarray] = {}
        self.ladders: dict[str, CodeLadder] = {}
        self.octaves: dict[tuple[float, float], dict[str, np.ndarray]] = {}
        self.bias_deltas: dict[Point, BiasDeltas] = {}
        self.rounding: dict[Point, bytes] = {}  # each measured point's encoded differences
        self._prepared: dict[Point, Prepared] = {}
        self.layers = biased_layers(model, infos)

    def _measure(self, tensors: list[QuantizedTensor], ps: float, qs: float) -> tuple[CurvePoint, BiasDeltas]:
        values = {q.name: dequantize(q) for q in tensors}
        steps = {q.name: q.steps for q in tensors}
        deltas = self.correction.deltas(values) if self.correction is not None else {}
        biases = self.correction.with_deltas(deltas, steps) if self.correction is not None else {}
        # the float16 rounding of the biases a build folds removed channels into (dead_parts), so the
        # point measures the model a box builds
        biases.update(fold_rounding(with_weights(self.model, {**values, **biases}), values, self.layers, steps))
        values.update(biases)
        fid = compare(self.task, self.base_out, run_with_weights(self.model, values, self.x), self.y, self.kind)
        stats = summary({q.name: CompressedTensor(q.name, values[q.name], q.codes, q.steps, q.out_axis)
                         for q in tensors})
        point = CurvePoint(prune_scale=ps, quant_scale=qs, disagreement=fid.disagreement, kl=fid.kl,
                           accuracy=fid.accuracy, sparsity=stats["sparsity"], entropy_bits=stats["entropy_bits"],
                           coded_bits=stats["coded_bits"], fixed_bits=stats["fixed_bits"])
        return point, deltas

    def master_candidate(self, scale: float) -> tuple[CurvePoint, dict[str, np.ndarray]]:
        """The unpruned model at per-channel steps from scale * tau_hat, measured; and those steps."""
        steps, tensors = {}, []
        for info in self.infos:
            w = self.weights[info.name]
            steps[info.name] = channel_steps(w, self.tmap.quant[info.name] * np.float32(scale), info.out_axis,
                                             self.coverage).astype(np.float32)
            tensors.append(QuantizedTensor(info.name, master_codes(w, steps[info.name], info.out_axis),
                                           steps[info.name], info.out_axis))
        return self._measure(tensors, 0.0, scale)[0], steps

    def choose_master(self, grid: list[float], noise_floor: float,
                      on_point: Callable[[], object] | None = None) -> list[CurvePoint]:
        """Sweep ``grid`` (ascending) until a point leaves the noise floor; fix the master at the
        last point on it (the first grid point when none is). Returns the measured sweep."""
        swept, chosen = [], None
        for scale in sorted(grid):
            point, steps = self.master_candidate(scale)
            swept.append(point)
            if on_point:
                on_point()
            if point.disagreement > noise_floor or point.kl > KL_NOISE_FLOOR:
                break
            chosen = (scale, steps)
        if chosen is None:
            chosen = (sorted(grid)[0], self.master_candidate(sorted(grid)[0])[1])
        self.master_scale, self.steps = chosen
        self.ladders = {i.name: CodeLadder(i.out_axis, master=master_codes(self.weights[i.name], self.steps[i.name],
                                                                        i.out_axis)) for i in self.infos}
        return swept

    def point_octaves(self, ps: float, qs: float) -> dict[str, np.ndarray]:
        """Per-channel octaves of point (ps, qs): coverage of qs * tau_hat on the weights kept at ps."""
        level = prune_level(self.prune_grid, ps)
        out = {}
        for info in self.infos:
            channels = info.shape[info.out_axis]
            if qs <= self.master_scale:
                out[info.name] = np.zeros(channels, np.uint8)
                continue
            keep = self.classes[info.name] > level
            master = self.ladders[info.name].master
            assert master is not None, "the server's ladders hold the master codes"
            out[info.name] = choose_octaves(self.weights[info.name], master,
                                            self.steps[info.name], self.tmap.quant[info.name] * np.float32(qs), keep,
                                            info.out_axis, self.coverage)
        return out

    def measure_point(self, point: Point, prepared: Prepared | None = None) -> MeasuredPoint:
        """Build ``point`` (ps, qs) from the master codes as a box does and measure it, with its
        compensated rounding from ``prepared`` (rounded), else from what ``prepare`` prepared,
        else rounded here.

        Returns the MeasuredPoint; records nothing (the object is not changed), so it may run in
        another thread, or another process on a copy. Call after choose_master.
        """
        ps, qs = point
        rounding: CodeDifferences | None = None
        prepared = prepared or self._prepared.get(point)
        if prepared is not None:
            octaves, plain, rounding = prepared
        else:
            octaves = self.point_octaves(ps, qs)
            plain = self._plain_codes(point, octaves)
            if self.factors is not None:
                rounding = self.compensate({point: plain})[point]
        if rounding is None:
            measured, deltas = self._measure(plain, ps, qs)
            return MeasuredPoint(measured, octaves, deltas)
        measured, deltas = self._measure(with_differences(plain, rounding), ps, qs)
        return MeasuredPoint(measured, octaves, deltas, encode_point(rounding))

    def _plain_codes(self, point: Point, octaves: Octaves) -> list[QuantizedTensor]:
        table = self.table([point], np.zeros((1, len(self.infos)), bool), np.zeros((1, len(self.infos)), np.uint16),
                           {point: octaves})
        return plan_codes(table, self.ladders, self.classes, *point)

    def compensate(self, plains: dict[Point, list[QuantizedTensor]]) -> dict[Point, CodeDifferences]:
        """The code differences of compensated rounding of each point's nested codes (``plains``),
        every layer with a Hessian rounded for all points in one pass; steps and prune masks kept."""
        assert self.factors is not None, "compensated rounding needs the layers' Hessians"
        done: dict[Point, list[QuantizedTensor]] = {p: list(codes) for p, codes in plains.items()}
        for t, info in enumerate(self.infos):
            if info.name not in self.factors:
                continue
            keeps = [self.classes[info.name] > prune_level(self.prune_grid, p[0]) for p in plains]
            rounded = compensated_many(self.weights[info.name], [c[t] for c in plains.values()], keeps,
                                       self.factors[info.name])
            for p, q in zip(plains, rounded, strict=True):
                done[p][t] = q
        return {p: code_differences(done[p], plains[p]) for p in plains}

    def rounded(self, points: list[Point]) -> dict[Point, Prepared]:
        """``points`` rounded with compensation, all at once (the work per point is mostly per
        column, which a batch shares): each point's octaves, nested codes and code differences.
        {} without Hessians. Changes nothing."""
        if self.factors is None:
            return {}
        octaves = {p: self.point_octaves(*p) for p in points}
        plains = {p: self._plain_codes(p, octaves[p]) for p in points}
        rounded = self.compensate(plains)
        return {p: (octaves[p], plains[p], rounded[p]) for p in points}

    def prepare(self, points: list[Point]) -> None:
        """Round ``points`` ahead of measure_point (``rounded``); replaces what an earlier call prepared."""
        self._prepared = self.rounded(points)

    def batches(self, points: list[Point]) -> list[list[Point]]:
        """``points`` in batches whose rounding holds at most _BATCH_WEIGHTS weights of one layer in flight."""
        largest = max((i.size for i in self.infos if self.factors and i.name in self.factors), default=1)
        size = max(1, _BATCH_WEIGHTS // largest)
        return [points[k:k + size] for k in range(0, len(points), size)]

    def sweep_measure(self, points: list[Point]) -> Callable[[float, float], CurvePoint]:
        """``measure`` for a sweep over ``points`` in that order, which may stop early: with
        compensation each batch of points (``batches``) is rounded when the sweep reaches it. A whole
        sweep rounded at once held ~350 MB more on a 1.57M-weight model, and rounded points that an
        early stop never measures. Sweeps over different points may run side by side in threads."""
        pending, ready = self.batches(points), {}

        def measure(ps: float, qs: float) -> CurvePoint:
            batch = next((b for b in pending if (ps, qs) in b), None)
            if batch is not None:
                pending.remove(batch)
                ready.update(self.rounded(batch))  # without Hessians: nothing
            return self._record((ps, qs), self.measure_point((ps, qs), ready.pop((ps, qs), None)))

        return measure

    def _record(self, point: Point, result: MeasuredPoint) -> CurvePoint:
        self.octaves[point], self.bias_deltas[point] = result.octaves, result.bias_deltas
        if result.rounding is not None:
            self.rounding[point] = result.rounding
        self._prepared.pop(point, None)
        return result.measured

    def measure(self, ps: float, qs: float) -> CurvePoint:
        """Build point (ps, qs) from the master codes as a box does, measure it, record its octaves
        and bias deltas."""
        return self._record((ps, qs), self.measure_point((ps, qs)))

    def measure_grid(self, points: list[Point], grid_map: GridMap = map,
                     on_point: Callable[[int, int], None] | None = None) -> list[CurvePoint]:
        """Measure every one of ``points`` (independent of each other) through ``grid_map``; record
        their octaves and bias deltas. Returns the measured points in the order of ``points``.

        ``on_point(done, total)`` is called as each result arrives. Raises what measure_point or
        the map raises (a remote map: its own errors, e.g. a cancelled or lost task).
        """
        out = []
        for i, (point, result) in enumerate(zip(points, grid_map(self.measure_point, points), strict=True)):
            out.append(self._record(point, result))
            if on_point:
                on_point(i + 1, len(points))
        return out

    def point_deltas(self, points: list[Point]) -> dict[int, BiasDeltas]:
        """The recorded bias deltas of ``points`` by their index in that list (a plan table's
        points); points measured without correction, or not measured, are left out."""
        return {i: self.bias_deltas[p] for i, p in enumerate(points) if self.bias_deltas.get(p)}

    def point_rounding(self, points: list[Point]) -> dict[int, bytes] | None:
        """The encoded code differences (toco_core.rounding_parts) of ``points`` by their index in
        that list; None without compensated rounding."""
        if self.factors is None:
            return None
        return {i: self.rounding[p] for i, p in enumerate(points) if p in self.rounding}

    def table(self, points: list[Point], int8: np.ndarray, nbits: np.ndarray,
              octaves: dict[Point, Octaves] | None = None) -> PlanTable:
        """The plan table of ``points`` with the given runtime decisions; their octaves from
        ``octaves``, else those recorded when each was measured."""
        names = [i.name for i in self.infos]
        known = self.octaves if octaves is None else octaves
        return PlanTable(
            master_scale=float(self.master_scale), prune_grid=tuple(self.prune_grid), points=tuple(points),
            tensors=tuple(names), out_axes=tuple(i.out_axis for i in self.infos), master_steps=dict(self.steps),
            octaves={n: np.stack([known[p][n] for p in points]) for n in names},
            int8=int8, nbits_block=nbits, kept_share=kept_shares(self.infos, self.classes, len(self.prune_grid)))

    def final_table(self, points: list[tuple[float, float]], int8_scale: float) -> PlanTable:
        """The plan table of every measured point, with its int8 and MatMulNBits decisions.

        int8: a weight stays in int8 where its per-channel int8 error is within
        tau_hat * max(int8_scale, s) for the coverage share (toco_core.compression.qdq_int8.int8_fits);
        nbits: the 4-bit MatMulNBits block whose error is within tau_hat * s (best_nbits_choice).
        """
        int8 = np.zeros((len(points), len(self.infos)), bool)
        nbits = np.zeros((len(points), len(self.infos)), np.uint16)
        bare = self.table(points, int8, nbits)
        for i, (ps, qs) in enumerate(points):
            tensors = plan_codes(bare, self.ladders, self.classes, ps, qs)
            if (ps, qs) in self.rounding:
                tensors = with_differences(tensors, decode_point(self.rounding[(ps, qs)], self._shapes))
            scale = np.float32(max(int8_scale, qs))
            for t, (info, q) in enumerate(zip(self.infos, tensors, strict=True)):
                values = dequantize(q)
                tau = self.tmap.quant[info.name]
                int8[i, t] = scale > 0 and int8_fits(values, tau * scale, info.out_axis, self.coverage)
                if info.op_type in ("MatMul", "Gemm") and len(info.shape) == 2 and qs > 0:
                    choice = best_nbits_choice(values, tau * np.float32(qs), coverage=self.coverage,
                                               k_axis=1 - info.out_axis)
                    nbits[i, t] = choice[1] if choice is not None and choice[0] == 4 else 0
        return self.table(points, int8, nbits)
