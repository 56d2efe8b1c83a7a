"""Session memory measured on this box before planning, so the solver's memory predictions start
from this box's onnxruntime instead of constants measured elsewhere.

The constants of toco_core.runtime_forms (a 13 MB session, 2.5x the fp32 weight bytes) came from
one onnxruntime on one machine; under the onnxruntime installed here LeNet-5's session measures
18.0 MB against 14.2 MB predicted (-21 %), its QDQ int8 build 18.5 MB against 13.8 MB (-25 %,
heavier than fp32: the quantise/dequantise kernels cost more than the 4x smaller weights save),
and on a 224x224 conv net the activations, which no weight factor holds, dominate. So where memory
can decide the plan, the box measures two builds in child processes (about a second each): the
base model (fp32 anchor) and, when the box may run int8, the least pruned int8 plan (int8
anchor). RuntimeForm.predict_memory then keeps what each measurement holds besides its weights
and adds the plan's weights in its form.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from toco_core.measure import PendingMemory
from toco_core.plan import CompressionPlan
from toco_core.runtime_forms import FLOAT, INT8, SESSION_OVERHEAD, MemoryAnchor

log = logging.getLogger("toco.memory")

Shapes = tuple[int, ...] | dict[str, tuple[int, ...]]  # toco_core.model_inputs.shapes: one input or per name


def memory_may_bind(memory_limit: int | None, base_prediction: int, weight_bytes: int) -> bool:
    """Whether measuring is worth its seconds: the limit is within 2x of the base's predicted session
    memory (the constants can be 25 % off either way), or the weights are a visible share of the
    session (a form heavier than fp32 is then possible). Takes bytes; returns a bool."""
    if memory_limit is None:
        return False
    return base_prediction * 2 > memory_limit or weight_bytes > SESSION_OVERHEAD


def measure_anchors(base_bytes: bytes, shapes: Shapes, n_weights: int, shares: Mapping[str, float],
                    int8_candidates: list[CompressionPlan], kept: Callable[[CompressionPlan], float],
                    runnable: Callable[[CompressionPlan], bytes]) -> dict[str, MemoryAnchor]:
    """Measure the anchors of the forms this box may run.

    Takes the base model's bytes, the batch-1 input shapes, its compressible weight count, the
    offered forms' shares (toco_core.runtime_forms.offered_shares), the enumerated int8 plans,
    a plan's run-time weight count and a function building a plan's runnable model bytes.
    Returns {form name: MemoryAnchor}: the fp32 base always when it could be measured, int8
    when offered and measurable; a measurement that fails (the child could not run the model) is
    left out, and its forms fall back to the fp32 anchor or the constants. Raises nothing of its
    own (the build's errors pass through).
    """
    anchors: dict[str, MemoryAnchor] = {}
    # the base's child runs while the int8 anchor is built and measured (RSS, not time: overlap is harmless)
    base = PendingMemory(base_bytes, shapes)
    int8 = None
    try:
        if shares.get(INT8.name, 0.0) > 0 and int8_candidates:
            plan = min(int8_candidates, key=lambda p: (p.prune_scale, p.quant_scale))
            int8 = (plan, PendingMemory(runnable(plan), shapes))
    except BaseException:
        base.cancel()
        raise
    base_mem = base.result()
    if base_mem is not None:
        anchors[FLOAT.name] = MemoryAnchor(rss=base_mem.rss, kept=float(n_weights))
    if int8 is not None:
        int8_mem = int8[1].result()
        if int8_mem is not None:
            anchors[INT8.name] = MemoryAnchor(rss=int8_mem.rss, kept=kept(int8[0]), share=shares[INT8.name])
    log.info("memory anchors measured", extra={"fields": {k: a.rss for k, a in anchors.items()}})
    return anchors
