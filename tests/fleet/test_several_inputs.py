"""A model with two inputs registered on the server and analysed by the job runner's code: the pool
is an .npz with one array per input name, kept per name, and the analysis runs on both inputs.

A real SQLite registry, the real registry and job code and the real two-input demo model; only
the job's worker process is replaced by calling its body directly.
"""

from __future__ import annotations

import io

import numpy as np
import pytest

from fleet_server.db import AnalysisRow, Database, SampleRow
from fleet_server.events import EventBus
from fleet_server.jobs import JobRunner, run_analysis_job
from fleet_server.registry import Store, add_analysis_row, add_model
from toco_core.analysis.settings import AnalysisSettings
from toco_core.analysis_result import load_result
from toco_core.demo.layouts import two_input_digits, two_input_model
from toco_core.errors import PoolError
from toco_core.model_inputs import ModelInputs


@pytest.fixture(scope="module")
def two():
    return two_input_model().read_bytes(), two_input_digits()


def _pool(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _upload(ref: str, sample: ModelInputs) -> list[SampleRow]:
    """What the agent uploads for one disputed sample: one row per input, ref REF/NAME, own dtype."""
    return [SampleRow(device_id="box", ref=f"{ref}/{k}", window=1, dtype=v.dtype.name, shape=list(v.shape[1:]),
                      data=np.ascontiguousarray(v[0]).tobytes(), reason="disagreement")
            for k, v in sample.arrays.items()]


def test_registered_with_a_named_pool_and_analysed_on_both_inputs(tmp_path, two):
    onnx_bytes, digits = two
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    store = Store(tmp_path / "data")
    x = digits.x_pool[:240]
    model = add_model(db, store, name="two", onnx_bytes=onnx_bytes, pool_bytes=_pool(**x.arrays, y=digits.y_pool[:240]))
    assert model["pool_size"] == 240
    settings = AnalysisSettings(max_rounds=1, initial_samples=32, samples_per_round=16, max_heldout=100)
    field = digits.x_heldout[:20]
    with db.session(write=True) as s:
        rows = [r for i, sample in enumerate(field) for r in _upload(f"r{i}", sample)]
        rows.append(_upload("lonely", field[0])[0])  # its gauge never arrived: skipped
        s.add_all(rows)
        s.flush()
        row = add_analysis_row(s, model_id=model["model_id"], settings=settings, reason="drift",
                               field_sample_ids=[r.id for r in rows])
    with db.session(write=True) as s:
        spec = JobRunner(db, store, None, EventBus())._spec(s, s.get(AnalysisRow, row.id))
    with np.load(spec["field_path"]) as z:  # joined again per input, each in its own dtype
        np.testing.assert_array_equal(z["x/pixels"], field.arrays["pixels"])
        np.testing.assert_array_equal(z["x/gauge"], field.arrays["gauge"])
    assert run_analysis_job(spec)["pool_size"] == 260
    result = load_result(spec["out_dir"])
    assert isinstance(result.heldout_x, ModelInputs) and result.heldout_x.names == ["pixels", "gauge"]
    assert result.heldout_x.arrays["pixels"].dtype == np.uint8
    assert result.manifest.base_accuracy is None  # field samples carry no labels
    db.engine.dispose()


def test_a_pool_without_every_input_name_is_refused(tmp_path, two):
    onnx_bytes, digits = two
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    with pytest.raises(PoolError, match="not the model inputs \\['gauge'\\]"):
        add_model(db, Store(tmp_path / "data"), name="two", onnx_bytes=onnx_bytes,
                  pool_bytes=_pool(pixels=digits.x_pool[:50].arrays["pixels"]))
    db.engine.dispose()
