"""Demo models with the input contracts plants use besides float NCHW (server side: torch).

- ``nhwc_uint8``: a small CNN whose graph takes camera bytes, uint8 ``[N, 28, 28, 1]``, and
  does Cast -> Div -> Transpose itself, so the device feeds frames as they come;
- :func:`nhwc_uint8_digits`: the MNIST splits in that layout (0..255, channels last).

Trained in a few seconds on the CPU and cached like the other demo models.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toco_core.demo.data import DigitSplits, mnist_splits
from toco_core.demo.train import Exporter, cache_dir, train

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
        return self.head(self.features(x.permute(0, 3, 1, 2)))


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
    path = cache_dir() / f"layouts-v{_RECIPE_VERSION}" / f"nhwc_uint8-{exporter}.onnx"
    if path.is_file():
        return path
    s = nhwc_uint8_digits()
    model = Nhwc8Classifier()
    # training feeds float copies of the same 0..255 values (autograd wants floats); the graph's own
    # Cast makes the exported model read the uint8 bytes identically
    train(model, s.x_train.astype(np.float32), s.y_train, epochs=6)
    _export_uint8(model.eval(), path, exporter)
    return path


def _export_uint8(model: nn.Module, path: Path, exporter: Exporter) -> None:
    """Export with the uint8 input; written to a per-process name and renamed into place."""
    import os
    import warnings

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    dummy = torch.zeros(1, 28, 28, 1, dtype=torch.uint8)
    kwargs = dict(input_names=["pixels"], output_names=["logits"])
    if exporter == "dynamo":
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=True, external_data=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False, **kwargs)
    else:
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        torch.onnx.export(model, (dummy,), str(tmp), dynamo=False, opset_version=17,
                          dynamic_axes={"pixels": {0: "batch"}, "logits": {0: "batch"}}, **kwargs)
    tmp.replace(path)
