"""A model with two inputs: uint8 NHWC camera bytes and float32 gauge readings, joined before the head.

Analysed as a user runs it (`toco analyze` on an .npz with one array per input name plus y),
recompressed for the three demo device profiles, self-tested, packed into parts and rebuilt
from them, and run in onnxruntime on held-out samples the analysis never saw.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from toco_core.analysis_result import load_result
from toco_core.demo.layouts import two_input_digits, two_input_model
from toco_core.device import load_profile
from toco_core.errors import PoolError
from toco_core.model_bundle import BundleInfo
from toco_core.model_inputs import ModelInputs
from toco_core.onnx_model import input_specs, load_model, model_hash
from toco_core.parts_bundle import pack_parts, source_from_parts
from toco_core.plan import Policy
from toco_core.pool import load_pool
from toco_core.recompress import recompress
from toco_core.runtime import run_model

REPO = Path(__file__).resolve().parents[2]
BUDGET = 0.01


@pytest.fixture(scope="module")
def two():
    path = two_input_model()
    return path, load_model(path), two_input_digits()


@pytest.fixture(scope="module")
def analysis_dir(two, tmp_path_factory):
    path, _, digits = two
    root = tmp_path_factory.mktemp("two")
    pool = root / "pool.npz"
    np.savez(pool, **digits.x_pool[:400].arrays, y=digits.y_pool[:400])
    out = root / "analysis"
    proc = subprocess.run([sys.executable, "-m", "toco_cli", "analyze", str(path), "--pool", str(pool), "-o", str(out),
                           "--rounds", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out


def test_both_inputs_matter_to_the_model(two):
    _, base, digits = two
    assert [(s.name, s.dtype, s.shape) for s in input_specs(base)] == [
        ("pixels", np.uint8, (None, 28, 28, 1)), ("gauge", np.float32, (None, 4))]
    x = digits.x_heldout[:200]
    blind = ModelInputs({"pixels": x.arrays["pixels"], "gauge": np.zeros_like(x.arrays["gauge"])})
    assert (run_model(base, x).argmax(1) != run_model(base, blind).argmax(1)).mean() > 0.02


def test_analysed_on_every_input_in_its_own_dtype(analysis_dir):
    result = load_result(analysis_dir)
    for batch in (result.analysis_x, result.heldout_x):
        assert isinstance(batch, ModelInputs) and batch.names == ["pixels", "gauge"]
        assert batch.arrays["pixels"].dtype == np.uint8 and batch.arrays["gauge"].dtype == np.float32
    assert result.manifest.base_accuracy > 0.85
    assert "int8" in result.curves  # onnxruntime's int8 calibration was fed both inputs


@pytest.mark.parametrize("profile", ["handheld", "camera-box", "line-pc"])
def test_recompressed_for_each_demo_profile_keeps_the_contract_and_fidelity(two, analysis_dir, profile):
    _, base, digits = two
    result = load_result(analysis_dir)
    prof = load_profile(REPO / "deploy" / "profiles" / f"{profile}.json")
    policy = Policy(budget=BUDGET, memory=prof.memory_budget, storage=prof.storage_budget,
                    latency_s=prof.latency_budget_s)
    built, report = recompress(base, result, prof, policy, measure_memory=False)
    assert report.self_test.passed and report.self_test.measured <= BUDGET
    assert report.storage_bytes * 5 < report.base_file_bytes
    small = built.runnable
    assert [i.SerializeToString() for i in small.graph.input if i.name in ("pixels", "gauge")] == \
           [i.SerializeToString() for i in base.graph.input if i.name in ("pixels", "gauge")]
    assert [o.SerializeToString() for o in small.graph.output] == [o.SerializeToString() for o in base.graph.output]
    held = digits.x_heldout
    disagreement = (run_model(base, held).argmax(1) != run_model(small, held).argmax(1)).mean()
    assert disagreement <= BUDGET + 2 * np.sqrt(BUDGET / len(held))


def test_parts_carry_both_inputs_and_rebuild_a_passing_model(two, analysis_dir):
    _, base, _ = two
    result = load_result(analysis_dir)
    parts = pack_parts(base, result, BundleInfo(model_name="two", model_sha256=model_hash(base), budget=BUDGET))
    source, box_result, _ = source_from_parts(parts)
    assert isinstance(box_result.heldout_x, ModelInputs)
    for name in ("pixels", "gauge"):
        want = result.heldout_x.arrays[name][:len(box_result.heldout_x)]
        np.testing.assert_array_equal(box_result.heldout_x.arrays[name], want)
        assert box_result.heldout_x.arrays[name].dtype == want.dtype
    prof = load_profile(REPO / "deploy" / "profiles" / "handheld.json")
    _, report = recompress(source, box_result, prof, Policy(budget=BUDGET), measure_memory=False)
    assert report.self_test.passed


def test_pools_that_do_not_name_every_input_are_refused(two, tmp_path):
    _, base, digits = two
    x = digits.x_pool[:40].arrays
    lacking = tmp_path / "lacking.npz"
    np.savez(lacking, x=x["pixels"])
    with pytest.raises(PoolError, match="not the model inputs \\['pixels', 'gauge'\\]"):
        load_pool(lacking, input_specs(base))
    uneven = tmp_path / "uneven.npz"
    np.savez(uneven, pixels=x["pixels"], gauge=x["gauge"][:30])
    with pytest.raises(PoolError, match="differ in their number of samples"):
        load_pool(uneven, input_specs(base))
    single = tmp_path / "single.npy"
    np.save(single, x["pixels"])
    with pytest.raises(PoolError, match="several inputs"):
        load_pool(single, input_specs(base))
