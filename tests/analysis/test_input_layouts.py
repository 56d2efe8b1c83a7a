"""A camera model: uint8 NHWC pixels in, Cast -> Div -> Transpose in its own graph.

Analysed as a user runs it (`toco analyze` on an .npz pool of uint8 bytes), recompressed for the
three demo device profiles, self-tested, packed into parts and rebuilt from them, and run in
onnxruntime on held-out digits the analysis never saw.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from toco_core.analysis_result import load_result
from toco_core.demo.layouts import nhwc_uint8_digits, nhwc_uint8_model
from toco_core.device import load_profile
from toco_core.errors import PoolError
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import compressible_weights, input_spec, load_model, model_bytes, model_hash
from toco_core.parts_bundle import pack_parts, source_from_parts
from toco_core.plan import Policy
from toco_core.plan_build import as_source, build
from toco_core.pool import load_pool
from toco_core.recompress import recompress
from toco_core.runtime import run_model
from toco_core.selftest import self_test
from toco_core.solver import plans_for_device

REPO = Path(__file__).resolve().parents[2]
PROFILES = ("handheld", "camera-box", "line-pc")
BUDGET = 0.01


@pytest.fixture(scope="module")
def camera():
    """(model path, base ModelProto, uint8 NHWC digit splits)."""
    path = nhwc_uint8_model()
    return path, load_model(path), nhwc_uint8_digits()


@pytest.fixture(scope="module")
def analysis_dir(camera, tmp_path_factory):
    path, _, digits = camera
    root = tmp_path_factory.mktemp("camera")
    pool = root / "pool.npz"
    np.savez(pool, x=digits.x_pool[:600], y=digits.y_pool[:600])
    out = root / "analysis"
    proc = subprocess.run([sys.executable, "-m", "toco_cli", "analyze", str(path), "--pool", str(pool), "-o", str(out),
                           "--rounds", "2"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    return out


def _agreement(base: onnx.ModelProto, small: onnx.ModelProto, x: np.ndarray) -> float:
    return float((run_model(base, x).argmax(1) == run_model(small, x).argmax(1)).mean())


def test_the_graph_takes_uint8_nhwc_and_scales_and_transposes_itself(camera):
    _, base, digits = camera
    spec = input_spec(base)
    assert spec.dtype == np.uint8 and spec.shape == (None, 28, 28, 1)
    assert [n.op_type for n in base.graph.node][:4] == ["Cast", "Constant", "Div", "Transpose"]
    assert digits.x_heldout.dtype == np.uint8 and digits.x_heldout.max() == 255
    assert (run_model(base, digits.x_heldout).argmax(1) == digits.y_heldout).mean() > 0.9


def test_analysed_on_uint8_samples_that_stay_uint8(analysis_dir):
    result = load_result(analysis_dir)
    assert result.analysis_x.dtype == np.uint8 and result.heldout_x.dtype == np.uint8
    assert result.manifest.input_shape == [None, 28, 28, 1]
    assert result.manifest.base_accuracy > 0.9


@pytest.mark.parametrize("profile", PROFILES)
def test_recompressed_for_each_demo_profile_keeps_inputs_outputs_and_fidelity(camera, analysis_dir, profile):
    _, base, digits = camera
    result = load_result(analysis_dir)
    prof = load_profile(REPO / "deploy" / "profiles" / f"{profile}.json")
    policy = Policy(budget=BUDGET, memory=prof.memory_budget, storage=prof.storage_budget,
                    latency_s=prof.latency_budget_s)
    built, report = recompress(base, result, prof, policy, measure_memory=False)
    assert report.self_test.passed and report.self_test.measured <= BUDGET
    assert report.storage_bytes * 5 < report.base_file_bytes
    small = built.runnable
    # the original contract: same input (uint8 NHWC) and outputs, same names, shapes and types
    assert [i.SerializeToString() for i in small.graph.input if i.name == "pixels"] == \
           [i.SerializeToString() for i in base.graph.input if i.name == "pixels"]
    assert [o.SerializeToString() for o in small.graph.output] == [o.SerializeToString() for o in base.graph.output]
    # held-out digits neither the analysis nor the self-test saw: within the budget (+ sampling noise)
    held = digits.x_heldout
    assert 1 - _agreement(base, small, held) <= BUDGET + 2 * np.sqrt(BUDGET / len(held))


def test_parts_carry_uint8_samples_and_rebuild_the_same_model(camera, analysis_dir):
    path, base, _ = camera
    result = load_result(analysis_dir)
    parts = pack_parts(base, result, BundleInfo(model_name="camera", model_sha256=model_hash(base), budget=BUDGET))
    # one byte per pixel on the wire: 300 held-out 28x28 digits compress below their raw 235 KB
    assert len(parts["calib/heldout"]) < 300 * 784
    source, box_result, _ = source_from_parts(parts)
    assert box_result.heldout_x.dtype == np.uint8
    np.testing.assert_array_equal(box_result.heldout_x, result.heldout_x)
    prof = load_profile(REPO / "deploy" / "profiles" / "handheld.json")
    built, report = recompress(source, box_result, prof, Policy(budget=BUDGET), measure_memory=False)
    assert report.self_test.passed
    assert run_model(built.runnable, box_result.heldout_x[:4]).shape == (4, 10)


def test_an_int8_runtime_plan_builds_and_self_tests_on_uint8_inputs(camera, analysis_dir):
    """Full int8 (activations too): onnxruntime's calibration reads the uint8 samples as they are."""
    _, base, _ = camera
    result = load_result(analysis_dir)
    assert result.curves["int8"].points[0].disagreement < 0.05  # measured at analysis time on uint8 inputs
    prof = load_profile(REPO / "deploy" / "profiles" / "line-pc.json")
    loose = Policy(budget=0.05)  # the int8 runtime's own cost decides whether a 1% budget offers it
    plans = plans_for_device(result, compressible_weights(base), len(model_bytes(base)), prof, loose)
    int8 = [p for p in plans if p.runtime == "int8"]
    assert int8, [p.label for p in plans]
    built = build(as_source(base, result), result, int8[0])
    assert any(n.op_type == "QuantizeLinear" for n in built.runnable.graph.node)
    gate = self_test(built.runnable, run_model(base, result.heldout_x), result.heldout_x,
                     int8[0].predicted_disagreement, loose.budget)
    assert gate.passed, gate


def test_a_pool_scaled_to_floats_is_refused_for_a_uint8_input(camera, tmp_path):
    _, base, digits = camera
    pool = tmp_path / "scaled.npz"
    np.savez(pool, x=digits.x_pool[:50] / 255.0)
    with pytest.raises(PoolError, match="cannot hold exactly") as err:
        load_pool(pool, input_spec(base))
    assert "uint8" in err.value.hint
    ints = tmp_path / "ints.npz"  # integers that fit are taken, as the device feeds them
    np.savez(ints, x=digits.x_pool[:50].astype(np.int64))
    x, _ = load_pool(ints, input_spec(base))
    assert x.dtype == np.uint8
