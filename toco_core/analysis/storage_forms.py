"""The last analysis step: every planned point's storage form built as a box builds it, its size kept
on the curve point (CurvePoint.storage_bytes), so the solver plans with the bytes a box will store.

An estimate from the codes' entropy cannot see what a build removes (dead channels, unread input
features: toco_core.plan_build): over the demo LeNet-5's and MLP's points the built form was 0.54 to
1.11 times the estimate, following the point (its prune and quant scales) rather than its size, so
no few measured points calibrate it, and a box with a storage limit lost plans that fit it.
Building costs ~20 ms a point on LeNet-5; points the curves share are built once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import onnx

from toco_core.analysis_result import AnalysisResult
from toco_core.calibration import CalibrationCurve
from toco_core.curve_operators import PLANNED
from toco_core.plan_build import as_source, storage_form, with_base_means
from toco_core.weight_source import require_plans

Progress = Callable[[str, int, int], None]


def with_storage_forms(model: onnx.ModelProto, result: AnalysisResult,
                       progress: Progress = lambda *a: None) -> AnalysisResult:
    """``result`` with ``storage_bytes`` set on every point of its planned curves that codes weights
    (the fp32 file's points keep None: they travel as the plain file).

    Takes the model the analysis was made of (as given, tail included: a box builds that one) and
    its result. Reports progress as ("storage", built, total). Raises AnalysisError for an analysis
    of another model or without a plan table.
    """
    table = require_plans(result)
    source = with_base_means(as_source(model, result), result)
    index = {(k, j): table.point_index(p.prune_scale, p.quant_scale)
             for k, curve in result.curves.items() if k in PLANNED
             for j, p in enumerate(curve.points) if p.quant_scale > 0}
    points = sorted(set(index.values()))
    built: dict[int, int] = {}
    for n, i in enumerate(points, 1):
        built[i] = len(storage_form(source, result, i))
        progress("storage", n, len(points))
    sizes = {key: built[i] for key, i in index.items()}
    curves = {k: _with_sizes(k, curve, sizes) for k, curve in result.curves.items()}
    return dataclasses.replace(result, curves=curves)


def _with_sizes(name: str, curve: CalibrationCurve, sizes: dict[tuple[str, int], int]) -> CalibrationCurve:
    points = [p.model_copy(update={"storage_bytes": sizes[name, j]}) if (name, j) in sizes else p
              for j, p in enumerate(curve.points)]
    return curve.model_copy(update={"points": points})
