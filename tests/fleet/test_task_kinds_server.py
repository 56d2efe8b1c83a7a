"""The server's side of task kinds: it scores an unshadowed box's disputed samples in the task kind
of the bundle's analysis, and takes no drift alert of a model without classes from its (constant)
confidence.

A real regression MLP (toco_core/demo/sensors.py) analysed once, a real SQLite registry
with its model, analysis and bundle rows, and the box's side as the agent runs it: a drift
monitor without shadow runs closes a window of the served model's outputs, its report travels as
wire bytes, the alert keeps its disputed samples (fleet_server.drift_policy.disputed_evidence)
and the uploaded inputs are stored as the ingest stores them. The served model is the base itself
(it agrees) or the base with 90% of its weights pruned by magnitude (it does not).
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from fleet_server.db import BundleRow, Database, DriftAlertRow
from fleet_server.drift_classify import verdict
from fleet_server.drift_policy import disputed_evidence
from fleet_server.registry import Store, add_analysis_row, add_model
from fleet_server.sample_scoring import SampleScorer, Unscorable, sample_agreement
from tests.analysis_eval.task_models import digit_images, embedding_model
from tests.fleet.test_field_sample_dtypes import _row
from toco_core.analysis.pipeline import analyze
from toco_core.analysis.settings import AnalysisSettings
from toco_core.analysis_result import save_result
from toco_core.compression.pruning import magnitude_thresholds, prune
from toco_core.demo.sensors import regression_model, sensor_split
from toco_core.drift import DriftSettings, build_reference
from toco_core.drift_kind import DATA, FIDELITY
from toco_core.drift_monitor import DriftMonitor
from toco_core.messages import DriftCheck, DriftMessage, MessageKind, encode, parse_message
from toco_core.onnx_model import read_weights, with_weights
from toco_core.runtime import run_model
from toco_core.task_kind import TaskKind, task_spec

BUNDLE = "b" * 64
SETTINGS = DriftSettings(window_max_samples=64, window_min_samples=10, shadow_fraction=0.0, max_disputed=16)
FAST = AnalysisSettings(initial_samples=32, samples_per_round=16, max_rounds=1, max_heldout=100, prune_rounds=1,
                        prune_round_samples=16, committee_members=2)


def _pruned(model, share: float):
    weights = read_weights(model)
    tau = {k: np.array(t, dtype=np.float32) for k, t in magnitude_thresholds(weights, share).items()}
    return with_weights(model, prune(weights, tau))


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    root = tmp_path_factory.mktemp("regression")
    model = regression_model(root / "regression.onnx")
    x, _, hx, _ = sensor_split()
    result = analyze(model, x[:300], None, FAST, model_name="regression")
    assert result.task.kind is TaskKind.REGRESSION
    return model, save_result(result, root / "analysis"), result, hx


@pytest.fixture
def fleet(tmp_path, regression):
    """A registry holding the regression model, its done analysis and a bundle built from it."""
    model, result_dir, _, _ = regression
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    pool = io.BytesIO()
    np.savez(pool, x=sensor_split()[0][:100])
    m = add_model(db, Store(tmp_path / "data"), name="regression", onnx_bytes=model.SerializeToString(),
                  pool_bytes=pool.getvalue())
    with db.session(write=True) as s:
        a = add_analysis_row(s, model_id=m["model_id"], settings=FAST)
        a.status, a.result_dir = "done", str(result_dir)
        s.add(BundleRow(id=BUNDLE, analysis_id=a.id, model_id=m["model_id"], path=str(tmp_path / "bundle"), size=1,
                        manifest={}))
    yield db, m["model_id"]
    db.engine.dispose()


def _box_window(result, base, served, x: np.ndarray) -> tuple[DriftMessage, np.ndarray]:
    """One closed window of an unshadowed box serving ``served``: its report as the server parses
    it off the wire, and the inputs of its disputed samples."""
    reference = build_reference(result.heldout_x, run_model(base, result.heldout_x), 1.0, SETTINGS, task=result.task)
    monitor = DriftMonitor(reference, SETTINGS, seed=0)
    closed = monitor.observe(x, run_model(served, x), refs=[f"r{i}" for i in range(len(x))], now=0.0)
    assert closed is not None
    msg = DriftMessage.from_report(closed.report, device_id="box-1", bundle_id=BUNDLE)
    parsed = parse_message(MessageKind.DRIFT, encode(msg))
    assert isinstance(parsed, DriftMessage)
    return parsed, np.asarray(closed.disputed_inputs)


class _Policy:
    """Records the scorer's verdicts (the drift policy's reaction to them is tested elsewhere)."""

    def __init__(self) -> None:
        self.verdicts: list = []

    def classified(self, s, alert, v, after) -> None:
        self.verdicts.append(v)


def _classify(db: Database, model_id: str, msg: DriftMessage, inputs: np.ndarray, outputs: bool = True):
    """The server's side: the alert with the report's disputed samples, the uploads, one scorer tick."""
    evidence = disputed_evidence(msg)
    if not outputs:  # as an agent older than DisputedRef.output reports them
        evidence = [{k: v for k, v in d.items() if k != "output"} for d in evidence]
    policy = _Policy()
    with db.session(write=True) as s:
        s.add_all([_row("box-1", d.ref, xi) for d, xi in zip(msg.disputed, inputs, strict=True)])
        alert = DriftAlertRow(id="al-1", device_id="box-1", model_id=model_id, group="default", bundle_id=BUNDLE,
                              kind="unclassified", status="classifying", why="test", created_at=0.0,
                              evidence={"disputed": evidence})
        s.add(alert)
        s.flush()
        scorer = SampleScorer(budget=0.02, margin=0.03, wait_s=60)
        got = scorer.score(s, alert) if outputs else None
        scorer.tick(s, policy, now=1.0, after=[])
        return got, policy.verdicts, alert.status, alert.decision


def test_a_regression_box_reports_its_outputs_and_the_server_finds_agreement(fleet, regression):
    db, model_id = fleet
    model, _, result, hx = regression
    msg, inputs = _box_window(result, model, model, hx[:64])
    assert len(msg.disputed) == SETTINGS.max_disputed
    assert all(d.output is not None and len(d.output) == 1 for d in msg.disputed)
    (agreement, n), verdicts, _, _ = _classify(db, model_id, msg, inputs)
    assert (agreement, n) == (1.0, SETTINGS.max_disputed)
    assert [v.kind for v in verdicts] == [DATA]


def test_a_heavily_pruned_regression_model_is_found_out_in_relative_error(fleet, regression):
    db, model_id = fleet
    model, _, result, hx = regression
    bad = _pruned(model, 0.9)
    msg, inputs = _box_window(result, model, bad, hx[:64])
    # what the server must find: the share of these samples whose error exceeds the tolerance
    rel = np.abs(run_model(bad, inputs) - run_model(model, inputs))[:, 0] / result.task.scale
    (agreement, n), verdicts, _, _ = _classify(db, model_id, msg, inputs)
    assert n == SETTINGS.max_disputed and agreement == pytest.approx(float(np.mean(rel <= result.task.tolerance)))
    assert agreement < 0.5
    assert [v.kind for v in verdicts] == [FIDELITY]


def test_without_the_boxs_outputs_the_operator_decides(fleet, regression):
    db, model_id = fleet
    model, _, result, hx = regression
    msg, inputs = _box_window(result, model, _pruned(model, 0.9), hx[:64])
    _, verdicts, status, decision = _classify(db, model_id, msg, inputs, outputs=False)
    assert verdicts == [] and status == "open"
    assert "reported no model output for its regression samples" in decision


def test_embedding_and_thresholded_score_agreement_in_their_metrics(tmp_path):
    model = embedding_model(tmp_path / "embedding.onnx")
    x = digit_images()[2][:40].reshape(40, -1)
    base = run_model(model, x)
    task = task_spec(TaskKind.EMBEDDING, base)
    assert sample_agreement(task, base, base.tolist()) == 1.0
    served = run_model(_pruned(model, 0.9), x)
    cos = (base * served).sum(1) / np.linalg.norm(served, axis=1)  # the base rows are unit vectors
    assert sample_agreement(task, base, served.tolist()) == pytest.approx(float(np.mean(cos >= 0.98)))
    with pytest.raises(Unscorable, match="outputs of \\[8\\] values, the base gives 16"):
        sample_agreement(task, base, served[:, :8].tolist())
    # a score: within the tolerance but across the threshold disagrees
    y = np.linspace(0.0, 1.0, 11)[:, None]
    score = task_spec(TaskKind.SCORE, y, threshold=0.5)
    nudged = y + np.where(np.abs(y - 0.5) < 0.06, 0.02, 0.0) * (1 - 2 * (y > 0.5))
    assert sample_agreement(score, y, nudged.tolist()) == pytest.approx(10 / 11)


def test_classifier_alerts_are_still_scored_by_class():
    # tests/fleet/test_field_sample_dtypes.py scores the uint8 camera classifier end to end; here the
    # rule itself: the base's top-1 against the box's class, without any output field
    base = np.eye(4)[[0, 1, 2, 3]] * 5.0
    assert sample_agreement(task_spec(TaskKind.CLASSIFIER, base), base, [0, 1, 2, 0]) == 0.75


def _alert(task_kind: TaskKind | None, out_of_band: list[str]) -> DriftMessage:
    checks = [DriftCheck(name="agreement", value=1.0, reference=1.0, low=0.9, high=1.0, n=50, in_band=True),
              *(DriftCheck(name=n, value=0.5, reference=1.0, low=0.97, high=1.0, n=200, in_band=False)
                for n in out_of_band)]
    return DriftMessage(device_id="box-1", opened_at=0.0, closed_at=1.0, n_samples=200, n_shadowed=50,
                        measured_agreement=1.0, task_kind=task_kind, input_mean=0.5, input_std=0.3, checks=checks,
                        out_of_band=out_of_band, consecutive_out_of_band=3, alert=True)


def test_the_server_takes_no_confidence_alert_from_a_model_without_classes():
    # a report whose alert rests on the classifier-only checks triggers nothing for a regression ...
    assert verdict(_alert(TaskKind.REGRESSION, ["confidence"]), budget=0.02, margin=0.03) is None
    assert verdict(_alert(TaskKind.EMBEDDING, ["confidence", "entropy_psi"]), budget=0.02, margin=0.03) is None
    # ... its output distribution does, and a classifier's confidence does as before
    for kind, checks in ((TaskKind.SCORE, ["output_psi"]), (None, ["confidence"]),
                         (TaskKind.CLASSIFIER, ["entropy_psi"]), (TaskKind.REGRESSION, ["confidence", "input_shift"])):
        got = verdict(_alert(kind, checks), budget=0.02, margin=0.03)
        assert got is not None and got.kind == DATA, (kind, checks)
