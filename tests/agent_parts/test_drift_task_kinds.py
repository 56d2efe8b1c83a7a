"""Drift window statistics per task kind (toco_core.drift, toco_core.drift_window) on real models:
the regression MLP on Friedman sensor readings, the digits embedding and a digits classifier
(tests/analysis_eval). The server's verdict on such reports: tests/fleet/test_task_kinds_server.py.

A model without classes has no confidence or entropy: its window reports the mean and spread of
its output summary, judges the summary's distribution (output_psi) and sends its outputs with the
disputed samples; a classifier's window is as before.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.analysis_eval.tail_models import digits_split, export_probs, train_mlp
from tests.analysis_eval.task_models import digit_images, embedding_model
from toco_core.demo.sensors import regression_model, sensor_split
from toco_core.drift import DriftSettings, build_reference
from toco_core.drift_kind import DATA
from toco_core.drift_monitor import DriftMonitor
from toco_core.drift_window import output_summary
from toco_core.runtime import run_model
from toco_core.task_kind import TaskKind, prepare, task_spec

SETTINGS = DriftSettings(window_max_samples=200, window_min_samples=50, shadow_fraction=1.0, max_disputed=8)


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    model = regression_model(tmp_path_factory.mktemp("regression") / "regression.onnx")
    x, _, hx, _ = sensor_split()
    out = run_model(model, x)
    task = task_spec(TaskKind.REGRESSION, out)
    return model, task, build_reference(x, out, 1.0, SETTINGS, task=task), hx


def _windows(monitor: DriftMonitor, model, x: np.ndarray, n: int):
    """n windows of ``model`` serving ``x`` (cycled), the base shadowing every input (the base
    itself serves, so agreement holds and only the data can drift)."""
    reports = []
    for w in range(n):
        xs = x[(np.arange(SETTINGS.window_max_samples) + w * SETTINGS.window_max_samples) % len(x)]
        out = run_model(model, xs)
        closed = monitor.observe(xs, out, out, refs=[f"w{w}.{i}" for i in range(len(xs))], now=float(w))
        assert closed is not None
        reports.append(closed.report)
    return reports


def test_a_regression_window_reports_its_output_not_a_confidence(regression):
    model, task, reference, hx = regression
    monitor = DriftMonitor(reference, SETTINGS, seed=0)
    (report,) = _windows(monitor, model, hx, 1)
    assert report.task_kind is TaskKind.REGRESSION
    assert report.mean_confidence is None and report.mean_entropy is None
    z = output_summary(task, prepare(task, run_model(model, hx[:200])))  # y / sigma of the one output value
    assert report.output_mean == pytest.approx(float(z.mean())) and report.output_std == pytest.approx(float(z.std()))
    assert [c.name for c in report.checks] == ["agreement", "output_psi", "input_shift"]
    assert report.out_of_band == [] and report.measured_agreement == 1.0
    # the disputed samples carry the served output (the server compares it with the base's)
    served = dict(zip([f"w0.{i}" for i in range(200)], run_model(model, hx[:200])[:, 0], strict=True))
    assert len(report.disputed) == SETTINGS.max_disputed
    for d in report.disputed:
        assert d.model_class == 0 and d.output == [pytest.approx(float(served[d.ref]))]


def test_shifted_sensor_readings_are_data_drift_by_the_output_distribution(regression):
    model, _, reference, hx = regression
    shifted = hx.copy()
    shifted[:, 3] = np.clip(shifted[:, 3] + 0.4, 0.0, 1.0)  # reading 4 enters the target linearly (10 x_4)
    monitor = DriftMonitor(reference, SETTINGS, seed=0)
    reports = _windows(monitor, model, shifted, SETTINGS.consecutive_windows)
    last = reports[-1]
    assert last.alert and "output_psi" in last.out_of_band and last.kind == DATA
    assert last.output_mean is not None and last.output_mean > reference.entropy_mean + 0.5  # in sigma units
    # accepted as normal: the rebased reference holds the shifted outputs, later windows are in band
    monitor.rebase(windows=SETTINGS.consecutive_windows)
    after = _windows(monitor, model, shifted[::-1], 3)
    assert not any(r.alert for r in after) and all("output_psi" not in r.out_of_band for r in after)


def test_a_thresholded_score_window_disputes_the_samples_nearest_its_decision(regression):
    model, _, _, hx = regression
    x = sensor_split()[0]
    out = run_model(model, x)
    task = task_spec(TaskKind.SCORE, out, threshold=float(np.median(out)))
    monitor = DriftMonitor(build_reference(x, out, 1.0, SETTINGS, task=task), SETTINGS, seed=0)
    (report,) = _windows(monitor, model, hx, 1)
    assert report.task_kind is TaskKind.SCORE and report.mean_confidence is None
    margin = np.abs(run_model(model, hx[:200])[:, 0] - task.threshold) / task.scale
    nearest = {f"w0.{i}" for i in np.argsort(margin)[:SETTINGS.max_disputed]}
    assert {d.ref for d in report.disputed} == nearest
    assert sorted(d.confidence for d in report.disputed) == pytest.approx(sorted(margin)[:SETTINGS.max_disputed])


def test_an_embedding_window_sends_the_whole_vector(tmp_path):
    model = embedding_model(tmp_path / "embedding.onnx")
    x, _, hx, _ = digit_images()
    x, hx = x.reshape(len(x), -1), hx.reshape(len(hx), -1)
    out = run_model(model, x)
    task = task_spec(TaskKind.EMBEDDING, out)
    monitor = DriftMonitor(build_reference(x, out, 1.0, SETTINGS, task=task), SETTINGS, seed=0)
    (report,) = _windows(monitor, model, hx, 1)
    assert report.task_kind is TaskKind.EMBEDDING and report.mean_confidence is None
    assert report.output_std is not None and report.output_std > 0 and "output_psi" not in report.out_of_band
    assert {len(d.output or []) for d in report.disputed} == {16}


def test_a_classifier_window_is_as_before(tmp_path):
    x, y, hx, _ = digits_split()
    model = export_probs(train_mlp(x, y), tmp_path / "probs.onnx", "probabilities")
    reference = build_reference(x, run_model(model, x), 1.0, SETTINGS, kind="probs")
    monitor = DriftMonitor(reference, SETTINGS, seed=0)
    (report,) = _windows(monitor, model, hx, 1)
    assert report.task_kind is None and report.output_mean is None and report.output_std is None
    assert report.mean_confidence is not None and 0.5 < report.mean_confidence <= 1.0
    assert report.mean_entropy is not None and report.mean_entropy > 0
    assert [c.name for c in report.checks] == ["agreement", "confidence", "entropy_psi", "input_shift"]
    assert all(d.output is None for d in report.disputed)
