"""Fixtures for the evaluator tests: real demo models, real MNIST digits, test CNNs exported by both exporters."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from tests.analysis_eval.eval_models import (
    EXPORTERS,
    MixNet,
    ReshapeBatchNet,
    export,
    initializers_to_constants,
    randomize_bn,
)
from toco_core.demo.data import mnist_splits
from toco_core.demo.train import demo_model


@pytest.fixture(scope="session")
def digits() -> np.ndarray:
    """Eight real MNIST digits from the analysis pool, float32 [8, 1, 28, 28]."""
    return mnist_splits().x_pool[:8].copy()


@pytest.fixture(scope="session")
def demo_models() -> dict[tuple[str, str], onnx.ModelProto]:
    """The trained demo lenet5 and mlp from both exporters, keyed (arch, exporter)."""
    return {(a, e): onnx.load(str(demo_model(a, e))) for a in ("lenet5", "mlp") for e in EXPORTERS}


@pytest.fixture(scope="session")
def test_models(tmp_path_factory, demo_models) -> dict[str, onnx.ModelProto]:
    """Random-init MixNet and ReshapeBatchNet from both exporters, and lenet5 with Constant-node weights."""
    root = tmp_path_factory.mktemp("graph_eval_models")
    out = {}
    for cls in (MixNet, ReshapeBatchNet):
        torch.manual_seed(1)
        model = randomize_bn(cls())
        for exporter in EXPORTERS:
            out[f"{cls.__name__}-{exporter}"] = export(model, root / f"{cls.__name__}-{exporter}.onnx", exporter)
    for exporter in EXPORTERS:
        out[f"lenet5-constants-{exporter}"] = initializers_to_constants(demo_models[("lenet5", exporter)])
    return out
