"""Drift that converges: a persistent rotation (a knocked camera: every digit arrives rotated by 90
degrees from then on) on real agent processes, against a real server on a real mosquitto.

The same rotation is fed to two boxes of the same analysis:

- a small box (objective size: a 13 KB pruned and quantized model, only the codes of the weights it
  keeps downloaded, so it shadows nothing): its compressed model flips on rotated digits, the server
  scores its uploaded samples against the base and calls it fidelity drift; exactly one re-analysis
  with its field samples, the
  box runs the bundle built for them (within the budget on rotated digits), its reference is rebased,
  and every window after that is quiet;
- a near-lossless box (objective fidelity, also shadowing the master): its model keeps agreeing with
  the base on rotated digits, so the server calls it data drift: an operator alert, no re-analysis.

The gate's cooldown and daily cap are lifted, so nothing but convergence (the re-analysed bundle, the
rebase onto the field windows, escalation on the bundle built for this drift) keeps the server from
re-analysing the small box's persistent drift again and again.
"""

from __future__ import annotations

import dataclasses
import io
import re
import threading
import time

import httpx
import numpy as np
import pytest

from fleet_server.enrollment import enroll
from tests.agent_e2e.conftest import AgentProcess
from tests.fleet.conftest import device_json, wait_until
from tests.support.broker import Listener
from toco_core.demo.data import mnist_splits, shifted_digits
from toco_core.messages import DriftMessage, MessageKind, parse_message
from toco_core.runtime import run_model

pytestmark = pytest.mark.parametrize("fleet", ["mosquitto"], indirect=True)

# short windows: at the line's pace one closes about every 0.7 s; two out-of-band ones in a row alert
DRIFT = {"window_max_samples": 64, "window_min_samples": 32, "window_seconds": 30.0, "shadow_fraction": 0.5,
         "consecutive_windows": 2}
SMALL, LOSSLESS = "rot-small", "rot-lossless"
GROUPS = {SMALL: "g-rot-small", LOSSLESS: "g-rot-lossless"}
ROTATED_WINDOWS = 20  # the persistent shift lasts at least this many windows on every box
AFTER_REBASE = 12  # windows the small box serves the re-analysed bundle on its rebased reference


class Line:
    """A production line: batches of digits posted to an agent's inference API from a background thread."""

    def __init__(self, url: str, digits: np.ndarray, batch: int = 4, rate: float = 96.0) -> None:
        """Takes the agent's API URL, float32 digits [N, 1, 28, 28], samples per request and per second."""
        self.url, self.digits, self.batch, self.period = url, digits, batch, batch / rate
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rotate(self) -> None:
        """From now on every digit arrives rotated by 90 degrees (as the demo's knocked camera)."""
        self.digits = shifted_digits(self.digits, "rotate")

    def _run(self) -> None:
        i = 0
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                buf = io.BytesIO()
                np.save(buf, self.digits[np.arange(i, i + self.batch) % len(self.digits)])
                i += self.batch
                try:
                    client.post(self.url + "/v1/infer", content=buf.getvalue(),
                                headers={"Content-Type": "application/x-npy"}).raise_for_status()
                except httpx.HTTPError:  # the agent swaps its model: the line keeps going
                    self.errors += 1
                self._stop.wait(max(0.0, self.period - (time.monotonic() - start)))

    def start(self) -> Line:
        """Start posting; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop posting and join the thread."""
        self._stop.set()
        self._thread.join(5)


def windows(watch: Listener, device: str) -> list[DriftMessage]:
    """The drift windows ``device`` published so far, as the broker delivered them."""
    return [parse_message(MessageKind.DRIFT, p) for p in watch.on(f"/devices/{device}/drift")]


def top1_agreement(model: bytes, base: bytes, x: np.ndarray) -> float:
    """Share of ``x`` on which ``model`` and ``base`` predict the same class."""
    return float((run_model(model, x).argmax(-1) == run_model(base, x).argmax(-1)).mean())


def reanalyses(fleet, group: str) -> list[dict]:
    """GET /api/reanalyses of one group, newest first."""
    return [r for r in fleet.api.get("/api/reanalyses").json() if r["group"] == group]


def alerts(fleet, device: str) -> list[dict]:
    """GET /api/drift-alerts of one device, newest first."""
    return fleet.api.get("/api/drift-alerts", params={"device_id": device}).json()


