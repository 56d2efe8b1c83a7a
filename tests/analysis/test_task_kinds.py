"""Task kinds end to end on real models: a regression MLP, an autoencoder's anomaly score, an embedding.

Each is analysed (small pool, short QBC), recompressed for the three demo device profiles,
self-tested, and run in onnxruntime on held-out samples the analysis never saw; the held-out
fidelity is measured in the kind's own metric (toco_core.task_kind) and must be within the
budget up to the sampling slack the classifier tests allow.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.analysis_eval.tail_models import digits_split, export_probs, train_mlp
from tests.analysis_eval.task_models import autoencoder_score_model, digit_images, embedding_model
from toco_core.analysis.pipeline import analysis_task, analyze
from toco_core.analysis.settings import AnalysisSettings
from toco_core.analysis_result import AnalysisManifest, load_result, save_result
from toco_core.demo.sensors import regression_model, sensor_split
from toco_core.device import load_profile
from toco_core.drift import DriftSettings, build_reference
from toco_core.drift_monitor import DriftMonitor
from toco_core.errors import ConfigError
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import model_hash
from toco_core.output_tail import fidelity_view
from toco_core.parts_bundle import pack_parts, source_from_parts
from toco_core.plan import Policy
from toco_core.recompress import recompress
from toco_core.runtime import run_model
from toco_core.task_kind import CLASSIFIER, TaskKind, disagreement

REPO = Path(__file__).resolve().parents[2]
BUDGET = 0.02
PROFILES = ["handheld", "camera-box", "line-pc"]
FAST = dict(max_rounds=2, samples_per_round=48, initial_samples=48, budget=BUDGET)


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    model = regression_model(root / "regression.onnx")
    x, _, hx, _ = sensor_split()
    return model, analyze(model, x[:800], None, AnalysisSettings(**FAST), model_name="regression"), hx


@pytest.fixture(scope="module")
def anomaly(tmp_path_factory):
    """The autoencoder's reconstruction error analysed as `toco analyze --task score --threshold T` runs it."""
    root = tmp_path_factory.mktemp("anomaly")
    path = root / "anomaly.onnx"
    model = autoencoder_score_model(path)
    x, _, hx, _ = digit_images()
    threshold = float(np.quantile(run_model(model, x), 0.9))  # flag the 10% worst reconstructed
    np.save(root / "pool.npy", x[:800])
    out = root / "analysis"
    proc = subprocess.run([sys.executable, "-m", "toco_cli", "analyze", str(path), "--pool", str(root / "pool.npy"),
                           "-o", str(out), "--rounds", "2", "--budget", f"{BUDGET:.0%}", "--task", "score",
                           "--threshold", repr(threshold)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "task: score" in proc.stdout
    return model, load_result(out), hx, (path, out)


@pytest.fixture(scope="module")
def embedding(tmp_path_factory):
    root = tmp_path_factory.mktemp("embedding")
    model = embedding_model(root / "embedding.onnx")
    x, _, hx, _ = digit_images()
    flat = lambda a: a.reshape(len(a), -1)  # noqa: E731
    settings = AnalysisSettings(**FAST, task="embedding")
    return model, analyze(model, flat(x)[:800], None, settings, model_name="embedding"), flat(hx)


def _recompress_each_profile(model, result, held_x) -> list[str]:
    """Recompress for every demo profile; assert the self-test and the held-out fidelity in the task's metric."""
    labels = []
    base_out = run_model(model, held_x)
    for name in PROFILES:
        prof = load_profile(REPO / "deploy" / "profiles" / f"{name}.json")
        policy = Policy(budget=BUDGET, memory=prof.memory_budget, storage=prof.storage_budget,
                        latency_s=prof.latency_budget_s)
        built, report = recompress(model, result, prof, policy, measure_memory=False)
        assert report.self_test.passed and report.self_test.measured <= BUDGET + 1 / report.self_test.samples, name
        out = run_model(fidelity_view(built.runnable, result.manifest.scored_output), held_x)
        measured = disagreement(result.task, base_out, out)
        # as the classifier tests: the plan was chosen on the calibration half, so unseen samples may
        # differ by two standard errors of the difference of the two estimates
        slack = 2 * math.sqrt(BUDGET * (1 - BUDGET) * (1 / len(result.heldout_x) + 1 / len(held_x)))
        assert measured <= BUDGET + slack, (name, report.plan.label, measured)
        labels.append(report.plan.label)
    return labels


def test_regression_is_detected_and_measured_by_relative_error(regression):
    _, result, _ = regression
    task = result.task
    assert task.kind is TaskKind.REGRESSION and task.tolerance == 0.1
    assert task.scale == pytest.approx(float(np.std(run_model(regression[0], result.heldout_x))), rel=0.2)
    for curve in ("prune", "quantize", "prune+quantize"):  # the curves reach past the budget: they measure something
        assert max(p.disagreement for p in result.curves[curve].points) > BUDGET


def test_regression_recompressed_for_each_demo_profile(regression):
    model, result, hx = regression
    labels = _recompress_each_profile(model, result, hx)
    assert labels[0] != "base"  # the handheld's size objective finds a compressed plan within budget


def test_anomaly_score_recompressed_for_each_demo_profile(anomaly):
    model, result, hx, _ = anomaly
    assert result.task.kind is TaskKind.SCORE and result.task.threshold is not None
    _recompress_each_profile(model, result, hx)


def test_evaluate_cli_measures_in_the_analysis_task(anomaly, tmp_path):
    model, result, hx, (path, out) = anomaly
    prof = load_profile(REPO / "deploy" / "profiles" / "handheld.json")
    built, _ = recompress(model, result, prof, Policy(budget=BUDGET, objective="size"), measure_memory=False)
    small = tmp_path / "small.onnx"
    small.write_bytes(built.runnable.SerializeToString())
    np.save(tmp_path / "held.npy", hx)
    proc = subprocess.run([sys.executable, "-m", "toco_cli", "evaluate", str(small), str(path), "--pool",
                           str(tmp_path / "held.npy"), "--analysis", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "(score)" in proc.stdout
    want = 1 - disagreement(result.task, run_model(model, hx), run_model(built.runnable, hx))
    assert f"{want:.2%}" in proc.stdout


def test_embedding_recompressed_for_each_demo_profile(embedding):
    model, result, hx = embedding
    assert result.task.kind is TaskKind.EMBEDDING and result.task.tolerance == 0.02
    labels = _recompress_each_profile(model, result, hx)
    assert labels[0] != "base"


def test_the_task_travels_with_the_parts_and_the_box_gates_in_its_metric(regression):
    model, result, _ = regression
    info = BundleInfo(model_name="regression", model_sha256=model_hash(model), budget=BUDGET)
    parts = pack_parts(model, result, info)
    source, box_result, _ = source_from_parts(parts)
    assert box_result.task == result.task
    prof = load_profile(REPO / "deploy" / "profiles" / "handheld.json")
    _, report = recompress(source, box_result, prof, Policy(budget=BUDGET, objective="size"), measure_memory=False)
    assert report.self_test.passed


def test_the_drift_shadow_check_judges_in_the_task_metric(regression):
    model, result, hx = regression
    base_out = run_model(model, hx)
    settings = DriftSettings(window_max_samples=200, window_min_samples=10, shadow_fraction=1.0)
    reference = build_reference(result.heldout_x, run_model(model, result.heldout_x), 1.0, settings,
                                task=result.task)
    assert reference.task == result.task
    monitor = DriftMonitor(reference, settings, seed=0)
    # a served model 0.05 spreads off on every sample agrees (tolerance 0.1) ...
    near = base_out[:200] + 0.05 * result.task.scale
    closed = monitor.observe(hx[:200], near, base_out[:200], now=0.0)
    assert closed is not None and closed.report.measured_agreement == 1.0
    assert "agreement" not in closed.report.out_of_band
    # ... one 0.2 spreads off on every sample disagrees everywhere
    far = base_out[:200] + 0.2 * result.task.scale
    closed = monitor.observe(hx[:200], far, base_out[:200], now=1.0)
    assert closed is not None and closed.report.measured_agreement == 0.0
    assert "agreement" in closed.report.out_of_band


def test_old_results_and_references_load_as_classifiers(regression, tmp_path):
    _, result, _ = regression
    out = save_result(result, tmp_path / "analysis")
    data = json.loads((out / "manifest.json").read_text())
    assert data["task"]["kind"] == "regression"
    del data["task"]
    legacy = AnalysisManifest.model_validate(data)
    assert legacy.task is None
    reference = build_reference(result.heldout_x, run_model(regression[0], result.heldout_x)[:, [0, 0]], 1.0)
    assert reference.task is None


def test_detection_picks_classifier_for_softmax_and_regression_for_one_value(regression):
    x, y, _, _ = digits_split()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        probs = export_probs(train_mlp(x, y), Path(d) / "probs.onnx", "probabilities")
    assert analysis_task(probs, x[:50], AnalysisSettings()) == CLASSIFIER
    model, _, _ = regression
    sx = sensor_split()[0][:50]
    assert analysis_task(model, sx, AnalysisSettings()).kind is TaskKind.REGRESSION
    assert analysis_task(model, sx, AnalysisSettings(threshold=15.0)).kind is TaskKind.SCORE
    # overrides: a 1-wide output is a score when told; a softmax output may be judged as a regression
    assert analysis_task(model, sx, AnalysisSettings(task="score")).kind is TaskKind.SCORE
    assert analysis_task(probs, x[:50], AnalysisSettings(task="regression")).kind is TaskKind.REGRESSION
    with pytest.raises(ConfigError, match="--task classifier needs an output with at least 2 classes"):
        analysis_task(model, sx, AnalysisSettings(task="classifier"))
    with pytest.raises(ConfigError, match="--task embedding needs an output vector"):
        analysis_task(model, sx, AnalysisSettings(task="embedding"))
