"""Memory predictions anchored on this box's measured sessions (toco_core.memory_anchors)."""

import pytest

from toco_core.device import with_budgets
from toco_core.measure import session_rss
from toco_core.model_inputs import shapes
from toco_core.onnx_model import model_bytes
from toco_core.plan import Policy
from toco_core.probe import probe_device
from toco_core.recompress import recompress
from toco_core.runtime_forms import FP32, INT8, MemoryAnchor


def test_anchored_prediction_keeps_what_the_measurement_holds_besides_its_weights():
    base = MemoryAnchor(rss=20_000_000, kept=1_000_000)
    # fp32: 20 MB measured for 1M weights at 2.5 x 4 B -> 10 MB of it is not weights
    assert FP32.predict_memory(500_000, 0, anchor=base) == 10_000_000 + 5_000_000
    # int8 without an anchor of its own starts from the fp32 base's rest
    assert INT8.predict_memory(500_000, 0, 1.0, fallback=base) == 10_000_000 + int(2.7 * 500_000)
    # its own anchor wins over the fallback
    own = MemoryAnchor(rss=16_000_000, kept=1_000_000, share=1.0)
    assert INT8.predict_memory(1_000_000, 0, 1.0, anchor=own, fallback=base) == 16_000_000
    # no anchor: the constants
    assert FP32.predict_memory(0, 1000) == 13 * 1024 * 1024 + 1000


@pytest.mark.parametrize("which", ["lenet5", "mlp"])
def test_memory_bound_plan_is_predicted_within_15_percent_of_its_measured_session(which, request, digits):
    model = request.getfixturevalue(which)
    analysis = request.getfixturevalue(f"{which}_analysis")
    base_rss = session_rss(model_bytes(model), shapes(digits.x_heldout[:1]))
    assert base_rss is not None
    # a limit the base fits with 30 % to spare: memory can decide the plan, so the box measures
    limit = int(1.3 * base_rss)
    here = probe_device(benchmark=False)
    profile = with_budgets(here.model_copy(update={"total_memory": 4 * limit, "available_memory": 2 * limit}),
                           memory=limit)
    _, report = recompress(model, analysis, profile, Policy(memory=limit), measure_memory=True)
    assert report.session_rss is not None, "a memory-bound plan has its session measured"
    assert report.base_session_rss is not None
    error = report.plan.predicted_memory / report.session_rss - 1
    assert abs(error) <= 0.15, (which, report.plan.label, report.plan.predicted_memory, report.session_rss)
    assert report.session_rss <= limit
