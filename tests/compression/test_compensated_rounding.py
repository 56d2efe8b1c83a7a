"""Error-compensated rounding on the real LeNet-5 and MLP with MNIST digits: it lowers each layer's
output error at the same steps, the analysis measures every point with it, and a box builds the
very codes the server measured, from the fp32 base or from its parts."""

import dataclasses
import json

import numpy as np
import pytest

from toco_core.analysis_result import ROUNDING_FILE, load_result, save_result
from toco_core.compression.compensated_rounding import (
    HEADROOM,
    code_differences,
    compensated_codes,
    inverse_factor,
    layer_hessians,
    with_differences,
)
from toco_core.compression.storage import QuantizedTensor, dequantize
from toco_core.errors import AnalysisError
from toco_core.fidelity import compare_outputs
from toco_core.model_bundle import BundleInfo
from toco_core.onnx_model import compressible_weights, model_bytes, model_hash, read_weights
from toco_core.parts_bundle import BundleHead, pack_parts, source_from_parts
from toco_core.plan import CompressionPlan
from toco_core.plan_build import build
from toco_core.plan_table import plan_codes
from toco_core.rounding_parts import decode_point, encode_point
from toco_core.runtime import run_model
from toco_core.solver import enumerate_plans
from toco_core.weight_source import from_base_model


@pytest.fixture(scope="module")
def compensated(lenet5_analysis):
    """The conftest's shortened LeNet-5 analysis: compensated rounding is the default."""
    assert lenet5_analysis.compensated_rounding
    return lenet5_analysis


def _calibration_at_master(model, result):
    """The analysis' NestedCalibration of ``model`` with its master chosen again, as the analysis
    chose it; returns it, the weight infos, the calibration samples and the base's outputs on them."""
    from toco_core.analysis.nested_calibration import NestedCalibration
    from toco_core.analysis.pipeline import QUANT_GRID, prune_grid
    from toco_core.compression.bias_correction import BiasCorrection

    infos = compressible_weights(model)
    x, base_out = result.heldout_x, run_model(model, result.heldout_x)
    nested = NestedCalibration(model, infos, read_weights(model, infos), result.tolerances, "logits", x, None,
                               base_out, BiasCorrection(model, infos, result.analysis_x), prune_grid(),
                               hessians=layer_hessians(model, infos, result.analysis_x))
    nested.choose_master(QUANT_GRID, 1.0 / len(x))
    return nested, infos, x, base_out


def _coarse(w: np.ndarray, axis: int, levels: int) -> QuantizedTensor:
    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    steps = (np.abs(rows).max(axis=1) / levels).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return QuantizedTensor("w", np.rint(w / steps.reshape(shape)).astype(np.int32), steps, axis)


def _output_error(w: np.ndarray, q: QuantizedTensor, h: np.ndarray) -> float:
    shape = [1] * w.ndim
    shape[q.out_axis] = -1
    e = np.moveaxis(w - q.codes * q.steps.reshape(shape), q.out_axis, 0).reshape(w.shape[q.out_axis], -1)
    return float(np.einsum("ri,ij,rj->", e, h, e))


@pytest.mark.parametrize("name", ["lenet5", "mlp"])
def test_compensation_cuts_every_layers_output_error_at_the_same_steps(name, request, digits):
    """Conv (im2col columns) and Gemm layers at 3-bit steps, whole and with half the weights pruned:
    the output error e^T H e on real digits falls in every layer (the pruned weights' error is
    compensated too, within the channels' code limits); steps and the prune mask are kept."""
    model = request.getfixturevalue(name)
    infos = compressible_weights(model)
    weights = read_weights(model, infos)
    hessians = layer_hessians(model, infos, digits.x_pool[:128])
    assert set(hessians) == {i.name for i in infos}  # every Conv and Gemm of both models
    rng = np.random.default_rng(0)
    for info, (share, cut) in ((i, c) for i in infos for c in ((1.0, 0.3), (0.5, 0.8))):
        w = weights[info.name]
        keep = rng.random(w.shape) < share
        plain = _coarse(np.where(keep, w, 0), info.out_axis, 3)
        comp = compensated_codes(w, plain, keep, inverse_factor(hessians[info.name]))
        assert np.array_equal(comp.steps, plain.steps)
        assert not comp.codes[~keep].any()
        assert np.abs(comp.codes).max() <= HEADROOM * np.abs(plain.codes).max()
        assert _output_error(w, comp, hessians[info.name]) < cut * _output_error(w, plain, hessians[info.name])
        back = with_differences([plain], {"w": code_differences([comp], [plain])["w"]})[0]
        assert np.array_equal(back.codes, comp.codes)


