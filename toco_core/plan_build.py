"""Applying a plan: the runnable model and the storage form a box builds for one curve point.

``build`` takes the point's codes from the master (toco_core.weight_source), corrects the biases,
removes the channels and input features no output depends on, puts the plan's runtime form on the
layers the analysis chose for it and codes the result. The fp32 base and a box's parts give the same
bytes. Choosing, gating and measuring the plan is toco_core.recompress's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import onnx

from toco_core.analysis_result import AnalysisResult
from toco_core.compression.bias_correction import (
    BiasCorrection,
    BiasedLayer,
    apply_deltas,
    bias_shifts,
    bias_steps,
    biased_layers,
)
from toco_core.compression.dead_parts import fold_rounding, folded_biases_on_half, without_dead_parts
from toco_core.compression.mixed_precision import channel_bits
from toco_core.compression.reduced_codes import reduced_codes
from toco_core.compression.storage import QuantizedTensor, dequantize, encode_model
from toco_core.errors import AnalysisError
from toco_core.onnx_model import WeightInfo, compressible_weights, model_bytes, with_weights
from toco_core.plan import CompressionPlan, LayerDecision
from toco_core.runtime_forms import FLOAT, BuildStep, runtime_form
from toco_core.solver import is_base_plan
from toco_core.weight_source import WeightSource, from_base_model, point_codes, require_plans

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class BuiltModel:
    """A plan made real: the runnable model, its storage form and per-layer decisions."""

    runnable: onnx.ModelProto
    storage: bytes
    layers: list[LayerDecision]


def _correction(source: WeightSource, result: AnalysisResult, infos: list[WeightInfo]) -> BiasCorrection:
    # as the curves were measured: fitted on the analysis samples, never on the self-test's
    return BiasCorrection(source.reference, infos, result.analysis_x, base_means=source.base_means)


def with_base_means(source: WeightSource, result: AnalysisResult) -> WeightSource:
    """``source`` with the base's bias-correction channel means measured once, so the builds of one
    recompression (the int8 anchor, each try) do not run the base again (0.14 s a build on the
    224x224 model). A source that has them (a box's, from its bundle) is returned as it is."""
    if not result.bias_correction or source.base_means is not None or not len(result.analysis_x):
        return source
    means = _correction(source, result, compressible_weights(source.reference)).base_means
    return dataclasses.replace(source, base_means=means)


def _point_biases(source: WeightSource, result: AnalysisResult, infos: list[WeightInfo], i: int,
                  values: dict[str, np.ndarray], layers: list[BiasedLayer],
                  steps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Point i's corrected biases (float16 where apply_deltas allows, given the codes' ``steps`` per
    weight; ``layers``: the model's biased layers): from shipped deltas (toco_core.bias_parts) where
    the source has them, else fitted on the analysis samples. Raises AnalysisError when neither is
    at hand."""
    if source.point_deltas is not None and i in source.point_deltas:
        inits = {t.name: t for t in source.reference.graph.initializer}
        base = {k: onnx.numpy_helper.to_array(inits[k]) for k in source.point_deltas[i]}
        return apply_deltas(base, source.point_deltas[i], bias_steps(layers, steps))
    if not len(result.analysis_x):
        raise AnalysisError(f"the biases of point {i} are not on this box", "fetch the bias part its plan lists")
    return _correction(source, result, infos).biases(values, steps=steps)


def fit_point_deltas(model: onnx.ModelProto | WeightSource, result: AnalysisResult,
                     progress: Progress = lambda *a: None) -> dict[int, dict[str, np.ndarray]]:
    """The float16 bias deltas of every calibrated point: the analysis' own (AnalysisResult.bias_deltas)
    where it kept them for every point, else fitted as build() fits them (one BiasCorrection, so the
    base runs once; BiasCorrection.deltas). Returns {} when the analysis does not correct biases.
    Raises AnalysisError for an analysis without a plan table or of another model."""
    source = as_source(model, result)
    table = require_plans(result)
    if not result.bias_correction:
        return {}
    if result.bias_deltas is not None and set(result.bias_deltas) >= set(range(len(table.points))):
        return dict(result.bias_deltas)  # the analysis kept what its calibration fitted
    correction = _correction(source, result, compressible_weights(source.reference))
    out = {}
    for i in range(len(table.points)):
        progress("biases", i, len(table.points))
        values = {t.name: dequantize(t) for t in point_codes(source, result, i)}
        out[i] = correction.deltas(values)
    return out


def _base_built(source: WeightSource, infos: list[WeightInfo]) -> BuiltModel:
    """The base plan: the fp32 base itself, or the master model where only parts are at hand."""
    layers = [LayerDecision(name=i.name, op_type=i.op_type, weights=i.size, sparsity=0.0, mean_bits=32.0,
                            channels_kept=i.shape[i.out_axis], channels=i.shape[i.out_axis], runtime_format=FLOAT.name)
              for i in infos]
    return BuiltModel(source.reference, model_bytes(source.reference), layers)


def as_source(model: onnx.ModelProto | WeightSource, result: AnalysisResult) -> WeightSource:
    """A WeightSource for a base model (toco_core.weight_source.from_base_model) or the source itself."""
    return model if isinstance(model, WeightSource) else from_base_model(model, result)


def build(model: onnx.ModelProto | WeightSource, result: AnalysisResult, plan: CompressionPlan,
          correct_biases: bool = True) -> BuiltModel:
    """Apply a plan: the point's codes from the master (toco_core.weight_source.point_codes), corrected
    biases (on float16: bias_correction.apply_deltas), dead channels removed, the plan's runtime form
    (its build step, toco_core.runtime_forms) on the layers the analysis chose for it, storage form.
    ``correct_biases=False`` keeps the base's biases: a build made only to measure its session
    memory, which their values do not change.

    Takes the fp32 base or a WeightSource (parts). Raises AnalysisError for a point the analysis
    did not measure or an analysis without a plan table, UnregisteredNameError for an unknown form.
    """
    source = as_source(model, result)
    table = require_plans(result)
    infos = compressible_weights(source.reference)
    if is_base_plan(plan):
        return _base_built(source, infos)
    i = table.point_index(plan.prune_scale, plan.quant_scale)
    coded = _coded_point(source, result, infos, i, plan.structured, correct_biases)
    tensors, runnable, storage, dropped = coded.tensors, coded.runnable, coded.storage, coded.dropped
    kept = {i.name: i.shape[i.out_axis] - int(dropped[i.name].sum()) if i.name in dropped else i.shape[i.out_axis]
            for i in infos}
    formats = {i.name: FLOAT.name for i in infos}
    runnable, converted = runtime_form(plan.runtime).build(BuildStep(runnable, table, i, result.analysis_x))
    formats.update(converted)
    by_name = {q.name: q for q in tensors}
    layers = [LayerDecision(
        name=i.name, op_type=i.op_type, weights=i.size, sparsity=float((by_name[i.name].codes == 0).mean()),
        mean_bits=float(channel_bits(by_name[i.name].codes, i.out_axis).mean()),
        channels_kept=kept[i.name], channels=i.shape[i.out_axis], runtime_format=formats[i.name],
        bias_shift=coded.shifts.get(i.name),
    ) for i in infos]
    return BuiltModel(runnable, storage, layers)


class _CodedPoint(NamedTuple):
    tensors: list[QuantizedTensor]  # the point's codes, before any channel removal
    runnable: onnx.ModelProto  # fp32 weights, dead parts removed (with structured)
    storage: bytes
    dropped: dict[str, np.ndarray]  # output channels removed per weight
    shifts: dict[str, float]  # bias_correction.bias_shifts


def _coded_point(source: WeightSource, result: AnalysisResult, infos: list[WeightInfo], i: int, structured: bool,
                 correct_biases: bool = True) -> _CodedPoint:
    """Point i's codes, corrected biases, dead parts removed (when ``structured``) and storage form."""
    tensors = point_codes(source, result, i)
    values = {q.name: dequantize(q) for q in tensors}
    layers, steps = biased_layers(source.reference, infos), {q.name: q.steps for q in tensors}
    correct = result.bias_correction and correct_biases
    biases = _point_biases(source, result, infos, i, values, layers, steps) if correct else {}
    float_model = with_weights(source.reference, {**values, **biases})
    if structured:
        runnable, dropped = without_dead_parts(float_model, values)
        if dropped:
            runnable = folded_biases_on_half(runnable, float_model, layers, steps, dropped)
    else:  # the same function with the dead channels left in: what the calibration measured
        rounding = fold_rounding(float_model, values, layers, steps) if correct_biases else {}
        float_model = with_weights(float_model, rounding) if rounding else float_model
        runnable, dropped = float_model, {}
    # the storage form codes the model that runs when it can (toco_core.compression.reduced_codes)
    coded = reduced_codes(runnable, tensors, dropped) if runnable is not float_model else None
    storage = encode_model(runnable, coded) if coded is not None else encode_model(float_model, tensors)
    return _CodedPoint(tensors, runnable, storage, dropped, bias_shifts(source.reference, infos, biases))


def storage_form(source: WeightSource, result: AnalysisResult, i: int) -> bytes:
    """The storage form a box's build of plan table point ``i`` stores (build's, for any runtime form
    of a structured plan): the point's codes, corrected biases, dead parts removed, coded.

    Raises AnalysisError as build does."""
    return _coded_point(source, result, compressible_weights(source.reference), i, True).storage
