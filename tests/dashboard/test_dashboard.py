"""The dashboard in real chromium against a real fleet server fed over a real mosquitto."""

from __future__ import annotations

import time

from fleet_server.enrollment import enroll
from tests.dashboard.conftest import BUNDLE, HARDWARE, PLANS, SimDevice, screenshot
from tests.support.waiting import wait_until
from toco_core.messages import DriftCheck, DriftMessage, MessageKind
from toco_core.task_kind import TaskKind


def open_view(page, url: str) -> None:
    """Load a dashboard page and wait until its data is drawn and the event stream is live."""
    page.goto(url)
    page.wait_for_function("document.body.dataset.ready === '1'", timeout=10_000)
    page.wait_for_selector("#live[data-state='live']", timeout=10_000)


def test_overview_lists_devices_with_plans_and_escapes_device_text(fleet, devices, page, tmp_path):
    open_view(page, fleet.url + "/")
    rows = page.locator("#devices tbody tr")
    assert rows.count() == 3
    for name, plan in PLANS.items():
        row = page.locator(f"#devices tr[data-device='{name}']")
        text = row.inner_text()
        assert plan.label in text
        assert f"{100 - 100 * plan.predicted_disagreement:.1f}%" in text  # predicted agreement
        assert f"{100 - 100 * plan.measured_disagreement:.1f}%" in text  # self-test agreement
        assert "of 243 KB" in text  # size vs base
        assert "window 11" in text  # last drift window
    assert page.locator("#devices tr[data-device='camera-256'] .badge").first.inner_text() == "Drift alert"
    assert page.locator(".count[data-state='alert'] b").inner_text() == "1"
    assert page.locator(".count[data-state='online'] b").inner_text() == "2"
    # the hostile cpu_model is shown as text and never ran
    assert HARDWARE["box-64"]["cpu_model"] in page.locator("#devices tr[data-device='box-64']").inner_text()
    assert page.evaluate("window.__pwned") is None
    assert page.locator("#devices img").count() == 0
    screenshot(page, tmp_path, "overview")

    # a new device's birth shows up without a reload
    page.evaluate("window.__same_page = true")
    enroll(fleet.server.db, "handheld-7", "default")
    late = SimDevice(fleet.port, "handheld-7", {**HARDWARE["box-64"], "cpu_model": "Cortex-A7"}, None)
    try:
        page.wait_for_selector("#devices tr[data-device='handheld-7']", timeout=10_000)
        assert page.evaluate("window.__same_page") is True
        assert "no model yet" in page.locator("#devices tr[data-device='handheld-7']").inner_text()
        assert page.locator(".count.total b").inner_text() == "4"
    finally:
        late.close()

    # a device the server never enrolled is shown, marked quarantined
    stranger = SimDevice(fleet.port, "stranger-1", HARDWARE["box-64"], None)
    try:
        page.wait_for_selector("#devices tr[data-device='stranger-1']", timeout=10_000)
        badge = page.locator("#devices tr[data-device='stranger-1'] .badge").first
        assert badge.inner_text() == "Quarantined: not enrolled"
    finally:
        stranger.close()


def test_device_page_draws_drift_and_appends_a_new_window_live(fleet, devices, page, tmp_path):
    open_view(page, fleet.url + "/devices/camera-256")
    assert page.locator("h1").inner_text() == "camera-256"
    agreement = page.locator("[data-chart='drift-agreement']")
    # 12 windows of measured agreement plus the predicted line's 12 points
    assert agreement.locator("circle").count() == 24
    assert agreement.locator("polygon.band").count() == 1
    assert agreement.locator("circle.alert").count() == 3  # windows 9-11 drifted out of the agreement band
    assert agreement.locator("rect.alert-strip").count() == 3
    assert page.locator("[data-chart='drift-shift'] circle").count() == 12
    assert page.locator("[data-chart='drift-confidence'] polygon.band").count() == 1
    assert page.locator("[data-chart='tel-cpu'] polyline").count() == 2
    assert "Cortex-A53" in page.locator("#hw").inner_text()
    active = page.locator("#active").inner_text()
    assert PLANS["camera-256"].label in active and "3.25 ms" in active and "of 243 KB" in active
    screenshot(page, tmp_path, "device")

    page.evaluate("window.__same_page = true")
    devices["camera-256"].drift(12, time.time(), agreement=0.7, shift=0.95)
    page.wait_for_function("document.getElementById('drift').dataset.points === '13'", timeout=10_000)
    assert page.evaluate("window.__same_page") is True
    assert agreement.locator("circle.alert").count() == 4
    assert agreement.locator("rect.alert-strip").count() == 4
    assert "#12" in page.locator("#last").inner_text()
    assert "70.0%" in page.locator("#last").inner_text()
    screenshot(page, tmp_path, "device-after-new-window")