def test_a_rounding_part_round_trips_and_a_wrong_one_is_refused():
    small = {"a": np.array([[0, 1], [-1, 0]], np.int16), "b": np.array([2, 0, -300], np.int16)}
    part = encode_point(small)
    back = decode_point(part, {"a": (2, 2), "b": (3,), "c": (4,)})
    assert back.keys() == small.keys() and all(np.array_equal(back[k], v) for k, v in small.items())
    sparse = {"w": np.where(np.random.default_rng(0).random(60_000) < 0.2, 1, 0).astype(np.int16)}
    assert len(encode_point(sparse)) < 60_000 / 8 * 1.1  # about the mask's bits: far below a byte a weight
    with pytest.raises(ValueError, match="graph lacks"):
        decode_point(part, {"a": (2, 2)})
    with pytest.raises(ValueError, match="hold 8"):
        decode_point(part, {"a": (2, 2), "b": (4,)})
    with pytest.raises(ValueError, match="does not decode"):
        decode_point(part[:-3], {"a": (2, 2), "b": (3,)})


def test_a_built_plan_is_the_compensated_model_its_curve_point_measured(lenet5, compensated):
    """Every table point has its differences; the build of a pruned, coarse point is the model the
    calibration measured (same flips, same differences); without its differences it is refused."""
    result, table = compensated, compensated.plans
    assert result.compensated_rounding and set(result.rounding) == set(range(len(table.points)))
    ps, qs = next(p for p in table.points if p[0] == 0.6 and p[1] > table.master_scale)
    i = table.point_index(ps, qs)
    nested, infos, x, base_out = _calibration_at_master(lenet5, result)
    point = nested.measure(ps, qs)
    kept = decode_point(result.rounding[i], {n.name: n.shape for n in infos})
    assert kept and kept.keys() == decode_point(nested.rounding[(ps, qs)], {n.name: n.shape for n in infos}).keys()
    plan = CompressionPlan(prune_scale=ps, quant_scale=qs, structured=False, predicted_disagreement=0.0,
                           predicted_storage=0, predicted_memory=0, sparsity=0.6, entropy_bits=3.0)
    built = build(lenet5, result, plan)
    flipped = compare_outputs(base_out, run_model(built.runnable, x), None, "logits").disagreement
    assert flipped == point.disagreement  # the very model the curve point measured
    without = dataclasses.replace(result, rounding={k: v for k, v in result.rounding.items() if k != i})
    with pytest.raises(AnalysisError, match=f"fetch the part round/{i}"):
        build(lenet5, without, plan)
    # an analysis made before compensated rounding (no setting, no differences) builds nearest codes
    settings = {k: v for k, v in result.manifest.settings.items() if k != "compensated_rounding"}
    older = dataclasses.replace(result, manifest=result.manifest.model_copy(update={"settings": settings}),
                                rounding=None)
    source = from_base_model(lenet5, older)
    nearest = {t.name: dequantize(t) for t in plan_codes(table, source.ladders, source.classes, ps, qs)}
    got, comp = read_weights(build(lenet5, older, plan).runnable, infos), read_weights(built.runnable, infos)
    assert all(np.array_equal(got[n], nearest[n]) for n in nearest)
    assert any(not np.array_equal(comp[n], nearest[n]) for n in nearest)


