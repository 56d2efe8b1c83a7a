"""The bands' group bounds for a fleet: the prune levels its boxes are planned to run.

A box pruning at a bound reads one split and the bands above it; a box between bounds also reads
the splits inside its group and that group's band, whose weights of its own class or below it
zeroes (see toco_core.weight_bands). The server knows its boxes' profiles, so it plans each kind
of box once (the solver's own path, as the what-if does) and lays the bundle out for those levels.
"""

from __future__ import annotations

from collections.abc import Iterable

from toco_core.analysis_result import AnalysisResult
from toco_core.compression.nested import prune_level
from toco_core.device import DeviceProfile
from toco_core.errors import InfeasibleError
from toco_core.onnx_model import WeightInfo
from toco_core.plan import Policy
from toco_core.solver import plans_for_device
from toco_core.weight_source import require_plans

MAX_BOUNDS = 6  # beyond a few kinds of box, more bounds cost every box more splits than they save


def planned_levels(result: AnalysisResult, infos: list[WeightInfo], base_file_bytes: int,
                   boxes: Iterable[tuple[DeviceProfile | None, Policy]]) -> list[int]:
    """The prune grid levels the boxes' best plans run at, the most common first (at most MAX_BOUNDS).

    Takes the analysis (with its plan table), the model's compressible weights and file size, and
    (profile, policy) per box. Boxes without a feasible plan or without pruning add no level.
    Raises AnalysisError for an analysis without a plan table.
    """
    grid = require_plans(result).prune_grid
    counts: dict[int, int] = {}
    seen: dict[str, int | None] = {}
    for profile, policy in boxes:
        key = (profile.model_dump_json(exclude={"device_id"}) if profile else "") + policy.model_dump_json()
        if key not in seen:
            try:
                best = plans_for_device(result, infos, base_file_bytes, profile, policy)[0]
                seen[key] = prune_level(grid, best.prune_scale)
            except InfeasibleError:
                seen[key] = None
        level = seen[key]
        if level is not None and level >= 0:
            counts[level] = counts.get(level, 0) + 1
    return sorted(counts, key=lambda j: (-counts[j], -j))[:MAX_BOUNDS]
