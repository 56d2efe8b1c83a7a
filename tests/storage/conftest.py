"""Real demo models and realistic codes for the storage-form tests."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from toco_core.compression.storage import QuantizedTensor, quantize_to_codes
from toco_core.demo.train import demo_model
from toco_core.onnx_model import compressible_weights, load_model, read_weights


def realistic_codes(model: onnx.ModelProto, zero_share: float = 0.6) -> list[QuantizedTensor]:
    """4-bit per-channel codes (step = max|w| / 7) with the smallest ``zero_share`` of each layer zeroed."""
    out = []
    weights = read_weights(model)
    for info in compressible_weights(model):
        w = weights[info.name]
        rows = np.moveaxis(w, info.out_axis, 0).reshape(w.shape[info.out_axis], -1)
        steps = np.abs(rows).max(axis=1) / 7
        pruned = np.where(np.abs(w) <= np.quantile(np.abs(w), zero_share), 0.0, w)
        out.append(quantize_to_codes(pruned, steps, info.out_axis, info.name))
    return out


@pytest.fixture(scope="session")
def lenet() -> onnx.ModelProto:
    return load_model(demo_model("lenet5"))


@pytest.fixture(scope="session")
def mlp() -> onnx.ModelProto:
    return load_model(demo_model("mlp"))
