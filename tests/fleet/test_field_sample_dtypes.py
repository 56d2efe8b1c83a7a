"""Field samples of a uint8 camera model stay uint8 through the server: the re-analysis job's
spec, its worker (run in-process here) and the scoring of disputed samples against the base.

A real SQLite registry, the real registry / job runner / scorer code and the real NHWC uint8
demo model; only the job's worker process is replaced by calling its body directly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from fleet_server.db import Database, DriftAlertRow, SampleRow
from fleet_server.events import EventBus
from fleet_server.jobs import JobRunner, field_samples_array, run_analysis_job
from fleet_server.registry import Store, add_analysis_row, add_model
from fleet_server.sample_scoring import SampleScorer
from toco_core.analysis.settings import AnalysisSettings
from toco_core.analysis_result import load_result
from toco_core.demo.layouts import nhwc_uint8_digits, nhwc_uint8_model
from toco_core.errors import PoolError
from toco_core.runtime import run_model


@pytest.fixture(scope="module")
def camera():
    return nhwc_uint8_model().read_bytes(), nhwc_uint8_digits()


@pytest.fixture
def registry(tmp_path, camera):
    onnx_bytes, digits = camera
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    store = Store(tmp_path / "data")
    pool = io.BytesIO()
    np.savez(pool, x=digits.x_pool[:200], y=digits.y_pool[:200])
    model = add_model(db, store, name="camera", onnx_bytes=onnx_bytes, pool_bytes=pool.getvalue())
    yield db, store, model["model_id"]
    db.engine.dispose()


def _row(device: str, ref: str, x: np.ndarray, dtype: str | None = None) -> SampleRow:
    """A stored upload as the ingest writes it: raw little-endian bytes of one sample."""
    a = np.ascontiguousarray(x if dtype is None else x.astype(dtype))
    return SampleRow(device_id=device, ref=ref, window=1, dtype=a.dtype.name, shape=list(a.shape),
                     data=a.astype(a.dtype.newbyteorder("<")).tobytes(), reason="disagreement")


def test_uint8_samples_stay_uint8_and_float_ones_from_old_agents_only_when_exact(camera):
    _, digits = camera
    x = digits.x_heldout[:3]
    rows = [_row("box", "a", x[0]), _row("box", "b", x[1], "float32"), _row("box", "c", x[2] / 255.0, "float32")]
    out = field_samples_array(rows, [None, 28, 28, 1], np.uint8)
    assert out.dtype == np.uint8 and out.shape == (2, 28, 28, 1)  # the 0..1 floats would be zeros: skipped
    np.testing.assert_array_equal(out, x[:2])
    # a float model still takes every sample (the old behaviour)
    assert field_samples_array(rows, [None, 28, 28, 1]).shape == (3, 28, 28, 1)


def test_the_reanalysis_with_field_samples_runs_on_uint8_inputs(registry, camera):
    db, store, model_id = registry
    _, digits = camera
    field = digits.x_heldout[:60]
    settings = AnalysisSettings(max_rounds=1, initial_samples=32, samples_per_round=16, max_heldout=100)
    with db.session(write=True) as s:
        rows = [_row("box-1", f"r{i}", xi) for i, xi in enumerate(field)]
        s.add_all(rows)
        s.flush()
        row = add_analysis_row(s, model_id=model_id, settings=settings, reason="drift",
                               field_sample_ids=[r.id for r in rows])
    runner = JobRunner(db, store, None, EventBus())
    with db.session(write=True) as s:
        spec = runner._spec(s, s.get(type(row), row.id))
    with np.load(spec["field_path"]) as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (60, 28, 28, 1)
    summary = run_analysis_job(spec)
    assert summary["pool_size"] == 260
    result = load_result(spec["out_dir"])
    assert result.analysis_x.dtype == np.uint8 and result.heldout_x.dtype == np.uint8
    # the field samples are among the analysed ones, byte for byte
    analysed = {a.tobytes() for a in np.concatenate([result.analysis_x, result.heldout_x])}
    assert sum(f.tobytes() in analysed for f in field) > 0


def test_disputed_uint8_samples_are_scored_against_the_base(registry, camera):
    db, store, model_id = registry
    onnx_bytes, digits = camera
    x = digits.x_heldout[:10]
    base_classes = run_model(onnx_bytes, x).argmax(1)
    with db.session(write=True) as s:
        s.add_all([_row("box-2", f"d{i}", xi) for i, xi in enumerate(x)])
        alert = DriftAlertRow(id="al-1", device_id="box-2", model_id=model_id, group="default", kind="unclassified",
                              status="classifying", why="test", created_at=0.0,
                              evidence={"disputed": [{"ref": f"d{i}", "model_class": int(c)}
                                                     for i, c in enumerate(base_classes)]})
        s.add(alert)
        s.flush()
        agreement, n = SampleScorer(budget=0.01, margin=0.02, wait_s=60).score(s, alert)
    assert (agreement, n) == (1.0, 10)


def test_a_float_pool_for_the_uint8_model_is_refused_at_registration(tmp_path, camera):
    onnx_bytes, digits = camera
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    pool = io.BytesIO()
    np.savez(pool, x=digits.x_pool[:50] / 255.0)
    with pytest.raises(PoolError, match="cannot hold exactly"):
        add_model(db, Store(tmp_path / "data"), name="camera", onnx_bytes=onnx_bytes, pool_bytes=pool.getvalue())
    db.engine.dispose()
