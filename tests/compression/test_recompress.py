"""Solver, self-test gate and end-to-end recompression on the real demo models and digits."""

import dataclasses
import math

import numpy as np
import pytest

from toco_core.calibration import CalibrationCurve
from toco_core.compression.storage import decode_model
from toco_core.device import with_budgets
from toco_core.errors import InfeasibleError
from toco_core.fidelity import compare_outputs
from toco_core.onnx_model import compressible_weights, load_model, model_bytes, read_weights, with_weights
from toco_core.plan import Policy
from toco_core.plan_build import build
from toco_core.probe import probe_device
from toco_core.recompress import recompress
from toco_core.runtime import run_model
from toco_core.selftest import self_test
from toco_core.solver import enumerate_plans, feasible_plans, plans_for
from toco_core.units import format_size


@pytest.fixture(scope="module")
def here():
    return probe_device(benchmark=False)


def profiles(here, storage):
    """Roomy line PC, a 256 MB camera box, a 64 MB one-core handheld.

    The handheld wants the smallest model within budget; the camera box has room for ``storage``
    bytes and wants the best fidelity there; the line PC has no limits.
    """
    camera = with_budgets(here.model_copy(update={"total_memory": 256 << 20, "available_memory": 200 << 20}),
                          memory=128 << 20, storage=storage)
    handheld = with_budgets(here.model_copy(update={"total_memory": 64 << 20, "available_memory": 60 << 20,
                                                    "physical_cores": 1, "logical_cores": 1}), memory=48 << 20)
    return {"handheld": (handheld, Policy(memory=handheld.memory_budget, objective="size")),
            "camera": (camera, Policy(storage=camera.storage_budget, memory=camera.memory_budget)),
            "roomy": (here, Policy())}


@pytest.mark.parametrize("which", ["lenet5", "mlp"])
def test_three_profiles_get_three_runnable_plans_within_budget(which, request, here, digits):
    model = request.getfixturevalue(which)
    analysis = request.getfixturevalue(f"{which}_analysis")
    base_bytes = len(model_bytes(model))
    base_out = run_model(model, digits.x_heldout)
    labels = set()
    sizes: dict[str, int] = {}
    for name in ("handheld", "roomy", "camera"):
        # the camera box's room lies between the handheld's plan and the line PC's (geometric mean):
        # a fixed multiple of the smallest plan may already hold the line PC's choice
        storage = int(math.sqrt(sizes["handheld"] * sizes["roomy"])) if name == "camera" else base_bytes
        profile, policy = profiles(here, storage)[name]
        built, report = recompress(model, analysis, profile, policy, measure_memory=False)
        sizes[name] = report.plan.predicted_storage
        labels.add(report.plan.label)
        assert report.self_test.passed
        if policy.storage:
            assert report.storage_bytes <= policy.storage, name
        assert report.storage_bytes <= base_bytes and report.file_bytes <= base_bytes
        # unseen digits: the plan was chosen on the analysis' calibration samples, so the unseen
        # estimate may differ from it by two standard errors of the difference of the two estimates
        fid = compare_outputs(base_out, run_model(built.runnable, digits.x_heldout))
        slack = 2 * math.sqrt(0.01 * 0.99 * (1 / len(analysis.heldout_x) + 1 / len(digits.x_heldout)))
        assert fid.disagreement <= policy.budget + slack, (name, report.plan.label, fid)
        # the storage form decodes to the same weights the runnable model started from: the plan's
        # fp32 build (its int8 or 4-bit form rounds once more; channels removed change no output)
        decoded = decode_model(built.storage) if report.plan.quant_scale > 0 else load_model(built.storage)
        fp32 = build(model, analysis, report.plan.model_copy(update={"runtime": "fp32"})).runnable
        np.testing.assert_allclose(run_model(decoded, digits.x_heldout[:64]), run_model(fp32, digits.x_heldout[:64]),
                                   atol=1e-4, rtol=1e-4)
    assert len(labels) == 3, labels


def test_infeasible_limits_say_so_with_numbers(lenet5, lenet5_analysis, here):
    with pytest.raises(InfeasibleError) as err:
        recompress(lenet5, lenet5_analysis, here, Policy(storage=2_000), measure_memory=False)
    assert "storage" in str(err.value) and "2.0 KB allowed" in str(err.value)
    assert err.value.best["storage"] > 2_000


