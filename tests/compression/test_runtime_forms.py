"""The runtime-form and curve-operator registries: every hook present, wire names unchanged,
unknown names refused, and a form added to a registry is planned without touching the solver."""

import json
from dataclasses import replace
from typing import get_args

import pytest

from toco_core.calibration import CalibrationCurve, CurvePoint
from toco_core.curve_operators import OPERATORS, PLANNED, CurveOperator, curve_operator
from toco_core.device import DeviceProfile, RuntimeFormat
from toco_core.errors import UnregisteredNameError
from toco_core.messages import PlanSummary
from toco_core.onnx_model import WeightInfo, compressible_weights, model_bytes
from toco_core.plan import CompressionPlan, Policy, Runtime
from toco_core.runtime_forms import (
    FLOAT,
    FP32,
    FP32_RSS_FACTOR,
    INT8_RSS_FACTOR,
    RUNTIME_FORMS,
    SESSION_OVERHEAD,
    Prediction,
    RuntimeForm,
    offered_shares,
    runtime_form,
)
from toco_core.solver import enumerate_plans, feasible_plans, memory_estimate

WIRE_FORMS = ("fp32", "nbits", "int8")
WIRE_OPERATORS = ("prune", "quantize", "prune+quantize", "int8")


def _profile(*formats: RuntimeFormat) -> DeviceProfile:
    return DeviceProfile(total_memory=2**30, available_memory=2**29, free_storage=2**30, physical_cores=1,
                         logical_cores=1, ort_version="1.0", formats=list(formats))


def _plan(runtime: str, **kw: float) -> CompressionPlan:
    return CompressionPlan(prune_scale=0.5, quant_scale=0.25, runtime=runtime, predicted_disagreement=0.01,
                           predicted_storage=1000, predicted_memory=2000, sparsity=0.5, entropy_bits=2.0, **kw)


def test_the_registry_lists_exactly_the_wire_names_with_every_hook():
    assert tuple(RUNTIME_FORMS) == get_args(Runtime) == WIRE_FORMS
    for name, form in RUNTIME_FORMS.items():
        assert form.name == name and form.label and form.description
        assert form.device_format is None or isinstance(form.device_format, RuntimeFormat)
        for hook in (form.holds, form.weight_rss, form.predictor, form.build):
            assert callable(hook), (name, hook)
        assert form.cost_curve is None or form.cost_curve in CurveOperator
        assert form.range_samples >= 0
    assert FLOAT is FP32 and FLOAT.device_format is None  # every box can run the base plan


@pytest.mark.parametrize("name", WIRE_FORMS)
def test_every_runtime_round_trips_through_plans_and_messages(name):
    plan = _plan(name)
    again = CompressionPlan.model_validate_json(plan.model_dump_json())
    assert again == plan and json.loads(plan.model_dump_json())["runtime"] == name
    assert plan.label == f"prune 50% + quant s=0.25 / {name}"
    summary = PlanSummary.from_plan(plan)
    assert json.loads(summary.model_dump_json())["runtime"] == name
    assert PlanSummary.model_validate_json(summary.model_dump_json()) == summary


def test_unknown_names_are_refused_with_the_known_ones():
    with pytest.raises(UnregisteredNameError, match="unknown runtime form 'fp16'.*fp32, nbits, int8"):
        runtime_form("fp16")
    with pytest.raises(UnregisteredNameError, match="unknown curve operator 'sparsify'"):
        curve_operator("sparsify")
    with pytest.raises(UnregisteredNameError):
        memory_estimate("fp16", 10, 0)
    with pytest.raises(ValueError):  # pydantic still validates the wire name
        _plan("fp16")


@pytest.mark.parametrize("name", WIRE_OPERATORS)
def test_every_curve_operator_round_trips_as_its_name(name):
    op = curve_operator(name)
    assert op == name and op in OPERATORS and f"{op}" == name
    point = CurvePoint(disagreement=0.0, kl=0.0, sparsity=0.0, entropy_bits=32.0, fixed_bits=32.0)
    curve = CalibrationCurve(operator=name, samples=10, points=[point])
    # the bundle head's calibration.json is json.dumps of model_dump(); stored analyses use the JSON dump
    assert json.loads(json.dumps(curve.model_dump()))["operator"] == name
    assert CalibrationCurve.model_validate_json(curve.model_dump_json()) == curve
    assert (name in PLANNED) == op.spec.planned


