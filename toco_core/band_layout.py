"""The bands' group bounds for a fleet: the prune levels its boxes are planned to run.

A box pruning at a bound reads one split and the bands above it; a box between bounds also reads
the splits inside its group and that group's band, whose weights of its own class or below it
zeroes (see toco_core.weight_bands). The server knows its boxes' profiles (with the budgets their
owners configured) but not each box's objective (agent config), so it plans each kind of box once
per objective (the solver's own path, as the what-if does) and lays the bundle out for those levels.
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
                   profiles: Iterable[DeviceProfile], budget: float) -> list[int]:
    """The prune grid levels the boxes' best plans run at, the most common first (at most MAX_BOUNDS).

    Takes the analysis (with its plan table), the model's compressible weights and file size, each
    box's profile and the fleet budget; every box counts with its best plan under either objective.
    Boxes without a feasible plan or without pruning add no level. Raises AnalysisError for an
    analysis without a plan table.
    """
    grid = require_plans(result).prune_grid
    counts: dict[int, int] = {}
    seen: dict[str, list[int]] = {}
    for profile in profiles:
        key = profile.model_dump_json(exclude={"device_id"})
        if key not in seen:
            seen[key] = []
            for objective in ("fidelity", "size"):
                try:
                    best = plans_for_device(result, infos, base_file_bytes, profile,
                                            Policy(budget=budget, objective=objective))[0]
                except InfeasibleError:
                    continue
                if (level := prune_level(grid, best.prune_scale)) >= 0 and level not in seen[key]:
                    seen[key].append(level)
        for level in seen[key]:
            counts[level] = counts.get(level, 0) + 1
    return sorted(counts, key=lambda j: (-counts[j], -j))[:MAX_BOUNDS]
