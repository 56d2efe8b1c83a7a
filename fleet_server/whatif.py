"""The what-if panel: the plan a device (or typed budgets) would get from an analysis, without deploying.

Numbers are read (toco_core.solver over the stored calibration curves); one plan is built only where
the predicted storage rules every plan out, as the box itself does (recompress.device_plans).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import onnx

from toco_core.analysis_result import AnalysisResult, load_result
from toco_core.device import DeviceProfile, profile_from_dict
from toco_core.errors import DeviceError, InfeasibleError
from toco_core.messages import PlanSummary
from toco_core.onnx_model import load_model
from toco_core.plan import Policy
from toco_core.recompress import device_plans
from toco_core.solver import device_limits


@lru_cache(maxsize=8)
def _load(result_dir: str, model_path: str) -> tuple[AnalysisResult, onnx.ModelProto, int]:
    model_file = Path(model_path)
    return load_result(Path(result_dir)), load_model(model_file), model_file.stat().st_size


def what_if(*, result_dir: str, model_path: str, profile: DeviceProfile | None, policy: Policy) -> dict[str, Any]:
    """``{"feasible", "plan", "reason", "limits"}``: the solver's best plan within the budget and limits.

    ``plan`` is a PlanSummary's JSON with the predictions only (``predicted_*``, the scales,
    ``base_file_bytes``): no measured figure is claimed. Limits = the tighter of the profile's usable
    memory/storage and the policy's. Storage sizes are those of the storage forms the analysis built;
    in an older analysis, whose sizes are estimates, when they rule every plan out the smallest plan is
    built once to read the coder's real cost, as the box does. Raises AnalysisError when the result
    directory is unusable.
    """
    result, model, base_bytes = _load(result_dir, model_path)
    mem, sto = device_limits(profile, policy)
    limits = {"memory": mem, "storage": sto}
    try:
        best = device_plans(model, result, base_bytes, profile, policy)[0]
    except InfeasibleError as exc:
        return {"feasible": False, "plan": None, "reason": str(exc), "limits": limits}
    plan = PlanSummary.from_plan(best, base_file_bytes=base_bytes)
    return {"feasible": True, "plan": plan.model_dump(mode="json"), "reason": None, "limits": limits}


def hardware_profile(device_id: str, hardware: dict) -> DeviceProfile:
    """The DeviceProfile in a stored HardwareInfo (other keys ignored: rows stored before the group
    had its own field carry one).

    Raises DeviceError naming the offending field when the box sent no valid profile.
    """
    fields = {k: v for k, v in hardware.items() if k in DeviceProfile.model_fields}
    return profile_from_dict({**fields, "device_id": device_id}, f"device {device_id!r}'s hardware")


def expected_infeasible(*, result_dir: str, model_path: str, hardware: dict[str, dict], budget: float) -> list[dict]:
    """The devices for which the solver finds no plan: ``[{"device_id", "reason"}]``, sorted by id.

    ``hardware`` maps device id -> the hardware dict of its birth message (a DeviceProfile with
    the box's caps). Devices without a readable profile are skipped: only the box can tell.
    Boxes with the same profile are planned once (planning reads curve numbers: milliseconds, plus one
    build where only storage rules every plan out).
    Raises AnalysisError when the result directory is unusable.
    """
    verdicts: dict[str, str | None] = {}
    out = []
    for device_id in sorted(hardware):
        fields = {k: v for k, v in hardware[device_id].items() if k in DeviceProfile.model_fields and k != "device_id"}
        key = repr(sorted(fields.items()))
        if key not in verdicts:
            try:
                profile = hardware_profile(device_id, fields)
            except DeviceError:
                verdicts[key] = None
                continue
            found = what_if(result_dir=result_dir, model_path=model_path, profile=profile, policy=Policy(budget=budget))
            verdicts[key] = found["reason"]
        if verdicts[key]:
            out.append({"device_id": device_id, "reason": verdicts[key]})
    return out
