"""The fleet server lays a bundle's bands out for its enrolled boxes (fleet_server.bundle_layout)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from fleet_server.bundle_layout import fleet_band_bounds
from fleet_server.db import Database, DeviceRow
from toco_core.band_layout import planned_levels
from toco_core.device import load_profile
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import compressible_weights, model_bytes
from toco_core.parts_bundle import BundleHead, pack_parts, source_from_parts
from toco_core.plan_build import build
from toco_core.solver import enumerate_plans

PROFILES = Path(__file__).resolve().parents[2] / "deploy" / "profiles"


def _device(s, device_id: str, profile: str | None, enrollment: str = "enrolled", allowed=None) -> None:
    hardware = json.loads((PROFILES / f"{profile}.json").read_text()) if profile else {"cpu_model": "x"}
    s.add(DeviceRow(id=device_id, group="line", online=True, birth=1, last_seen=time.time(), hardware=hardware,
                    enrollment=enrollment, allowed_models=allowed))


def test_bounds_follow_the_enrolled_boxes_that_may_run_the_model(tmp_path, lenet5, lenet5_analysis):
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    size = len(model_bytes(lenet5))
    assert fleet_band_bounds(db, "m1", lenet5_analysis, lenet5, size, 0.01) is None  # no box: every level
    with db.session(write=True) as s:
        for i in range(3):
            _device(s, f"hand-{i}", "handheld")
        _device(s, "pc-1", "line-pc")
        _device(s, "odd-1", None)  # no readable profile: left out, no error
        _device(s, "new-1", "camera-box", enrollment="quarantined")
        _device(s, "other-1", "camera-box", allowed=["m2"])
    bounds = fleet_band_bounds(db, "m1", lenet5_analysis, lenet5, size, 0.01)
    mine = [load_profile(PROFILES / f"{p}.json") for p in ("handheld", "line-pc")]
    expected = planned_levels(lenet5_analysis, compressible_weights(lenet5), size, mine, 0.01)
    assert bounds and bounds == expected
    # three handhelds and one line PC: the handhelds' levels come first
    hand = planned_levels(lenet5_analysis, compressible_weights(lenet5), size, mine[:1], 0.01)
    assert hand and set(bounds[:len(hand)]) == set(hand)
    # the bundle the server packs with them says so, and a handheld's plan reads one split
    head = BundleHead(pack_parts(lenet5, lenet5_analysis, BundleInfo(model_name="lenet5", model_sha256="0" * 64),
                                 band_bounds=bounds)["head"])
    assert head.layout.band_bounds == sorted(bounds, reverse=True)
    db.close()


def test_a_fleet_whose_boxes_do_not_prune_gets_one_group_and_its_boxes_read_no_split(tmp_path, lenet5,
                                                                                      lenet5_analysis):
    """Boxes known but none pruning: bounds [] (one group) rather than every level, so an unpruned plan
    downloads its codes without the prune splits, and still builds exactly the server's model."""
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    size = len(model_bytes(lenet5))
    with db.session(write=True) as s:
        s.add(DeviceRow(id="tiny-1", group="line", online=True, birth=1, last_seen=time.time(),
                        hardware={**json.loads((PROFILES / "handheld.json").read_text()), "memory_budget": 1000},
                        enrollment="enrolled"))
    assert fleet_band_bounds(db, "m1", lenet5_analysis, lenet5, size, 0.01) == []  # its plans: none fits
    db.close()
    info = BundleInfo(model_name="lenet5", model_sha256="0" * 64)
    one, every = (pack_parts(lenet5, lenet5_analysis, info, band_bounds=b) for b in ([], None))
    assert BundleHead(one["head"]).layout.band_bounds == []
    plan = next(p for p in enumerate_plans(lenet5_analysis, compressible_weights(lenet5), size, 0.4, True)
                if p.prune_scale == 0 and p.quant_scale > 0 and p.runtime == "fp32")
    need = BundleHead(one["head"]).parts_for_plan(plan)
    assert need and not [n for n in need if n.startswith("prune/")]
    weights = sum(len(one[n]) for n in need if not n.startswith("calib/"))
    every_need = BundleHead(every["head"]).parts_for_plan(plan)
    assert weights < sum(len(every[n]) for n in every_need if not n.startswith("calib/"))
    source, result, _ = source_from_parts({n: one[n] for n in need})
    box, server = build(source, result, plan), build(lenet5, lenet5_analysis, plan)
    assert model_bytes(box.runnable) == model_bytes(server.runnable)
