"""Shared real parts for the agent-part tests: the LeNet-5 demo model, a "compressed"
stand-in with quantization noise on its weights, sessions, and the MNIST digits."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from toco_core.demo.data import DigitSplits, mnist_splits
from toco_core.demo.train import demo_model
from toco_core.onnx_model import load_model, model_bytes, read_weights, with_weights
from toco_core.runtime import make_session


def quant_noise(model: onnx.ModelProto, bits: int, seed: int = 0) -> onnx.ModelProto:
    """Copy of ``model`` with U(-step/2, step/2) on every weight, step = range / (2^bits - 1)."""
    rng = np.random.default_rng(seed)
    noisy = {}
    for name, w in read_weights(model).items():
        step = (w.max() - w.min()) / (2**bits - 1)
        noisy[name] = (w + rng.uniform(-step / 2, step / 2, w.shape)).astype(np.float32)
    return with_weights(model, noisy)


@dataclass(frozen=True)
class Lenet:
    """The base model and a 4-bit-noise stand-in for its compressed variant."""

    base: onnx.ModelProto
    compressed: onnx.ModelProto
    base_bytes: bytes
    compressed_bytes: bytes
    base_session: ort.InferenceSession
    compressed_session: ort.InferenceSession


@pytest.fixture(scope="session")
def lenet() -> Lenet:
    base = load_model(demo_model("lenet5"))
    comp = quant_noise(base, bits=4)
    return Lenet(base, comp, model_bytes(base), model_bytes(comp), make_session(base), make_session(comp))


@pytest.fixture(scope="session")
def digits() -> DigitSplits:
    return mnist_splits()