def test_the_analysis_keeps_its_differences_on_disk_and_checks_them(lenet5, compensated, tmp_path):
    loaded = load_result(save_result(compensated, tmp_path / "a"))
    assert loaded.rounding == compensated.rounding
    (tmp_path / "a" / ROUNDING_FILE).write_bytes(b"\0" * 64)
    with pytest.raises(AnalysisError, match="rounding.parts does not match its hash"):
        load_result(tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    del manifest["files"][ROUNDING_FILE]
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AnalysisError, match="compensated rounding but lacks its code differences"):
        load_result(tmp_path / "a")


def test_every_plan_builds_bit_identically_from_its_parts(lenet5, compensated):
    """A box fetches its point's round/{i} part and builds the server's model byte for byte; only
    that one rounding part travels to it."""
    parts = pack_parts(lenet5, compensated, BundleInfo(model_name="lenet5", model_sha256=model_hash(lenet5)))
    head = BundleHead(parts["head"])
    assert head.layout.rounding_parts
    plans = enumerate_plans(compensated, compressible_weights(lenet5), len(model_bytes(lenet5)), 0.4, True)
    checked = 0
    for plan in plans:
        if plan.runtime != "fp32" or plan.quant_scale == 0 or checked >= 25:
            continue
        need = head.parts_for_plan(plan)
        i = compensated.plans.point_index(plan.prune_scale, plan.quant_scale)
        assert [n for n in need if n.startswith("round/")] == [f"round/{i}"]
        source, result, _ = source_from_parts({n: parts[n] for n in need})
        server, box = build(lenet5, compensated, plan), build(source, result, plan)
        assert box.storage == server.storage, plan.label
        checked += 1
        last = plan, need
    assert checked == 25
    plan, need = last
    source, result, _ = source_from_parts({n: parts[n] for n in need if not n.startswith("round/")})
    with pytest.raises(AnalysisError, match="round/"):
        build(source, result, plan)


def test_points_measured_side_by_side_are_the_points_measured_one_at_a_time(lenet5, compensated):
    """A small model's calibration measures two points at once, one onnxruntime thread each
    (toco_core.analysis.side_by_side): every measurement, octave, bias delta and rounding is the
    one a single thread measures; a large model's is measured one point at a time."""
    from toco_core.analysis.side_by_side import SIDE_BY_SIDE_WEIGHTS, local_map, side_by_side
    from toco_core.runtime import intra_op_threads, make_session, session_with_weights

    result = compensated
    nested = _calibration_at_master(lenet5, result)[0]
    points = [p for p in result.plans.points if p[0] in (0.55, 0.7) and p[1] > result.plans.master_scale][:6]
    assert len(points) == 6
    nested.prepare(points)
    alone = list(map(nested.measure_point, points))
    together = list(side_by_side(2)(nested.measure_point, points))
    for a, b in zip(alone, together, strict=True):
        assert a.measured == b.measured and a.rounding == b.rounding
        assert all(np.array_equal(a.octaves[k], b.octaves[k]) for k in a.octaves)
        assert a.bias_deltas.keys() == b.bias_deltas.keys()
        assert all(np.array_equal(a.bias_deltas[k], b.bias_deltas[k]) for k in a.bias_deltas)
    with intra_op_threads(1):
        inside = [session_with_weights(lenet5, {}), make_session(lenet5)]
    outside = session_with_weights(lenet5, {})
    assert [s.get_session_options().intra_op_num_threads for s in inside] == [1, 1]
    assert outside.get_session_options().intra_op_num_threads == 0
    assert local_map(SIDE_BY_SIDE_WEIGHTS, cores=2) is map and local_map(61_470, cores=1) is map
    assert local_map(61_470, cores=2) is not map