def test_memory_predictions_of_each_form():
    n, other = 1000.0, 500
    assert memory_estimate("fp32", n, other) == int(SESSION_OVERHEAD + other + FP32_RSS_FACTOR * 4.0 * n)
    assert memory_estimate("int8", n, other, 0.7) == int(SESSION_OVERHEAD + other + INT8_RSS_FACTOR * 1.0 * n)
    assert memory_estimate("nbits", n, other, 0.0) == memory_estimate("fp32", n, other)
    assert memory_estimate("nbits", n, other, 1.0) == int(SESSION_OVERHEAD + other + FP32_RSS_FACTOR * 0.56 * n)


def test_offered_forms_follow_the_device_formats():
    infos = [WeightInfo("conv", "Conv", "n0", (8, 1, 3, 3), 0, "initializer"),
             WeightInfo("fc", "Gemm", "n1", (10, 72), 0, "initializer")]
    assert offered_shares(infos, None) == {"fp32": 1.0}
    assert offered_shares(infos, _profile(RuntimeFormat.FP32)) == {"fp32": 1.0}
    every = offered_shares(infos, _profile(*RuntimeFormat))
    assert list(every) == ["fp32", "nbits", "int8"] and every["nbits"] == pytest.approx(720 / 792)


def _own_cost(curves):
    def predict(point):
        return None if point.quant_scale == 0 else Prediction(point.disagreement, point.kl)

    return predict


def _fp16_form() -> RuntimeForm:
    """A toy form: float16 weights on quantized points, their cost the point's own, offered on every box."""
    return replace(FP32, name="fp16", label="fp16", description="toy: float16 weights",
                   weight_rss=lambda n_kept, share: FP32_RSS_FACTOR * 2.0 * n_kept, predictor=_own_cost)


def test_a_form_added_to_a_registry_is_planned_and_chosen_where_it_fits(lenet5, lenet5_analysis):
    forms = {**RUNTIME_FORMS, "fp16": _fp16_form()}
    infos, base = compressible_weights(lenet5), len(model_bytes(lenet5))
    shares = offered_shares(infos, None, forms)
    assert shares == {"fp32": 1.0, "fp16": 1.0}
    plans = enumerate_plans(lenet5_analysis, infos, base, shares=shares, forms=forms)
    fp32 = {(p.prune_scale, p.quant_scale): p for p in plans if p.runtime == "fp32"}
    toy = [p for p in plans if p.runtime == "fp16"]
    assert len(toy) == len([k for k in fp32 if k[1] > 0])  # every quantized point, never the base point
    for p in toy:
        twin = fp32[(p.prune_scale, p.quant_scale)]
        assert p.predicted_memory < twin.predicted_memory and p.predicted_storage == twin.predicted_storage
    # no fp32 plan fits this memory limit; the solver takes a toy-form plan instead
    limit = min(p.predicted_memory for p in fp32.values()) - 1
    samples = lenet5_analysis.curves["quantize"].samples
    chosen = feasible_plans(plans, Policy(budget=0.5), limit, None, base, samples, forms)
    assert chosen and {p.runtime for p in chosen} == {"fp16"}
    with pytest.raises(UnregisteredNameError):  # the release's own registry does not know it
        feasible_plans(plans, Policy(budget=0.5), limit, None, base, samples)


def test_the_registry_path_plans_as_the_flag_path(lenet5, lenet5_analysis):
    infos, base = compressible_weights(lenet5), len(model_bytes(lenet5))
    shares = offered_shares(infos, _profile(*RuntimeFormat))
    by_flags = enumerate_plans(lenet5_analysis, infos, base, shares["nbits"], True)
    assert enumerate_plans(lenet5_analysis, infos, base, shares=shares) == by_flags
    assert {p.runtime for p in by_flags} == set(WIRE_FORMS)