def test_a_regression_devices_page_draws_its_output_summary_not_a_confidence(fleet, page, tmp_path):
    """A model without classes reports no confidence (toco_core.drift): its device page charts the
    output summary's mean and spread instead of an empty confidence chart."""
    enroll(fleet.server.db, "sensor-1", "default")
    # born without an active model: the module's other tests count the devices running BUNDLE
    sensor = SimDevice(fleet.port, "sensor-1", HARDWARE["line-pc"])
    try:
        now = time.time()
        for w in range(5):
            checks = [DriftCheck(name="agreement", value=1.0, reference=1.0, low=0.95, high=1.0, n=64, in_band=True),
                      DriftCheck(name="output_psi", value=0.02, reference=0.0, low=0.0, high=0.3, n=200, in_band=True),
                      DriftCheck(name="input_shift", value=0.05, reference=0.0, low=0.0, high=0.3, n=200,
                                 in_band=True)]
            sensor.send(MessageKind.DRIFT, DriftMessage(
                device_id="sensor-1", bundle_id=BUNDLE, window_index=w, opened_at=now - (6 - w) * 60,
                closed_at=now - (5 - w) * 60, n_samples=200, n_shadowed=64, predicted_agreement=0.99,
                measured_agreement=1.0, task_kind=TaskKind.REGRESSION, output_mean=3.1 + 0.01 * w, output_std=1.0,
                input_mean=0.5, input_std=0.29, checks=checks))
        assert wait_until(lambda: len(fleet.api.get("/api/drift", params={"device_id": "sensor-1"}).json()) >= 5, 15)
        open_view(page, fleet.url + "/devices/sensor-1")
        assert page.locator("[data-chart='drift-output'] circle").count() >= 5
        assert page.locator("[data-chart='drift-confidence']").count() == 0
        last = page.locator("#last").inner_text()
        assert "Output summary" in last and "3.140" in last and "Confidence" not in last
        screenshot(page, tmp_path, "device-regression")
    finally:
        sensor.close()


def test_unknown_device_page_says_so(fleet, page):
    page.goto(fleet.url + "/devices/nope-1")
    page.wait_for_selector(".error")
    assert "nope-1" in page.locator(".error").inner_text()
    assert page.console_errors == ["Failed to load resource: the server responded with a status of 404 (Not Found)"]
    page.console_errors.clear()


def test_analysis_page_charts_and_what_if(fleet, devices, page, tmp_path):
    def done() -> bool:
        status = fleet.api.get(f"/api/analyses/{fleet.analysis_id}").json()["status"]
        assert status != "failed", fleet.api.get(f"/api/analyses/{fleet.analysis_id}").json()["error"]
        return status == "done"

    assert wait_until(done, timeout=120, step=0.5), "the LeNet analysis did not finish in 120 s"
    detail = fleet.api.get(f"/api/analyses/{fleet.analysis_id}").json()
    open_view(page, f"{fleet.url}/analyses/{fleet.analysis_id}")
    assert page.locator("h1").inner_text() == "lenet5"
    assert page.locator("[data-chart='tolerance'] g.range").count() == len(detail["manifest"]["tensors"])
    assert page.locator("[data-chart='curve-prune'] circle").count() == len(detail["curves"]["prune"]["points"])
    assert page.locator("[data-chart='curve-quantize'] circle").count() > 0
    assert page.locator("#rounds tbody tr").count() == len(detail["manifest"]["rounds"])

    # what-if for a known device: a plan with its predicted fidelity
    page.select_option("#whatif-device", "camera-256")
    page.click("#whatif-form button[type=submit]")
    page.wait_for_selector("#whatif-result, #whatif-out .error")
    assert page.locator("#whatif-out .error").count() == 0, page.locator("#whatif-out").inner_text()
    result = page.locator("#whatif-result")
    assert "feasible" in result.get_attribute("class").split()
    assert "Predicted agreement" in result.inner_text()
    screenshot(page, tmp_path, "analysis")

    # typed limits nobody can meet: the reason, not a plan
    page.select_option("#whatif-device", "")
    page.fill("input[name=storage_kb]", "1")
    page.click("#whatif-form button[type=submit]")
    page.wait_for_selector("#whatif-result.infeasible")
    assert "storage" in page.locator("#whatif-result").inner_text()
    screenshot(page, tmp_path, "analysis-infeasible")


def test_deployments_table_names_the_boxes_expected_to_find_no_plan(fleet, devices, page, tmp_path):
    """A box whose storage cap no plan fits still gets the deployment; the overview says so up front,
    from the deployment record (not from the create answer, which the page never saw)."""
    assert wait_until(lambda: fleet.api.get(f"/api/analyses/{fleet.analysis_id}").json()["status"] == "done",
                      timeout=120, step=0.5), "the LeNet analysis did not finish in 120 s"
    enroll(fleet.server.db, "tiny-9", "default")
    tiny = SimDevice(fleet.port, "tiny-9", {**HARDWARE["box-64"], "cpu_model": "Cortex-M7", "storage_budget": 2000},
                     None)
    try:
        assert wait_until(lambda: fleet.api.get("/api/devices/tiny-9").json().get("online"), 10)
        r = fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis_id, "target": {"device": "tiny-9"}})
        assert r.status_code in (200, 201), r.text
        dep_id = r.json()["deployment_id"]
        stored = fleet.api.get(f"/api/deployments/{dep_id}").json()["expected_infeasible"]
        assert [w["device_id"] for w in stored] == ["tiny-9"] and "storage" in stored[0]["reason"]
        open_view(page, fleet.url + "/")
        cell = page.locator("#deployments .expected-infeasible").first
        assert "1 (tiny-9)" in cell.inner_text()
        assert "tiny-9: " in cell.get_attribute("title") and "storage" in cell.get_attribute("title")
        screenshot(page, tmp_path, "overview-expected-infeasible")
    finally:
        tiny.close()
