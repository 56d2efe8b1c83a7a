"""Full QDQ int8: fused by onnxruntime into integer kernels, outputs close, weight error exact."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper

from tests.compression_formats.graphs import op_counts, optimized_op_counts
from toco_core.compression.qdq_int8 import (
    int8_weight_error,
    quantizable_nodes,
    quantize_qdq_int8,
    without_zero_bias_points,
)
from toco_core.errors import ModelError, PoolError
from toco_core.onnx_model import compressible_weights, read_weights
from toco_core.runtime import run_model


def dequantized_weights(qdq) -> dict[str, np.ndarray]:
    """The float weights the QDQ model really computes with: DequantizeLinear of its int8 initializers."""
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    out = {}
    for node in qdq.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and inits[node.input[0]].dtype == np.int8:
            q, scale = inits[node.input[0]].astype(np.float32), inits[node.input[1]]
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim:
                shape[axis] = -1
            out[node.output[0]] = q * scale.reshape(shape)
    return out


@pytest.mark.parametrize("arch,fused", [("lenet5", {"QLinearConv": 2, "QGemm": 3}), ("mlp", {"QGemm": 3})])
def test_demo_model_fuses_to_integer_kernels(demo, calib, heldout, arch, fused):
    model = demo[(arch, "torchscript")]
    qdq = quantize_qdq_int8(model, None, calib)
    counts = op_counts(qdq)
    assert counts["QuantizeLinear"] >= len(fused) and counts["DequantizeLinear"] >= 2 * counts["QuantizeLinear"] - 2
    optimized = optimized_op_counts(qdq)
    for op, n in fused.items():
        assert optimized[op] == n
    assert optimized["Conv"] == optimized["Gemm"] == 0
    assert len(qdq.SerializeToString()) < 0.35 * len(model.SerializeToString())
    base, out = run_model(model, heldout), run_model(qdq, heldout)
    assert (base.argmax(1) == out.argmax(1)).mean() >= 0.98
    # typical error well under the logits' size (a broken scale gives ~100%): 15% on the LeNet-5 one
    # of our machines trained (min-max activation ranges, 1.8% of digits flip), under 5% on another's
    assert np.abs(base - out).mean() < 0.25 * np.abs(base).mean()

    # without the bias zero points (all 0): fused the same, the very same outputs, 4 bytes a channel less
    lean = without_zero_bias_points(qdq)
    assert optimized_op_counts(lean) == optimized
    np.testing.assert_array_equal(run_model(lean, heldout), out)
    bias_channels = sum(numpy_helper.to_array(t).size for t in model.graph.initializer if len(t.dims) == 1)
    assert len(qdq.SerializeToString()) - len(lean.SerializeToString()) >= 4 * bias_channels


def test_only_the_named_nodes_are_quantized(demo, calib):
    model = demo[("lenet5", "dynamo")]
    names = quantizable_nodes(model)
    assert len(names) == 5
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    optimized = optimized_op_counts(quantize_qdq_int8(model, [conv], calib))
    assert optimized["QLinearConv"] == 1 and optimized["QGemm"] == 0
    assert optimized["Gemm"] + optimized["FusedGemm"] == 3


@pytest.mark.parametrize("per_channel", [True, False])
def test_weight_error_is_the_error_quantize_static_makes(demo, calib, per_channel):
    model = demo[("mlp", "torchscript")]
    weights = read_weights(model)
    real = dequantized_weights(quantize_qdq_int8(model, None, calib, per_channel=per_channel))
    for info in compressible_weights(model):
        deq = next(v for k, v in real.items() if k.startswith(info.name))
        predicted = int8_weight_error(weights[info.name], info.out_axis, per_channel)
        np.testing.assert_array_equal(predicted, np.abs(weights[info.name] - deq))
        step = np.abs(weights[info.name]).max() / 127
        assert predicted.max() <= step / 2 * (1 + 1e-5) and predicted.max() > step / 4


def test_weight_error_formula():
    w = np.array([[1.0, -0.5, 0.26], [0.0, 0.0, 0.0]], dtype=np.float32)
    err = int8_weight_error(w, out_axis=0)
    s = np.float32(1.0) / 127
    np.testing.assert_allclose(err[0], np.abs(w[0] - np.round(w[0] / s) * s), atol=1e-7)
    assert not err[1].any()
    with pytest.raises(ValueError, match="out_axis"):
        int8_weight_error(w, out_axis=2)


def test_bad_inputs_are_refused(demo, calib):
    model = demo[("lenet5", "torchscript")]
    with pytest.raises(ModelError, match="not Conv/Gemm/MatMul"):
        quantize_qdq_int8(model, ["/1/Relu"], calib)
    with pytest.raises(PoolError):
        quantize_qdq_int8(model, None, calib[:, :, :20])
    with pytest.raises(PoolError):
        quantize_qdq_int8(model, None, calib[:0])
