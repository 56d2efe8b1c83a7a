"""The API's views read the typed plan; the server owns a device's group. No server needed."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fleet_server.enrollment import note_claimed_group
from fleet_server.views import active_view
from tests.fleet.conftest import PLAN

BID = "cd" * 32


def test_active_view_reads_the_typed_plan() -> None:
    """From a birth (ActiveModel: a plan, no agreements of its own)."""
    view = active_view({"bundle_id": BID, "model_name": None, "slot": "a", "plan": PLAN.model_dump(mode="json")})
    assert view is not None
    assert view["plan_label"] == PLAN.label and view["model_name"] == "lenet5"
    assert (view["storage_bytes"], view["base_file_bytes"]) == (PLAN.storage_bytes, PLAN.base_file_bytes)
    assert PLAN.predicted_disagreement is not None and PLAN.measured_disagreement is not None
    assert view["predicted_agreement"] == pytest.approx(1 - PLAN.predicted_disagreement)
    assert view["measured_agreement"] == pytest.approx(1 - PLAN.measured_disagreement)


def test_active_view_never_shows_a_prediction_as_a_measurement() -> None:
    """A row stored before the plan was typed (a simulator's predicted size): no built size is claimed."""
    view = active_view({"bundle_id": BID, "plan": {"label": "prune 50% / fp32", "predicted_storage": 60_000,
                                                   "base_bytes": 248_433},
                        "predicted_agreement": 0.99, "measured_agreement": 0.985})
    assert view is not None
    assert view["storage_bytes"] is None and view["plan"]["predicted_storage_bytes"] == 60_000
    assert view["base_file_bytes"] == 248_433
    assert (view["predicted_agreement"], view["measured_agreement"]) == (0.99, 0.985)  # the status's, as a fallback


def test_active_view_survives_a_plan_it_cannot_read() -> None:
    view = active_view({"bundle_id": BID, "model_name": "lenet5", "plan": {"ops": []}, "measured_agreement": 0.98})
    assert view is not None
    assert view["bundle_id"] == BID and view["plan"] is None and view["plan_label"] is None
    assert view["measured_agreement"] == 0.98
    assert active_view({"bundle_id": None, "plan": PLAN.model_dump(mode="json")}) is None


@pytest.mark.parametrize(("stored", "reported", "mismatch"), [
    ("default", "line-1", True),   # even a device in the default group cannot pick its own
    ("line-1", "line-1", False),
    ("line-1", "line-2", True),    # the enrolled group wins, the claim is logged
    ("line-1", None, False),       # an agent that names no group
])
def test_the_server_owns_the_group(stored: str, reported: str | None, mismatch: bool) -> None:
    device = SimpleNamespace(id="cam-1", group=stored, enrollment="enrolled")
    assert note_claimed_group(device, reported) is mismatch  # type: ignore[arg-type]  # a stand-in DeviceRow
    assert device.group == stored
