"""QDQ int8 placement on the real LeNet-5: onnxruntime must run it as one integer chain.

The check reads onnxruntime's own optimised graph (SessionOptions.optimized_model_filepath), so it
fails when a DequantizeLinear -> QuantizeLinear pair is left between two int8 layers.
"""

from __future__ import annotations

import onnx
import onnxruntime as ort

from toco_core.compression.qdq_int8 import int8_chain_ops, quantizable_nodes, quantize_qdq_int8, with_node_names
from toco_core.fidelity import compare_outputs
from toco_core.runtime import run_model


def _optimised(model: onnx.ModelProto, tmp_path) -> list[onnx.NodeProto]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # its "hardware specific" warning about the saved file
    opts.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return list(onnx.load(opts.optimized_model_filepath).graph.node)


def _dq_q_pairs(nodes: list[onnx.NodeProto]) -> list[str]:
    readers = {i: n for n in nodes for i in n.input}
    return [n.name for n in nodes if n.op_type == "DequantizeLinear"
            and readers.get(n.output[0]) is not None and readers[n.output[0]].op_type == "QuantizeLinear"]


def test_pools_relus_and_flatten_between_int8_layers_join_the_int8_chain(lenet5):
    named = with_node_names(lenet5)
    ops = {n.name: n.op_type for n in named.graph.node}
    chain = int8_chain_ops(named, quantizable_nodes(named))
    # every op between the first conv and the last Gemm, none of the targets
    assert sorted(ops[n] for n in chain) == ["Flatten", "MaxPool", "MaxPool", "Relu", "Relu", "Relu", "Relu"]


def test_pass_through_ops_next_to_a_float_layer_stay_float(lenet5):
    named = with_node_names(lenet5)
    first_conv = quantizable_nodes(named)[:1]
    # the Relu and pool after the only int8 conv lead to a float conv: quantizing them would only move the DQ
    assert int8_chain_ops(named, first_conv) == []


def test_onnxruntime_runs_the_qdq_model_without_dequantize_quantize_pairs(lenet5, digits, tmp_path):
    q = quantize_qdq_int8(lenet5, None, digits.x_pool[:100])
    nodes = _optimised(q, tmp_path)
    types = [n.op_type for n in nodes]
    assert _dq_q_pairs(nodes) == []
    assert "MaxPool" not in types and types.count("NhwcMaxPool") == 2  # both pools run on uint8
    assert types.count("DequantizeLinear") == 1  # only the output leaves the integer chain
    agreement = compare_outputs(run_model(lenet5, digits.x_heldout), run_model(q, digits.x_heldout)).agreement
    assert agreement >= 0.98, f"int8 LeNet-5 agrees with its base on {agreement:.1%} of held-out digits"
