"""Drift statistics on the real LeNet-5, its noisy "compressed" stand-in and real MNIST digits."""

from __future__ import annotations

import time

import numpy as np
import pytest
from pydantic import ValidationError

from tests.agent_parts.conftest import quant_noise
from toco_core.demo.data import shifted_digits
from toco_core.drift import DriftReference, DriftSettings, DriftWindow, build_reference, evaluate_window
from toco_core.drift_monitor import DriftMonitor
from toco_core.errors import PoolError
from toco_core.fidelity import compare_outputs
from toco_core.runtime import make_session, run_batches

SETTINGS = DriftSettings(window_max_samples=100, window_min_samples=50, window_seconds=60,
                         shadow_fraction=0.3, consecutive_windows=3, max_disputed=12)


@pytest.fixture(scope="module")
def reference(lenet, digits) -> DriftReference:
    # Random pool samples, as the bundle's calibration set; the predicted fidelity is measured on them.
    cal = digits.x_pool[:500]
    comp_out = run_batches(lenet.compressed_session, cal)
    fid = compare_outputs(run_batches(lenet.base_session, cal), comp_out, digits.y_pool[:500])
    assert 0.95 < fid.agreement < 1.0  # the stand-in really differs from the base, a little
    return build_reference(cal, comp_out, fid.agreement, SETTINGS, expected_accuracy=fid.accuracy)


