"""WeightSource: what a box builds plans from, whether it holds the fp32 base or only parts.

Either way a plan's weights come from the same code ladders and prune classes, so a box that
downloaded parts builds the weights the server measured (toco_core.plan_table.plan_codes). What
differs is what stands in for the base model:

- with the fp32 base: the base itself (self-test reference outputs, p50 and RSS gates, bias
  correction's base channel means);
- from parts: the master model (the graph with master-precision weights; its disagreement with
  the base is measured at the noise floor) for the gates, and the base outputs and channel means
  shipped in the bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from toco_core.analysis_result import AnalysisResult
from toco_core.compression.compensated_rounding import with_differences
from toco_core.compression.nested import CodeLadder, master_codes, prune_classes
from toco_core.compression.storage import QuantizedTensor
from toco_core.errors import AnalysisError
from toco_core.onnx_model import compressible_weights, model_hash, read_weights
from toco_core.output_tail import fidelity_view
from toco_core.plan_table import PlanTable, plan_codes
from toco_core.rounding_parts import PointRounding, decode_point, rounding_part_name
from toco_core.runtime import run_model


@dataclass(frozen=True)
class WeightSource:
    """The reference model, the code ladders and prune classes of every compressible weight.

    ``reference`` is the fp32 base (``is_base``) or the master model; ``base_out`` the base's
    outputs on the analysis' held-out samples; ``base_means`` the bias-correction channel means of
    the base on the correction samples (None: measure them on ``reference``, which is the base);
    ``point_deltas`` the float16 bias deltas of the points a box fetched them for
    (toco_core.bias_parts; None: fit them on the analysis samples); ``point_rounding`` the code
    differences of the points it holds them for, encoded (toco_core.rounding_parts; an analysis
    with compensated rounding only).
    """

    reference: onnx.ModelProto
    is_base: bool
    ladders: dict[str, CodeLadder]
    classes: dict[str, np.ndarray]
    base_out: np.ndarray
    base_means: list[np.ndarray] | None = None
    point_deltas: dict[int, dict[str, np.ndarray]] | None = None
    point_rounding: PointRounding | None = None


def require_plans(result: AnalysisResult) -> PlanTable:
    """The analysis' plan table. Raises AnalysisError for an analysis made before plan tables."""
    if result.plans is None:
        raise AnalysisError("this analysis has no plan table (made by an older TOCO)",
                            "re-run the analysis; its plans are built from the master codes now")
    return result.plans


def from_base_model(model: onnx.ModelProto, result: AnalysisResult,
                    classes: dict[str, np.ndarray] | None = None) -> WeightSource:
    """The source of a box (or the server) that holds the fp32 base: master codes from its weights,
    prune classes from the analysis' prune ranks unless given (a box has them from prune planes),
    the analysis' bias deltas where it kept them.

    Raises AnalysisError when the analysis belongs to another model or has no plan table.
    """
    if model_hash(model) != result.manifest.model_sha256:
        raise AnalysisError("the analysis was made for another model (hash mismatch)", "analyse this model first")
    table = require_plans(result)
    infos = {i.name: i for i in compressible_weights(model)}
    weights = read_weights(model, list(infos.values()))
    ladders = {n: CodeLadder(infos[n].out_axis,
                             master=master_codes(weights[n], table.master_steps[n], infos[n].out_axis))
               for n in table.tensors}
    if classes is None:
        if result.tolerances is None:
            raise AnalysisError("the analysis has no tolerance map to take prune classes from",
                                "give the prune classes")
        tmap = result.tolerances
        classes = {n: prune_classes(tmap.prune_rank[n], table.prune_grid) for n in table.tensors}
    base_out = run_model(fidelity_view(model, result.manifest.scored_output), result.heldout_x)
    # the deltas the calibration fitted, where the analysis kept them: builds apply them instead of fitting
    return WeightSource(model, True, ladders, classes, base_out, point_deltas=result.bias_deltas,
                        point_rounding=result.rounding)


def point_codes(source: WeightSource, result: AnalysisResult, i: int) -> list[QuantizedTensor]:
    """The codes of plan table point ``i`` as the analysis measured them: its nested codes
    (plan_codes), plus its code differences where the analysis rounded with compensation.

    Raises AnalysisError when the analysis compensated and this source lacks point i's
    differences (a box that did not fetch its rounding part), or for an analysis without a plan table.
    """
    table = require_plans(result)
    tensors = plan_codes(table, source.ladders, source.classes, *table.points[i])
    if not result.compensated_rounding:
        return tensors
    if source.point_rounding is None or i not in source.point_rounding:
        raise AnalysisError(f"the compensated codes of point {i} are not on this box",
                            f"fetch the part {rounding_part_name(i)} its plan lists")
    try:
        differences = decode_point(source.point_rounding[i], {t.name: t.codes.shape for t in tensors})
    except ValueError as exc:
        raise AnalysisError(f"the part {rounding_part_name(i)} does not fit this model: {exc}",
                            "fetch the bundle again") from None
    return with_differences(tensors, differences)
