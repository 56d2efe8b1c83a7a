"""The overview shows which model version each device and group runs, the device page its own (derived
from the active bundle)."""

from __future__ import annotations

import time

from fleet_server.db import BundleRow, ModelRow
from tests.dashboard.conftest import BUNDLE, HARDWARE, screenshot
from tests.dashboard.test_dashboard import open_view


def test_overview_shows_the_version_each_device_and_group_runs(fleet, devices, page, tmp_path):
    # the simulated devices report BUNDLE active: make it a bundle the server built from "camnet" v1
    with fleet.server.db.session(write=True) as s:
        s.add(ModelRow(id="m-camnet", name="camnet", sha256="00", weights=1, size_bytes=1, pool_size=1, path="-",
                       pool_path="-", created_at=time.time(), version=1, lineage_id="m-camnet"))
        s.add(BundleRow(id=BUNDLE, analysis_id="a-none", model_id="m-camnet", path="-", size=1, manifest={},
                        created_at=time.time()))
    open_view(page, fleet.url + "/")
    rows = page.locator("#group-versions tbody tr")
    assert rows.count() >= 1
    text = page.locator("#group-versions").inner_text()
    assert "camnet v1" in text and str(len(HARDWARE)) in text
    for name in HARDWARE:
        assert "camnet v1" in page.locator(f"#devices tr[data-device='{name}']").inner_text()
    screenshot(page, tmp_path, "overview-versions")
    open_view(page, fleet.url + "/devices/box-64")
    assert "camnet v1" in page.locator("main").inner_text()
