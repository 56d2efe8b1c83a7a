"""Tiny onnx.helper graphs for ops and attribute cases the exporters do not produce, checked against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import TensorProto
from onnx import helper as oh

from tests.analysis_eval.eval_models import assert_matches_ort, tiny_model
from toco_core.analysis.graph_eval import GraphEvaluator

F32 = TensorProto.FLOAT
RNG = np.random.default_rng(0)


def _w(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


def _i64(*values):
    return np.array(values, dtype=np.int64)


def _one(op, x_shape, attrs=None, inits=None, opset=17, extra_inputs=(), n_out=1):
    """A one-node graph: input x, extra inputs from ``inits`` (name -> array or "" for omitted)."""
    names = ["x", *extra_inputs]
    outs = ["y"] + [f"y{i}" for i in range(1, n_out)]
    node = oh.make_node(op, names, outs, name=f"the_{op.lower()}", **(attrs or {}))
    model = tiny_model(
        [node],
        [oh.make_tensor_value_info("x", F32, list(x_shape))],
        [oh.make_tensor_value_info("y", F32, None)],
        {k: v for k, v in (inits or {}).items()},
        opset,
    )
    return model, x_shape


def _split_concat(x_shape, split_attrs, inits, opset, extra_inputs, n_out):
    """Split into n_out parts, then Concat them in reverse order so every part reaches the output."""
    outs = [f"p{i}" for i in range(n_out)]
    nodes = [
        oh.make_node("Split", ["x", *extra_inputs], outs, name="the_split", **split_attrs),
        oh.make_node("Concat", outs[::-1], ["y"], name="cat", axis=split_attrs.get("axis", 0)),
    ]
    model = tiny_model(nodes, [oh.make_tensor_value_info("x", F32, list(x_shape))],
                       [oh.make_tensor_value_info("y", F32, None)], inits, opset)
    return model, x_shape


def _shape_reshape():
    """Shape(start, end) -> Concat with [-1] -> Reshape: shape arithmetic that must stay constant."""
    nodes = [
        oh.make_node("Shape", ["x"], ["s"], start=0, end=2),
        oh.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        oh.make_node("Unsqueeze", ["n", "zero_axes"], ["n1"]),
        oh.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        oh.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = {"zero": np.array(0, np.int64), "zero_axes": _i64(0), "minus1": _i64(-1)}
    return tiny_model(nodes, [oh.make_tensor_value_info("x", F32, [2, 3, 4, 5])],
                      [oh.make_tensor_value_info("y", F32, None)], inits), (2, 3, 4, 5)


CASES = {
    # Gemm
    "gemm-alpha-beta-transA-transB": lambda: _one(
        "Gemm", (6, 3), dict(alpha=0.5, beta=2.0, transA=1, transB=1), {"B": _w(5, 6), "C": _w(5)},
        extra_inputs=["B", "C"]),
    "gemm-no-C": lambda: _one("Gemm", (3, 6), dict(alpha=1.5), {"B": _w(6, 4)}, extra_inputs=["B"]),
    "gemm-C-matrix": lambda: _one(
        "Gemm", (3, 6), dict(beta=0.25), {"B": _w(6, 4), "C": _w(3, 4)}, extra_inputs=["B", "C"]),
    "matmul-batched": lambda: _one("MatMul", (2, 3, 4, 5), inits={"W": _w(3, 5, 6)}, extra_inputs=["W"]),
    # Conv
    "conv-same-upper-stride2": lambda: _one(
        "Conv", (2, 3, 9, 8), dict(auto_pad="SAME_UPPER", strides=[2, 2]), {"W": _w(4, 3, 4, 4)}, extra_inputs=["W"]),
    "conv-same-lower": lambda: _one(
        "Conv", (2, 3, 9, 8), dict(auto_pad="SAME_LOWER", strides=[2, 1]), {"W": _w(4, 3, 2, 4), "B": _w(4)},
        extra_inputs=["W", "B"]),
    "conv-valid": lambda: _one("Conv", (1, 2, 7, 7), dict(auto_pad="VALID"), {"W": _w(3, 2, 3, 3)}, extra_inputs=["W"]),
    "conv-depthwise-asym-pads-dilation": lambda: _one(
        "Conv", (2, 4, 10, 10), dict(group=4, pads=[0, 2, 1, 1], dilations=[2, 1], strides=[1, 2]),
        {"W": _w(8, 1, 3, 3), "B": _w(8)}, extra_inputs=["W", "B"]),
    "conv-1d": lambda: _one(
        "Conv", (2, 3, 17), dict(pads=[2, 1], strides=[2], dilations=[2]), {"W": _w(5, 3, 3)}, extra_inputs=["W"]),
    "conv-3d": lambda: _one("Conv", (1, 2, 5, 6, 6), dict(pads=[1] * 6), {"W": _w(3, 2, 3, 3, 3)}, extra_inputs=["W"]),
    # ConvTranspose
    "convT-stride-outpad-groups": lambda: _one(
        "ConvTranspose", (2, 4, 5, 6), dict(strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2], group=2),
        {"W": _w(4, 3, 3, 3), "B": _w(6)}, extra_inputs=["W", "B"]),
    "convT-output-shape": lambda: _one(
        "ConvTranspose", (1, 2, 4, 4), dict(strides=[2, 2], output_shape=[9, 8]), {"W": _w(2, 3, 3, 3)},
        extra_inputs=["W"]),
    "convT-same-upper": lambda: _one(
        "ConvTranspose", (1, 2, 4, 5), dict(strides=[2, 2], auto_pad="SAME_UPPER"), {"W": _w(2, 3, 4, 3)},
        extra_inputs=["W"]),
    "convT-1d-dilation": lambda: _one(
        "ConvTranspose", (2, 3, 7), dict(strides=[2], dilations=[2], pads=[1, 2]), {"W": _w(3, 2, 3)},
        extra_inputs=["W"]),
    # Pools
    "maxpool-ceil-pads": lambda: _one(
        "MaxPool", (2, 3, 8, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 1, 1], ceil_mode=1)),
    "maxpool-ceil-drop-last-window": lambda: _one(
        "MaxPool", (1, 1, 5, 5), dict(kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)),
    "maxpool-same-upper-dilation": lambda: _one(
        "MaxPool", (1, 2, 9, 7), dict(kernel_shape=[3, 2], strides=[2, 2], dilations=[2, 1], auto_pad="SAME_UPPER")),
    "maxpool-1d": lambda: _one("MaxPool", (2, 3, 11), dict(kernel_shape=[3], strides=[2])),
    "avgpool-include-pad-ceil": lambda: _one(
        "AveragePool", (2, 3, 8, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
                                          count_include_pad=1, ceil_mode=1)),
    "avgpool-exclude-pad-ceil": lambda: _one(
        "AveragePool", (2, 3, 8, 9), dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 0, 0, 1], ceil_mode=1)),
    "avgpool-same-lower": lambda: _one(
        "AveragePool", (1, 2, 7, 8), dict(kernel_shape=[2, 3], strides=[2, 2], auto_pad="SAME_LOWER")),
    "avgpool-same-upper-include": lambda: _one(
        "AveragePool", (1, 2, 7, 8), dict(kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER",
                                          count_include_pad=1)),
    "avgpool-dilation-opset19": lambda: _one(
        "AveragePool", (1, 2, 9, 9), dict(kernel_shape=[2, 2], dilations=[2, 2], pads=[1, 1, 1, 1]), opset=19),
    "global-avg-pool": lambda: _one("GlobalAveragePool", (2, 3, 5, 4)),
    "global-max-pool": lambda: _one("GlobalMaxPool", (2, 3, 5, 4)),
    # Softmax family
    "softmax-opset11-flatten": lambda: _one("Softmax", (2, 3, 4, 5), dict(axis=2), opset=11),
    "softmax-opset11-default-axis": lambda: _one("Softmax", (2, 3, 4), opset=11),
    "logsoftmax-opset11": lambda: _one("LogSoftmax", (2, 3, 4), dict(axis=1), opset=11),
    "softmax-opset13-axis1": lambda: _one("Softmax", (2, 3, 4, 5), dict(axis=1), opset=13),
    "logsoftmax-opset13-default": lambda: _one("LogSoftmax", (2, 3, 4), opset=13),
    # Activations
    "clip-max-input-only": lambda: _one(
        "Clip", (3, 4), inits={"hi": np.array(0.3, np.float32)}, extra_inputs=["", "hi"]),
    "clip-both-inputs": lambda: _one(
        "Clip", (3, 4), inits={"lo": np.array(-0.2, np.float32), "hi": np.array(0.3, np.float32)},
        extra_inputs=["lo", "hi"]),
    "clip-none": lambda: _one("Clip", (3, 4)),
    "clip-opset6-attrs": lambda: _one("Clip", (3, 4), dict(min=-0.5, max=0.1), opset=6),
    "leaky-relu": lambda: _one("LeakyRelu", (3, 4), dict(alpha=0.2)),
    "hard-sigmoid": lambda: _one("HardSigmoid", (3, 4), dict(alpha=0.3, beta=0.4)),
    "hard-swish": lambda: _one("HardSwish", (3, 4)),
    "tanh": lambda: _one("Tanh", (3, 4)),
    "sigmoid": lambda: _one("Sigmoid", (3, 4)),
    "elu": lambda: _one("Elu", (3, 4), dict(alpha=0.7)),
    "gelu-tanh": lambda: _one("Gelu", (3, 4), dict(approximate="tanh"), opset=20),
    "prelu": lambda: _one("PRelu", (2, 3, 4), inits={"s": _w(3, 1)}, extra_inputs=["s"]),
    # Arithmetic
    "pow": lambda: _one("Pow", (3, 4), inits={"e": np.array([2.0, 3.0, 1.0, 0.5], np.float32)}, extra_inputs=["e"]),
    "div-broadcast": lambda: _one("Div", (2, 3, 4), inits={"d": _w(3, 1) + 3}, extra_inputs=["d"]),
    "sub-broadcast": lambda: _one("Sub", (2, 3, 4), inits={"d": _w(4)}, extra_inputs=["d"]),
    # Shapes
    "reshape-zero-minus1": lambda: _one("Reshape", (2, 3, 4, 5), inits={"s": _i64(0, -1, 5)}, extra_inputs=["s"]),
    "reshape-allowzero": lambda: _one(
        "Reshape", (2, 3, 4), dict(allowzero=1), inits={"s": _i64(4, -1)}, extra_inputs=["s"], opset=14),
    "flatten-axis-neg": lambda: _one("Flatten", (2, 3, 4, 5), dict(axis=-1)),
    "flatten-axis0": lambda: _one("Flatten", (2, 3, 4), dict(axis=0)),
    "transpose-perm": lambda: _one("Transpose", (2, 3, 4), dict(perm=[1, 2, 0])),
    "transpose-default": lambda: _one("Transpose", (2, 3, 4)),
    "shape-gather-concat-reshape": _shape_reshape,
    "squeeze-opset11-attr": lambda: _one("Squeeze", (2, 1, 4, 1), dict(axes=[1, -1]), opset=11),
    "squeeze-input": lambda: _one("Squeeze", (2, 1, 4, 1), inits={"a": _i64(3)}, extra_inputs=["a"]),
    "squeeze-all": lambda: _one("Squeeze", (2, 1, 4, 1)),
    "unsqueeze-opset11-attr": lambda: _one("Unsqueeze", (2, 3), dict(axes=[0, 3]), opset=11),
    "unsqueeze-input-negative": lambda: _one("Unsqueeze", (2, 3), inits={"a": _i64(-1, 1)}, extra_inputs=["a"]),
    "slice-steps-negative": lambda: _one(
        "Slice", (3, 10, 8), inits={"st": _i64(-1, 1), "en": _i64(-100, 1000), "ax": _i64(1, 2), "sp": _i64(-3, 2)},
        extra_inputs=["st", "en", "ax", "sp"]),
    "slice-clamped-no-axes": lambda: _one(
        "Slice", (4, 6), inits={"st": _i64(1, -4), "en": _i64(2**62, -1)}, extra_inputs=["st", "en"]),
    "slice-opset9-attrs": lambda: _one("Slice", (4, 6), dict(starts=[1], ends=[-1], axes=[1]), opset=9),
    "gather-negative-2d-indices": lambda: _one(
        "Gather", (3, 5, 2), dict(axis=1), inits={"i": np.array([[0, -1], [2, 2]], np.int64)}, extra_inputs=["i"]),
    "gather-scalar-index": lambda: _one("Gather", (3, 5), dict(axis=0), inits={"i": np.array(-2, np.int64)},
                                        extra_inputs=["i"]),
    "split-sizes-input": lambda: _split_concat((2, 6, 3), dict(axis=1), {"s": _i64(2, 3, 1)}, 17, ["s"], 3),
    "split-attr-opset11": lambda: _split_concat((6, 4), dict(axis=0, split=[1, 5]), {}, 11, [], 2),
    "split-equal": lambda: _split_concat((2, 6), dict(axis=1), {}, 17, [], 3),
    "split-num-outputs-uneven": lambda: _split_concat((2, 7), dict(axis=-1, num_outputs=3), {}, 18, [], 3),
    "concat-negative-axis": lambda: _one("Concat", (2, 3), dict(axis=-1), {"b": _w(2, 2)}, extra_inputs=["b"]),
    "expand": lambda: _one("Expand", (3, 1), inits={"s": _i64(2, 1, 4)}, extra_inputs=["s"]),
    "tile": lambda: _one("Tile", (2, 3), inits={"r": _i64(2, 1)}, extra_inputs=["r"]),
    # Pad
    "pad-constant-value": lambda: _one(
        "Pad", (1, 2, 3, 4), inits={"p": _i64(0, 0, 1, 2, 0, 0, 2, -1), "v": np.array(1.5, np.float32)},
        extra_inputs=["p", "v"]),
    "pad-reflect": lambda: _one("Pad", (1, 2, 4, 5), dict(mode="reflect"), {"p": _i64(0, 0, 2, 3, 0, 0, 3, 1)},
                                extra_inputs=["p"]),
    "pad-edge": lambda: _one("Pad", (1, 2, 4, 5), dict(mode="edge"), {"p": _i64(0, 1, 2, 3, 0, 0, 3, 1)},
                             extra_inputs=["p"]),
    "pad-wrap-axes-opset19": lambda: _one(
        "Pad", (1, 2, 4, 5), dict(mode="wrap"), {"p": _i64(1, 2, 3, 2), "a": _i64(-2, -1)},
        extra_inputs=["p", "", "a"], opset=19),
    "pad-opset2-attrs": lambda: _one("Pad", (2, 3), dict(pads=[1, 0, 0, 2], value=-1.0), opset=2),
    # Resize
    "resize-nearest-sizes-asym-ceil": lambda: _one(
        "Resize", (1, 2, 4, 5), dict(mode="nearest", coordinate_transformation_mode="asymmetric",
                                     nearest_mode="round_prefer_ceil"),
        {"s": _i64(1, 2, 7, 13)}, extra_inputs=["", "", "s"]),
    "resize-nearest-scales-half-floor": lambda: _one(
        "Resize", (1, 2, 6, 6), dict(mode="nearest", nearest_mode="floor"),
        {"sc": np.array([1, 1, 0.5, 1.5], np.float32)}, extra_inputs=["", "sc"]),
    "resize-linear-half-pixel": lambda: _one(
        "Resize", (1, 2, 4, 5), dict(mode="linear"), {"sc": np.array([1, 1, 1.5, 2.3], np.float32)},
        extra_inputs=["", "sc"]),
    "resize-linear-align-corners": lambda: _one(
        "Resize", (1, 2, 4, 5), dict(mode="linear", coordinate_transformation_mode="align_corners"),
        {"s": _i64(1, 2, 7, 3)}, extra_inputs=["", "", "s"]),
    "resize-linear-pytorch-half-pixel": lambda: _one(
        "Resize", (1, 2, 4, 5), dict(mode="linear", coordinate_transformation_mode="pytorch_half_pixel"),
        {"s": _i64(1, 2, 1, 9)}, extra_inputs=["", "", "s"]),
    "resize-opset11-roi-scales": lambda: _one(
        "Resize", (1, 2, 3, 3), dict(mode="nearest"),
        {"roi": np.array([], np.float32), "sc": np.array([1, 1, 2, 2], np.float32)}, extra_inputs=["roi", "sc"],
        opset=11),
    "resize-opset18-axes-not-larger": lambda: _one(
        "Resize", (1, 2, 4, 6), dict(mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger"),
        {"s": _i64(6, 12)}, extra_inputs=["", "", "s"], opset=18),
    # Reduce and norms
    "reducemean-attr-nokeep": lambda: _one("ReduceMean", (2, 3, 4), dict(axes=[1, -1], keepdims=0), opset=13),
    "reducemean-input-keep": lambda: _one("ReduceMean", (2, 3, 4), inits={"a": _i64(2)}, extra_inputs=["a"], opset=18),
    "reducemean-all": lambda: _one("ReduceMean", (2, 3, 4), opset=18),
    "reducesum-input": lambda: _one("ReduceSum", (2, 3, 4), dict(keepdims=0), {"a": _i64(0, 2)}, extra_inputs=["a"]),
    "batchnorm-rank2": lambda: _one(
        "BatchNormalization", (4, 3), dict(epsilon=1e-3),
        {"s": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5}, extra_inputs=["s", "b", "m", "v"]),
    "batchnorm-rank3": lambda: _one(
        "BatchNormalization", (2, 3, 5), inits={"s": _w(3), "b": _w(3), "m": _w(3), "v": np.abs(_w(3)) + 0.5},
        extra_inputs=["s", "b", "m", "v"]),
    "layernorm": lambda: _one("LayerNormalization", (2, 3, 4), dict(axis=-2), {"s": _w(3, 4), "b": _w(3, 4)},
                              extra_inputs=["s", "b"]),
    "instancenorm": lambda: _one("InstanceNormalization", (2, 3, 4, 5), inits={"s": _w(3), "b": _w(3)},
                                 extra_inputs=["s", "b"]),
    # Pass-through
    "dropout-ratio-input": lambda: _one("Dropout", (3, 4), inits={"r": np.array(0.5, np.float32)},
                                        extra_inputs=["r"], n_out=2),
    "identity": lambda: _one("Identity", (3, 4)),
    "cast-double-roundtrip": lambda: (
        tiny_model([oh.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
                    oh.make_node("Sqrt", ["d"], ["s"]),
                    oh.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)],
                   [oh.make_tensor_value_info("x", F32, [3, 4])], [oh.make_tensor_value_info("y", F32, None)]),
        (3, 4)),
}

# ops whose input must stay in their domain
_POSITIVE = {"pow", "cast-double-roundtrip"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_op_matches_onnxruntime(case):
    model, shape = CASES[case]()
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    if case in _POSITIVE:
        x = np.abs(x) + 0.1
    ev = GraphEvaluator(model, trainable=[])
    assert_matches_ort(model, ev(torch.from_numpy(x)), x)
