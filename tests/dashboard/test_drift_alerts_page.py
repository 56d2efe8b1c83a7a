"""The device page shows a drift alert's kind and the operator's actions; the overview counts devices
per alert kind and lists the alerts that started no re-analysis, with the reason."""

from __future__ import annotations

import time

from fleet_server.db import DeviceRow, DriftAlertRow
from tests.dashboard.conftest import screenshot
from tests.dashboard.test_dashboard import open_view
from tests.support.waiting import wait_until


def test_device_page_shows_the_alert_kind_and_acknowledging_closes_it(fleet, devices, page, tmp_path):
    now = time.time()
    with fleet.server.db.session(write=True) as s:  # what the policy records for a box fed new data
        s.add(DriftAlertRow(id="a-dash00000001", device_id="box-64", model_id=None, group="default", bundle_id=None,
                            kind="data", status="open", why="drift alert held for 3 windows (input_shift out of band); "
                            "agreement 99.5% holds: the base model sees new data",
                            decision="data drift: the base model sees new data; no automatic re-analysis",
                            evidence={"windows": []}, created_at=now, updated_at=now))
        s.get(DeviceRow, "box-64").drift_kind = "data"
    open_view(page, fleet.url + "/")
    kinds = page.locator("#alert-kinds")
    assert kinds.locator("[data-kind='data'] b").inner_text() == "1"
    assert kinds.locator("[data-kind='fidelity'] b").inner_text() == "0"
    assert "no automatic re-analysis" in page.locator("#drift-decisions").inner_text()
    open_view(page, fleet.url + "/devices/box-64")
    page.wait_for_selector("#drift-alerts")
    row = page.locator("#drift-alerts tr[data-kind='data']")
    assert "new data" in row.inner_text() and "open" in row.inner_text()
    assert [b.inner_text() for b in row.locator("button").all()] == ["Accept as normal", "Acknowledge", "Re-analyse"]
    assert "new data" in page.locator(".page-head").inner_text()
    screenshot(page, tmp_path, "device-drift-alert")
    row.locator("button[data-action='acknowledge']").click()
    page.wait_for_function("!document.querySelector(\"#drift-alerts button[data-action='acknowledge']\")",
                           timeout=10_000)
    assert "acknowledged" in page.locator("#drift-alerts").inner_text()
    assert wait_until(lambda: fleet.api.get("/api/devices/box-64").json()["drift_kind"] is None)
