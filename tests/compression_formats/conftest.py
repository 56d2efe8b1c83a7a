"""Fixtures: the trained demo models (both exporters) and real MNIST digits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from toco_core.demo.data import DigitSplits, mnist_splits
from toco_core.demo.train import demo_model
from toco_core.onnx_model import load_model


@pytest.fixture(scope="session")
def splits() -> DigitSplits:
    """The real MNIST digits split train / pool / held-out."""
    return mnist_splits()


@pytest.fixture(scope="session")
def heldout(splits: DigitSplits) -> np.ndarray:
    """500 held-out digits for comparing outputs."""
    return splits.x_heldout[:500]


@pytest.fixture(scope="session")
def calib(splits: DigitSplits) -> np.ndarray:
    """200 pool digits used as calibration samples."""
    return splits.x_pool[:200]


@pytest.fixture(scope="session")
def demo() -> dict[tuple[str, str], onnx.ModelProto]:
    """Trained lenet5 and mlp, exported by torchscript and dynamo, keyed (arch, exporter)."""
    return {(a, e): load_model(demo_model(a, e)) for a in ("lenet5", "mlp") for e in ("torchscript", "dynamo")}