def as_older_analysis(result):
    """``result`` as an analysis from before its points' storage forms were built: the solver estimates."""
    curves = {k: c.model_copy(update={"points": [p.model_copy(update={"storage_bytes": None}) for p in c.points]})
              for k, c in result.curves.items()}
    return dataclasses.replace(result, curves=curves)


def test_storage_predictions_are_the_storage_forms_a_box_builds(lenet5, lenet5_analysis):
    infos = compressible_weights(lenet5)
    plans = [p for p in enumerate_plans(lenet5_analysis, infos, len(model_bytes(lenet5)), int8=True)
             if p.quant_scale > 0]
    assert {p.runtime for p in plans} == {"fp32", "int8"}
    for p in plans[::9]:
        assert p.predicted_storage == len(build(lenet5, lenet5_analysis, p).storage), p.label


def test_a_storage_limit_gets_the_most_faithful_plan_that_fits_where_estimates_lost_it(lenet5, lenet5_analysis, here):
    """An estimate of the storage form (older analyses) overshoots it, so a box with a storage limit was
    given a less faithful plan than one that fits; with the built sizes it gets the best that fits."""
    infos, base = compressible_weights(lenet5), len(model_bytes(lenet5))
    older = as_older_analysis(lenet5_analysis)

    def best(result, limit):  # the most faithful plan the solver lets through (+inf: none)
        try:
            return plans_for(result, infos, base, Policy(storage=limit), None, limit)[0].predicted_disagreement
        except InfeasibleError:
            return math.inf

    sizes = sorted({p.predicted_storage for p in enumerate_plans(lenet5_analysis, infos, base) if p.quant_scale > 0})
    lost = [s for s in sizes if best(lenet5_analysis, s) < best(older, s) < math.inf]
    assert lost, "the estimates never cost a storage-limited box a plan: nothing left to show"
    limit = lost[len(lost) // 2]
    built, report = recompress(lenet5, lenet5_analysis, here, Policy(storage=limit), measure_memory=False)
    assert report.storage_bytes == len(built.storage) == report.plan.predicted_storage <= limit
    assert report.plan.predicted_disagreement < best(older, limit)


def test_a_storage_limit_only_the_coded_form_meets_is_met_by_measuring_it(lenet5, lenet5_analysis, here):
    """In an older analysis predicted storage is an entropy estimate of the full model's codes; the
    storage form codes the reduced model and comes out smaller. A limit between the two: the box builds
    the smallest plan once, scales the predictions by what it measured, and ships a plan whose real
    form fits."""
    older = as_older_analysis(lenet5_analysis)
    infos = compressible_weights(lenet5)
    base = len(model_bytes(lenet5))
    within = feasible_plans(enumerate_plans(older, infos, base), Policy(), None, None, base,
                            min(c.samples for c in older.curves.values()))
    smallest = min(within, key=lambda p: p.predicted_storage)
    coded = len(build(lenet5, older, smallest).storage)
    assert coded < 0.97 * smallest.predicted_storage  # the prediction is pessimistic by a few %
    limit = (coded + smallest.predicted_storage) // 2
    built, report = recompress(lenet5, older, here, Policy(storage=limit, objective="size"),
                               measure_memory=False)
    assert report.storage_bytes == len(built.storage) <= limit < report.plan.predicted_storage
    # below what the smallest plan codes to: still no, and the error names the coded size, not the prediction
    with pytest.raises(InfeasibleError, match=f"storage form is {format_size(coded)} .predicted "
                                              f"{format_size(smallest.predicted_storage)}.") as exc:
        recompress(lenet5, older, here, Policy(storage=coded - 64, objective="size"), measure_memory=False)
    assert exc.value.best["storage"] == coded


def test_solver_never_returns_a_plan_larger_than_the_base_or_over_its_limits(lenet5, lenet5_analysis):
    infos = compressible_weights(lenet5)
    base = len(model_bytes(lenet5))
    plans = enumerate_plans(lenet5_analysis, infos, base, nbits_share=0.9)
    answered = []
    for limit in (base // 4, base // 10, base // 100):
        try:
            chosen = feasible_plans(plans, Policy(), None, limit, base)
        except InfeasibleError as exc:
            assert exc.best["storage"] > limit
            answered.append("infeasible")
            continue
        answered.append("plans")
        for p in chosen:
            assert p.predicted_storage <= limit <= base
            assert p.predicted_disagreement <= 0.01
    assert answered[0] == "plans" and answered[-1] == "infeasible"


def test_self_test_rejects_a_broken_model(lenet5, lenet5_analysis):
    x = lenet5_analysis.heldout_x
    base_out = run_model(lenet5, x)
    w = read_weights(lenet5)
    broken = with_weights(lenet5, {k: (v[::-1] if v.ndim == 2 else -v).copy() for k, v in w.items()})
    res = self_test(broken, base_out, x, predicted=0.005, budget=0.01)
    assert not res.passed and res.measured > 0.3
    assert self_test(lenet5, base_out, x, predicted=0.0, budget=0.01).passed


def test_gate_catches_optimistic_curves_and_steps_down(lenet5, lenet5_analysis, here, digits):
    """Curves that claim every compression is free: the gate must refuse the aggressive plans."""
    lying = {k: CalibrationCurve(operator=c.operator, samples=c.samples,
                                 points=[p.model_copy(update={"disagreement": 0.0}) for p in c.points])
             for k, c in lenet5_analysis.curves.items()}
    analysis = lenet5_analysis.__class__(**{**lenet5_analysis.__dict__, "curves": lying})
    try:
        built, report = recompress(lenet5, analysis, here, Policy(objective="size", max_tries=10), measure_memory=False)
    except Exception as exc:  # a refusal is also correct; a silent bad model is not
        assert "fidelity: self-test" in str(exc)  # the one line names the check that failed
        return
    assert report.attempts > 1
    assert report.self_test.measured <= report.self_test.predicted + report.self_test.margin


def _biases(model) -> dict[str, np.ndarray]:
    from toco_core.compression.bias_correction import biased_layers

    inits = {t.name: t for t in model.graph.initializer}
    import onnx

    return {layer.bias: onnx.numpy_helper.to_array(inits[layer.bias])
            for layer in biased_layers(model, compressible_weights(model))}


def _hessians(model, result):
    """The layers' Hessians the analysis rounded with, as the pipeline computes them (None: nearest rounding)."""
    from toco_core.compression.compensated_rounding import layer_hessians

    if not result.compensated_rounding:
        return None
    return layer_hessians(model, compressible_weights(model), result.analysis_x)


def test_a_built_plan_is_the_model_its_curve_point_measured(lenet5, lenet5_analysis):
    """Curves are measured with bias correction (fitted on the analysis samples), so a device builds
    with it too: the built model flips exactly the calibration digits the curve point flipped.
    An analysis made before the setting existed keeps the base biases on both sides."""
    import dataclasses

    from toco_core.analysis.nested_calibration import NestedCalibration
    from toco_core.analysis.pipeline import QUANT_GRID, prune_grid
    from toco_core.compression.bias_correction import BiasCorrection
    from toco_core.plan import CompressionPlan

    result = lenet5_analysis
    assert result.bias_correction
    infos = compressible_weights(lenet5)
    weights = read_weights(lenet5, infos)
    ps, qs = next(p for p in result.plans.points if p[0] == 0.6 and p[1] > result.plans.master_scale)
    plan = CompressionPlan(prune_scale=ps, quant_scale=qs, structured=False, predicted_disagreement=0.0,
                           predicted_storage=0, predicted_memory=0, sparsity=0.6, entropy_bits=3.0)
    x, base_out = result.heldout_x, run_model(lenet5, result.heldout_x)
    nested = NestedCalibration(lenet5, infos, weights, result.tolerances, "logits", x, None, base_out,
                               BiasCorrection(lenet5, infos, result.analysis_x), prune_grid(),
                               hessians=_hessians(lenet5, result))
    nested.choose_master(QUANT_GRID, 1.0 / len(x))
    assert nested.master_scale == result.plans.master_scale
    point = nested.measure(ps, qs)
    built = build(lenet5, result, plan)
    flipped = compare_outputs(base_out, run_model(built.runnable, x), None, "logits").disagreement
    assert flipped == point.disagreement  # the very model the curve point measured
    # with its dead channels removed and the biases they fold into back on float16 (dead_parts), too
    removed = build(lenet5, result, plan.model_copy(update={"structured": True}))
    assert any(layer.channels_kept < layer.channels for layer in removed.layers)
    np.testing.assert_allclose(run_model(removed.runnable, x), run_model(built.runnable, x), atol=2e-5)
    assert compare_outputs(base_out, run_model(removed.runnable, x), None, "logits").disagreement == flipped
    assert all(not np.array_equal(b, _biases(lenet5)[k]) for k, b in _biases(built.runnable).items())
    # the dense layers' corrected biases are on float16 (the calibration's as much as the build's): the
    # storage form keeps them in 2 bytes
    assert any(np.array_equal(b.astype(np.float16).astype(np.float32), b) for b in _biases(built.runnable).values())
    assert all(layer.bias_shift and layer.bias_shift > 0 for layer in built.layers)  # what the report shows
    # built only to measure its memory (the anchors): the same weights, the base's biases
    bare = build(lenet5, result, plan, correct_biases=False)
    assert all(np.array_equal(b, _biases(lenet5)[k]) for k, b in _biases(bare.runnable).items())
    assert all(np.array_equal(w, read_weights(built.runnable, infos)[k])
               for k, w in read_weights(bare.runnable, infos).items())

    settings = {k: v for k, v in result.manifest.settings.items() if k != "bias_correction"}
    older = dataclasses.replace(result, manifest=result.manifest.model_copy(update={"settings": settings}))
    assert not older.bias_correction
    plain = build(lenet5, older, plan)
    assert all(np.array_equal(b, _biases(lenet5)[k]) for k, b in _biases(plain.runnable).items())
    assert all(layer.bias_shift is None for layer in plain.layers)


def test_recompress_builds_what_build_builds(lenet5, lenet5_analysis, here):
    """recompress measures the base's bias-correction means once for all its builds: the model it
    returns is the one build() makes of its plan alone, biases and weights alike."""

    built, report = recompress(lenet5, lenet5_analysis, here, Policy(objective="size"))
    again = build(lenet5, lenet5_analysis, report.plan)
    assert model_bytes(built.runnable) == model_bytes(again.runnable)


def test_the_analysis_keeps_the_bias_deltas_its_curves_were_measured_with(lenet5, lenet5_analysis, tmp_path):
    """A build from the fp32 base applies the deltas the calibration fitted (kept in the analysis
    directory) instead of fitting them again: 0.4 s a build on the 224x224 model."""
    import dataclasses

    from toco_core.analysis.nested_calibration import NestedCalibration
    from toco_core.analysis.pipeline import QUANT_GRID, prune_grid
    from toco_core.analysis_result import load_result, save_result
    from toco_core.compression.bias_correction import HALF_WITHIN_STEP, BiasCorrection, bias_steps, biased_layers
    from toco_core.errors import AnalysisError
    from toco_core.plan import CompressionPlan
    from toco_core.plan_build import build, fit_point_deltas
    from toco_core.weight_source import from_base_model, point_codes

    result = lenet5_analysis
    table = result.plans
    assert result.bias_deltas is not None and set(result.bias_deltas) == set(range(len(table.points)))
    # what a fresh calibration of the same point fits is what the analysis kept for it
    infos = compressible_weights(lenet5)
    i, (ps, qs) = next((i, p) for i, p in enumerate(table.points) if p[0] == 0.6 and p[1] > table.master_scale)
    x = result.heldout_x
    nested = NestedCalibration(lenet5, infos, read_weights(lenet5, infos), result.tolerances, "logits", x, None,
                               run_model(lenet5, x), BiasCorrection(lenet5, infos, result.analysis_x), prune_grid(),
                               hessians=_hessians(lenet5, result))
    nested.choose_master(QUANT_GRID, 1.0 / len(x))
    nested.measure(ps, qs)
    kept = result.bias_deltas[i]
    assert kept.keys() == nested.bias_deltas[(ps, qs)].keys()
    assert all(np.array_equal(kept[b], nested.bias_deltas[(ps, qs)][b]) for b in kept)
    fitted = fit_point_deltas(lenet5, result)  # what a bundle's bias parts are packed from
    assert fitted.keys() == result.bias_deltas.keys() and all(fitted[j] is result.bias_deltas[j] for j in fitted)

    # a build applies the kept deltas: doubled ones show up in its biases
    doubled = {**result.bias_deltas, i: {b: (2 * d).astype(np.float16) for b, d in kept.items()}}
    plan = CompressionPlan(prune_scale=ps, quant_scale=qs, structured=False, predicted_disagreement=0.0,
                           predicted_storage=0, predicted_memory=0, sparsity=0.6, entropy_bits=3.0)
    built = _biases(build(lenet5, dataclasses.replace(result, bias_deltas=doubled), plan).runnable)
    base = _biases(lenet5)
    # on float16 where that rounding is within max|2d| / 256 or a sixteenth of the channel's weight step
    steps = {q.name: q.steps for q in point_codes(from_base_model(lenet5, result), result, i)}
    layer_steps = bias_steps(biased_layers(lenet5, infos), steps)
    for b in kept:
        moved = np.abs(built[b] - (base[b] + 2 * kept[b].astype(np.float32)))
        assert (moved <= np.maximum(np.abs(2 * kept[b].astype(np.float32)).max() / 256,
                                    layer_steps[b] * HALF_WITHIN_STEP) + 1e-7).all()

    # saved and loaded with the directory, hash-checked like its other files
    loaded = load_result(save_result(result, tmp_path / "a"))
    assert loaded.bias_deltas is not None and loaded.bias_deltas.keys() == result.bias_deltas.keys()
    assert all(np.array_equal(loaded.bias_deltas[j][b], d) for j, p in result.bias_deltas.items() for b, d in p.items())
    (tmp_path / "a" / "bias_deltas.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(AnalysisError, match="bias_deltas.safetensors does not match its hash"):
        load_result(tmp_path / "a")
    # an analysis saved before the deltas were kept: builds fit them as before
    older = load_result(save_result(dataclasses.replace(result, bias_deltas=None), tmp_path / "b"))
    assert older.bias_deltas is None and not (tmp_path / "b" / "bias_deltas.safetensors").exists()


def test_rounding_alone_zeroes_whole_units_and_the_build_removes_them(mlp, mlp_analysis, digits):
    """A hidden unit the pool never activates has an unbounded tolerance, so rounding alone zeroes
    its weights: a plan without pruning still drops such units (smaller runnable file, same outputs)."""
    from toco_core.plan import CompressionPlan

    quant_only = max(q for p, q in mlp_analysis.plans.points if p == 0.0)

    def built(structured: bool):
        plan = CompressionPlan(prune_scale=0.0, quant_scale=quant_only, structured=structured,
                               predicted_disagreement=0.0, predicted_storage=0, predicted_memory=0, sparsity=0.0,
                               entropy_bits=3.0)
        return build(mlp, mlp_analysis, plan)

    kept, whole = built(True), built(False)
    first = kept.layers[0]
    assert first.channels_kept < first.channels == whole.layers[0].channels_kept == 300
    assert len(model_bytes(kept.runnable)) < len(model_bytes(whole.runnable))
    x = digits.x_heldout[:300]
    np.testing.assert_allclose(run_model(kept.runnable, x), run_model(whole.runnable, x), atol=1e-4)
    # the storage form codes the model that runs: fewer rows, same codes for the rest, same outputs
    assert len(kept.storage) < len(whole.storage)
    decoded = decode_model(kept.storage)
    assert read_weights(decoded)["1.weight"].shape[0] == first.channels_kept
    np.testing.assert_allclose(run_model(decoded, x), run_model(decode_model(whole.storage), x), atol=1e-4)


def test_an_fp32_plan_with_dead_channels_removed_does_no_more_work_than_its_base_and_an_int8_one_does(
        lenet5, lenet5_analysis):
    from toco_core.recompress import does_no_more_work
    from toco_core.solver import is_base_plan

    infos = compressible_weights(lenet5)
    plans = [p for p in enumerate_plans(lenet5_analysis, infos, len(model_bytes(lenet5))) if not is_base_plan(p)]
    fp32 = min((p for p in plans if p.runtime == "fp32" and p.structured), key=lambda p: p.predicted_storage)
    lighter = build(lenet5, lenet5_analysis, fp32).runnable
    assert sum(w.shape[w.out_axis] for w in compressible_weights(lighter)) < sum(w.shape[w.out_axis] for w in infos)
    assert does_no_more_work(lighter, lenet5)
    assert not does_no_more_work(lenet5, lighter)  # the base holds more weights than the pruned model
    int8 = fp32.model_copy(update={"runtime": "int8"})
    assert not does_no_more_work(build(lenet5, lenet5_analysis, int8).runnable, lenet5)  # QDQ / integer ops