def timeline(msgs: list[DriftMessage], t0: float) -> str:
    """The windows in words, for failure messages."""
    return "\n".join(f"{m.opened_at - t0:6.1f}s {(m.bundle_id or '-')[:6]} w{m.window_index} alert={m.alert} "
                     f"out={','.join(m.out_of_band) or '-'} agreement={m.measured_agreement} shadowed={m.n_shadowed}"
                     for m in msgs)


def start_box(fleet, tmp_path, device: str, objective: str, **extra) -> AgentProcess:
    """An enrolled agent process on the fleet's broker, running the fleet's analysed bundle."""
    enroll(fleet.server.db, device, GROUPS[device])
    (tmp_path / device).mkdir()
    agent = AgentProcess(tmp_path / device, device, fleet.server.broker_url, fleet.server.public_key_path,
                         fleet="test", group=GROUPS[device], objective=objective, upload_samples=True, drift=DRIFT,
                         **extra)
    agent.start()
    return agent


def test_a_persistent_rotation_reanalyses_once_then_stays_in_band(fleet, lenet, tmp_path):
    policy, base = fleet.server.policy, lenet["onnx"]
    saved = policy.mode, policy.gate
    policy.mode = "auto"
    policy.gate = dataclasses.replace(policy.gate, min_interval_s=0, daily_cap=1000)
    watch = Listener(fleet.port, [fleet.topics.device(MessageKind.DRIFT, d) for d in GROUPS])
    boxes: dict[str, AgentProcess] = {}
    lines: list[Line] = []
    try:
        # the lossless box keeps the master as its shadow (keep_master); the small box holds only the codes
        # of the weights its pruned plan keeps, so the server scores its uploaded samples
        boxes = {SMALL: start_box(fleet, tmp_path, SMALL, "size"),
                 LOSSLESS: start_box(fleet, tmp_path, LOSSLESS, "fidelity", keep_master=True)}
        assert wait_until(lambda: all(device_json(fleet, d).get("online") for d in boxes), 15)
        deps = [fleet.api.post("/api/deployments", json={"analysis_id": fleet.analysis["analysis_id"],
                                                         "target": {"group": g}}).json() for g in GROUPS.values()]
        assert wait_until(lambda: all(fleet.api.get(f"/api/deployments/{d['deployment_id']}").json()["stage"] == "done"
                                      for d in deps), 60, 0.2), [b.log_text() for b in boxes.values()]
        old_bundle = fleet.analysis["bundle_id"]
        assert device_json(fleet, SMALL)["active"]["shadow"] == "none", device_json(fleet, SMALL)["active"]["plan"]
        assert device_json(fleet, LOSSLESS)["active"]["shadow"] == "master"
        old_small = boxes[SMALL].served_model()
        digits = mnist_splits().x_heldout
        lines = [Line(boxes[d].url, digits).start() for d in (SMALL, LOSSLESS)]
        t0 = time.time()
        assert wait_until(lambda: all(len(windows(watch, d)) >= 3 for d in boxes), 30, 0.2)
        for line in lines:
            line.rotate()
        t_rotated = time.time()

        # the small box: an alert, its samples scored, one re-analysis, its bundle on the box, a rebase
        def converged() -> bool:
            rs = reanalyses(fleet, GROUPS[SMALL])
            return bool(rs) and rs[0]["status"] == "deployed" and SMALL in (rs[0]["rebased"] or []) and \
                "reason=converged" in boxes[SMALL].log_text(None)
        assert wait_until(converged, 90, 0.2), (reanalyses(fleet, GROUPS[SMALL]), boxes[SMALL].log_text())
        t_rebased = time.time()
        (r,) = reanalyses(fleet, GROUPS[SMALL])
        redone = fleet.api.get(f"/api/analyses/{r['analysis_id']}").json()
        new_bundle = redone["bundle_id"]
        assert new_bundle != old_bundle and device_json(fleet, SMALL)["active"]["bundle_id"] == new_bundle

        def soaked() -> bool:
            after = [m for m in windows(watch, SMALL) if m.opened_at >= t_rebased]
            rotated = min(sum(m.opened_at >= t_rotated for m in windows(watch, d)) for d in boxes)
            return len(after) >= AFTER_REBASE and rotated >= ROTATED_WINDOWS
        assert wait_until(soaked, 60, 0.2), timeline(windows(watch, SMALL), t0)
        time.sleep(1.0)  # the server's ticks judge the last windows too
        small, lossless = windows(watch, SMALL), windows(watch, LOSSLESS)
    finally:
        for line in lines:
            line.stop()
        policy.mode, policy.gate = saved
        watch.close()
        for box in boxes.values():
            box.stop()

    # before the rotation every box was in band
    assert not any(m.alert for m in small + lossless if m.closed_at <= t_rotated), timeline(small + lossless, t0)
    # the small box: fidelity drift, exactly one re-analysis for its group, then quiet on the new bundle
    assert any(m.alert for m in small if m.bundle_id == old_bundle and m.opened_at >= t_rotated)
    assert [x["reanalysis_id"] for x in reanalyses(fleet, GROUPS[SMALL])] == [r["reanalysis_id"]]
    assert "agreement with the base" in r["why"] and f"{SMALL}:" in r["why"]
    after = [m for m in small if m.opened_at >= t_rebased]
    assert {m.bundle_id for m in after} == {new_bundle}
    assert not any(m.alert for m in after), timeline(small, t0)
    # a window that alerts again on the old bundle while the re-analysis runs may file a second alert
    # (under load); every one is fidelity drift, none is left open, the re-analysis' own is resolved
    small_alerts = alerts(fleet, SMALL)
    assert {a["kind"] for a in small_alerts} == {"fidelity"} and all(a["status"] != "open" for a in small_alerts)
    alert = next(a for a in small_alerts if a["reanalysis_id"] == r["reanalysis_id"] and a["status"] == "resolved")
    assert "converged" in alert["decision"] and not device_json(fleet, SMALL)["alert"]
    # what the re-analysis fixed: on the rotated digits the box's new model agrees better than the old one
    budget = fleet.analysis["budget"]
    rotated = shifted_digits(digits, "rotate")
    before_fix, after_fix = (top1_agreement(m, base, rotated) for m in (old_small, boxes[SMALL].served_model()))
    # the pool's budget is the operator's scaled to the field share but floored at 2 / held-out: this small
    # analysis holds out ~76 samples, so the field inputs are held to about the budget's double, not the budget
    assert before_fix < after_fix and 1 - 2 * budget <= after_fix, (before_fix, after_fix, redone["budget"])
    assert redone["field_samples"] > 0 and redone["budget"] < budget
    # the near-lossless box: data drift, the operator's to decide; no re-analysis for its group
    assert sum(m.opened_at >= t_rotated for m in lossless) >= ROTATED_WINDOWS
    # one CI run on a loaded machine reported a window with no shadowed input (the agent skips a shadow
    # run while short of free memory, agent/drift_reporter.py; the cause there was not recorded): most
    # windows, not necessarily every one, are shadowed
    shadowed = [m for m in lossless if m.n_shadowed > 0]
    assert len(shadowed) >= 0.8 * len(lossless), timeline(lossless, t0)
    (data,) = alerts(fleet, LOSSLESS)
    assert (data["kind"], data["status"]) == ("data", "open") and "the base model sees new data" in data["why"]
    assert reanalyses(fleet, GROUPS[LOSSLESS]) == []
    _report(small, t_rotated, t_rebased, r, before_fix, after_fix)


def _report(small: list[DriftMessage], t_rotated: float, t_rebased: float, r: dict, before: float,
            after: float) -> None:
    """The small box's timeline in numbers (shown with ``pytest -s``): windows and re-analyses started."""
    rotated = [m for m in small if m.opened_at >= t_rotated]
    span = max(m.closed_at for m in rotated) - t_rotated
    quiet = [m for m in rotated if m.opened_at >= t_rebased]
    print(f"\n{SMALL}: {len(rotated)} rotated windows in {span:.0f} s, 1 re-analysis started "
          f"{r['created_at'] - t_rotated:.1f} s after the rotation; {len(quiet)} windows after the rebase, "
          f"{sum(bool(m.out_of_band) for m in quiet)} out of band, 0 alerts; agreement with the base on "
          f"rotated digits {before:.1%} -> {after:.1%}; " + re.sub(r"\s+", " ", r["why"]))
