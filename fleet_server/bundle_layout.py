"""The band layout of a bundle the server packs: bounds at the prune levels its enrolled boxes plan.

Planning reads only curve numbers (toco_core.band_layout plans each kind of box once), so this
costs milliseconds per kind of box; boxes without a readable profile are left out (only the box
can tell), and a fleet with no pruning box gets the layout with every level a bound.
"""

from __future__ import annotations

import logging

import onnx
from sqlalchemy import select

from fleet_server.db import Database, DeviceRow
from fleet_server.whatif import hardware_profile
from toco_core.analysis_result import AnalysisResult
from toco_core.band_layout import planned_levels
from toco_core.device import DeviceProfile
from toco_core.errors import DeviceError
from toco_core.onnx_model import compressible_weights

log = logging.getLogger(__name__)


def fleet_band_bounds(db: Database, model_id: str, result: AnalysisResult, model: onnx.ModelProto,
                      model_file_bytes: int, budget: float) -> list[int] | None:
    """The band bounds for a bundle of ``model_id``: the levels its enrolled boxes' best plans prune
    at under the fleet budget. None when no box is known (every level a bound); [] when boxes are
    known and none prunes: one group, whose unpruned boxes read no prune split at all (every level
    a bound would make each of them download every split to place its codes). Raises
    AnalysisError for an analysis without a plan table."""
    with db.session() as s:
        rows = s.execute(select(DeviceRow.id, DeviceRow.hardware, DeviceRow.allowed_models)
                         .where(DeviceRow.enrollment == "enrolled")).all()
    profiles: list[DeviceProfile] = []
    for device_id, hardware, allowed in rows:
        if allowed is not None and model_id not in allowed:
            continue
        try:
            profiles.append(hardware_profile(device_id, hardware or {}))
        except DeviceError:
            continue
    levels = planned_levels(result, compressible_weights(model), model_file_bytes, profiles, budget)
    log.info("bundle band layout", extra={"fields": {"model": model_id, "boxes": len(profiles), "bounds": levels}})
    return levels if profiles else None
