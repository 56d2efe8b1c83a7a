"""Demo models with the input contracts plants use besides float NCHW (server side: torch).

- ``nhwc_uint8``: a small CNN whose graph takes camera bytes, uint8 ``[N, 28, 28, 1]``, and
  does Cast -> Div -> Transpose itself, so the device feeds frames as they come;
- :func:`nhwc_uint8_digits`: the MNIST splits in that layout (0..255, channels last);
- ``two_input``: the same camera bytes plus ``gauge``, float32 [N, 4] readings of a second
  sensor (noisy class hints), joined before the classifier head; its splits hold ModelInputs.

Trained in a few seconds on the CPU and cached like the other demo models.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from toco_core.demo.data import DigitSplits, mnist_splits
from toco_core.demo.train import Exporter, cache_dir, made_once, train
from toco_core.model_inputs import ModelInputs

_RECIPE_VERSION = "1"  # bump when the architecture or training change: invalidates the cache


class Nhwc8Classifier(nn.Module):
    """uint8 NHWC pixels in, logits out: the scaling and the layout change live in the graph."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(16 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels``: uint8 [N, H, W, 1]; returns logits [N, 10]."""
        x = pixels.to(torch.float32) / 255.0
        return cast(torch.Tensor, self.head(self.features(x.permute(0, 3, 1, 2))))


def as_nhwc_uint8(x: np.ndarray) -> np.ndarray:
    """Float NCHW digits in [0, 1] -> uint8 NHWC bytes (what a camera delivers)."""
    return np.ascontiguousarray(np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1))


def nhwc_uint8_digits(seed: int = 0) -> DigitSplits:
    """The MNIST splits (toco_core.demo.data.mnist_splits) as uint8 [N, 28, 28, 1]; labels unchanged."""
    s = mnist_splits(seed)
    return replace(s, x_train=as_nhwc_uint8(s.x_train), x_pool=as_nhwc_uint8(s.x_pool),
                   x_heldout=as_nhwc_uint8(s.x_heldout))


def nhwc_uint8_model(exporter: Exporter = "torchscript") -> Path:
    """Path of the cached ``nhwc_uint8`` ONNX model, trained and exported on first use.

    The graph's input is ``pixels`` uint8 [batch, 28, 28, 1], its output ``logits`` [batch, 10].
    """
    def make(path: Path) -> None:
        s = nhwc_uint8_digits()
        model = Nhwc8Classifier()
        # training feeds float copies of the same 0..255 values (autograd wants floats); the graph's own
        # Cast makes the exported model read the uint8 bytes identically
        train(model, s.x_train.astype(np.float32), s.y_train, epochs=6)
        _export_uint8(model.eval(), path, exporter)

    return made_once(cache_dir() / f"layouts-v{_RECIPE_VERSION}" / f"nhwc_uint8-{exporter}.onnx", make)


class TwoInputClassifier(nn.Module):
    """uint8 NHWC pixels and float gauge readings in, logits out: two branches joined before the head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = Nhwc8Classifier().features
        self.gauge = nn.Sequential(nn.Linear(4, 16), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(16 * 7 * 7 + 16, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, pixels: torch.Tensor, gauge: torch.Tensor) -> torch.Tensor:
        """``pixels``: uint8 [N, H, W, 1]; ``gauge``: float32 [N, 4]; returns logits [N, 10]."""
        x = (pixels.to(torch.float32) / 255.0).permute(0, 3, 1, 2)
        return cast(torch.Tensor, self.head(torch.cat([self.image(x), self.gauge(gauge)], dim=1)))


def gauge_readings(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """A second sensor's float32 [N, 4] readings: noisy hints of the class the camera alone may miss
    (parity, >= 5, divisible by 3, and pure noise), so the model needs both inputs."""
    y = np.asarray(labels)
    hints = np.stack([y % 2, y >= 5, y % 3 == 0, np.zeros(len(y))], axis=1).astype(np.float32)
    return hints + np.random.default_rng(seed).normal(0, 0.35, hints.shape).astype(np.float32)


@dataclass(frozen=True)
class TwoInputSplits:
    """DigitSplits with ModelInputs {pixels, gauge} for inputs: train, unlabeled pool, held-out."""

    x_train: ModelInputs
    y_train: np.ndarray
    x_pool: ModelInputs
    y_pool: np.ndarray
    x_heldout: ModelInputs
    y_heldout: np.ndarray


def two_input_digits(seed: int = 0) -> TwoInputSplits:
    """The uint8 NHWC splits with gauge readings."""
    s = nhwc_uint8_digits(seed)

    def both(x: np.ndarray, y: np.ndarray, k: int) -> ModelInputs:
        return ModelInputs({"pixels": x, "gauge": gauge_readings(y, seed + k)})

    return TwoInputSplits(both(s.x_train, s.y_train, 1), s.y_train, both(s.x_pool, s.y_pool, 2), s.y_pool,
                          both(s.x_heldout, s.y_heldout, 3), s.y_heldout)


class _TrainPair(nn.Module):
    # train() feeds one tensor: the pixels (as floats) with the 4 readings appended as a last row
    def __init__(self, inner: TwoInputClassifier) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return cast(torch.Tensor, self.inner(packed[:, :784].reshape(-1, 28, 28, 1), packed[:, 784:]))


def two_input_model(exporter: Exporter = "torchscript") -> Path:
    """Path of the cached ``two_input`` ONNX model (inputs ``pixels`` uint8 [batch, 28, 28, 1] and
    ``gauge`` float32 [batch, 4], output ``logits``), trained and exported on first use."""
    def make(path: Path) -> None:
        s = two_input_digits()
        x = s.x_train.arrays
        packed = np.concatenate([x["pixels"].reshape(len(x["pixels"]), -1).astype(np.float32), x["gauge"]], axis=1)
        model = TwoInputClassifier()
        train(_TrainPair(model), packed, s.y_train, epochs=6)
        _export_uint8(model.eval(), path, exporter, gauge=True)

    return made_once(cache_dir() / f"layouts-v{_RECIPE_VERSION}" / f"two_input-{exporter}.onnx", make)


def _export_uint8(model: nn.Module, path: Path, exporter: Exporter, gauge: bool = False) -> None:
    """Export with the uint8 input (and the gauge); written to a per-process name and renamed into place."""
    import os
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    names = ["pixels", "gauge"] if gauge else ["pixels"]
    dummy = (torch.zeros(1, 28, 28, 1, dtype=torch.uint8), torch.zeros(1, 4))[:len(names)]
    kwargs: dict[str, Any] = dict(input_names=names, output_names=["logits"])
    if exporter == "dynamo":
        batch = torch.export.Dim("batch")
        torch.onnx.export(model, dummy, str(tmp), dynamo=True, external_data=False,
                          dynamic_shapes=tuple({0: batch} for _ in names), verbose=False, **kwargs)
    else:
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(model, dummy, str(tmp), dynamo=False, opset_version=17,
                          dynamic_axes={n: {0: "batch"} for n in [*names, "logits"]}, **kwargs)
    tmp.replace(path)