def stream(monitor, comp_session, base_session, x, y, windows, seed=0, label_share=0.2, batch=10):
    """Feed random live batches of ``x`` through the monitor; returns the closed windows."""
    rng = np.random.default_rng(seed)
    results, t = [], 0.0
    for b in range(windows * SETTINGS.window_max_samples // batch):
        idx = rng.integers(0, len(x), batch)
        xb = x[idx]
        out = comp_session.run(None, {"image": xb})[0]
        base = base_session.run(None, {"image": xb})[0] if monitor.should_shadow() else None
        labels = y[idx] if rng.random() < label_share else None
        t += 1.0
        res = monitor.observe(xb, out, base, labels, refs=[f"b{b}-{i}" for i in range(batch)], now=t)
        if res is not None:
            results.append(res)
    return results


def test_clean_heldout_digits_raise_no_alert(lenet, digits, reference):
    monitor = DriftMonitor(reference, SETTINGS, seed=1, now=0.0)
    results = stream(monitor, lenet.compressed_session, lenet.base_session, digits.x_heldout,
                     digits.y_heldout, windows=25)
    assert len(results) == 25
    assert not any(r.report.alert for r in results)
    assert sum(bool(r.report.out_of_band) for r in results) <= 2
    judged = [c for r in results for c in r.report.checks if c.name == "agreement" and c.in_band is not None]
    assert judged, "agreement was never judged: too few shadowed samples per window"
    rep = results[-1].report
    assert rep.n_samples == 100 and rep.predicted_agreement == reference.expected_agreement
    assert abs(rep.mean_confidence - reference.confidence_mean) < 0.05


@pytest.mark.parametrize("kind", ["rotate", "invert", "noise"])
def test_shifted_digits_alert_within_configured_windows(lenet, digits, reference, kind):
    x = shifted_digits(digits.x_heldout, kind)
    monitor = DriftMonitor(reference, SETTINGS, seed=2, now=0.0)
    results = stream(monitor, lenet.compressed_session, lenet.base_session, x, digits.y_heldout,
                     windows=SETTINGS.consecutive_windows)
    reports = [r.report for r in results]
    assert [r.alert for r in reports] == [False] * (SETTINGS.consecutive_windows - 1) + [True]
    assert monitor.alerting
    last = results[-1]
    assert {"confidence", "entropy_psi"} <= set(last.report.out_of_band)
    if kind != "rotate":  # rotation keeps pixel statistics close; inversion and noise change them a lot
        assert "input_shift" in last.report.out_of_band
    # Disputed samples: capped, their inputs attached, and really the doubtful ones.
    disputed = last.report.disputed
    assert 0 < len(disputed) <= SETTINGS.max_disputed
    assert last.disputed_inputs.shape == (len(disputed), 1, 28, 28)
    out = lenet.compressed_session.run(None, {"image": last.disputed_inputs})[0]
    assert [int(c) for c in out.argmax(1)] == [d.model_class for d in disputed]
    low = [d.confidence for d in disputed if d.reason == "low_confidence"]
    assert low and max(low) < last.report.mean_confidence


def test_agreement_band_catches_a_badly_compressed_model(lenet, digits, reference):
    broken = make_session(quant_noise(lenet.base, bits=2, seed=3))
    settings = SETTINGS.model_copy(update={"shadow_fraction": 1.0})
    monitor = DriftMonitor(reference, settings, seed=0, now=0.0)
    results = stream(monitor, broken, lenet.base_session, digits.x_heldout, digits.y_heldout, windows=1)
    report = results[0].report
    agreement = next(c for c in report.checks if c.name == "agreement")
    assert agreement.in_band is False and agreement.value < agreement.low
    assert report.measured_agreement == pytest.approx(agreement.value)
    assert report.disputed[0].reason == "disagreement"
    assert report.disputed[0].base_class != report.disputed[0].model_class


def test_window_closes_by_count_and_by_time_with_a_minimum(lenet, digits, reference):
    settings = DriftSettings(window_max_samples=40, window_min_samples=20, window_seconds=10)
    x = digits.x_heldout[:60]
    out = run_batches(lenet.compressed_session, x)
    monitor = DriftMonitor(reference, settings, now=0.0)
    assert monitor.observe(x[:10], out[:10], now=1.0) is None
    assert monitor.tick(now=100.0) is None  # old, but under the minimum count
    closed = monitor.observe(x[10:20], out[10:20], now=101.0)  # minimum reached and old: closes
    assert closed is not None and closed.report.n_samples == 20
    assert monitor.observe(x[20:59], out[20:59], now=102.0) is None  # 39 < 40, young
    closed = monitor.observe(x[59:60], out[59:60], now=102.5)  # count reached
    assert closed is not None and closed.report.n_samples == 40 and closed.report.window_index == 1


def test_feedback_labels_give_accuracy(lenet, digits, reference):
    x, y = digits.x_heldout[:30], digits.y_heldout[:30]
    out = run_batches(lenet.compressed_session, x)
    window = DriftWindow(SETTINGS, opened_at=0.0)
    window.add(x, out, refs=[f"r{i}" for i in range(30)])
    assert all(window.add_feedback(f"r{i}", int(y[i])) for i in range(30))
    assert not window.add_feedback("r0", 1)  # already used
    assert not window.add_feedback("unknown", 1)
    report = evaluate_window(window, reference, SETTINGS, closed_at=1.0)
    assert report.accuracy == pytest.approx(float((out.argmax(1) == y).mean()))
    assert report.n_labeled == 30


def test_reference_round_trips_as_json_and_rejects_other_inputs(reference, lenet):
    again = DriftReference.model_validate_json(reference.model_dump_json())
    assert again == reference
    window = DriftWindow(SETTINGS, opened_at=0.0)
    small = np.zeros((2, 1, 14, 14), np.float32)
    window.add(small, np.zeros((2, 10), np.float32))
    with pytest.raises(PoolError, match="features"):
        evaluate_window(window, reference, SETTINGS)
    with pytest.raises(PoolError, match="empty"):
        evaluate_window(DriftWindow(SETTINGS, 0.0), reference, SETTINGS)
    with pytest.raises(PoolError, match="rows"):
        window.add(small, np.zeros((3, 10), np.float32))


def test_settings_have_bounds():
    with pytest.raises(ValidationError, match="window_min_samples"):
        DriftSettings(window_min_samples=500, window_max_samples=100)
    with pytest.raises(ValidationError):
        DriftSettings(shadow_fraction=1.5)
    with pytest.raises(ValidationError):
        DriftSettings(unknown_key=1)


def test_reporter_loads_the_shadow_on_traffic_and_drops_it_when_idle(lenet, digits, reference):
    from agent.drift_reporter import DriftReporter

    sent, released = [], []
    reporter = DriftReporter(lambda m: sent.append(m) or True, "cam-1", SETTINGS, shadow_min_free=0,
                             shadow_idle_s=0.3, release=lambda: released.append(1), seed=0)
    try:
        reporter.attach("b" * 64, reference, lenet.base_bytes)
        assert reporter.shadowing and not reporter.shadow_loaded  # nothing loaded before traffic
        for b in range(12):  # one full window of traffic
            x = digits.x_heldout[b * 10:(b + 1) * 10]
            out = lenet.compressed_session.run(None, {"image": x})[0]
            reporter.hook(x, {"logits": out}, f"r{b}")
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sent and sent[0].n_shadowed > 0 and sent[0].measured_agreement is not None
        assert reporter.shadow_loaded
        time.sleep(0.4)
        reporter.tick()
        deadline = time.monotonic() + 5
        while reporter.shadow_loaded and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not reporter.shadow_loaded and released
        assert reporter.shadowing  # still on: the next traffic loads it again
    finally:
        reporter.close()


def test_reporter_gathers_requests_yet_closes_windows_where_single_requests_would(lenet, digits, reference):
    """Requests queued faster than the worker's gather time reach the monitor together; windows
    still hold exactly ``window_max_samples`` of them, shadowed and unshadowed alike."""
    from agent.drift_reporter import DriftReporter

    sent = []
    reporter = DriftReporter(lambda m: sent.append(m) or True, "cam-1", SETTINGS, shadow_min_free=0, seed=1,
                             gather_s=0.5)
    try:
        reporter.attach("b" * 64, reference, lenet.base_bytes)
        for b in range(70):  # 70 requests of 3 samples (210) within one gather: 2 windows, 10 samples left
            x = digits.x_heldout[b * 3:(b + 1) * 3]
            reporter.hook(x, {"logits": lenet.compressed_session.run(None, {"image": x})[0]}, f"r{b}")
        deadline = time.monotonic() + 10
        while len(sent) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)
        assert [m.n_samples for m in sent] == [102, 102]  # the request that fills 100 closes the window
        assert all(m.n_shadowed > 0 for m in sent)
        assert reporter._monitor.window.count == 210 - 204
    finally:
        reporter.close()
