"""Models that are not classifiers, trained here with torch in a second or two and exported to ONNX.

- a regression MLP on tabular sensor-like data (scikit-learn's Friedman #1: 10 readings, one
  scalar target): the sensor demo's model, toco_core.demo.sensors;
- a small conv autoencoder on scikit-learn's 8x8 digits whose ONNX output is the reconstruction
  error per sample (an anomaly score);
- an embedding MLP on the digits (trained through a classifier head, exported up to the
  L2-normalised 16-value embedding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from torch import nn

from toco_core.demo.sensors import export_onnx, one_thread


def digit_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool x, pool y, held-out x, held-out y): float32 [N, 1, 8, 8] in [0, 1] and int64 labels."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1000], y[:1000], x[1000:], y[1000:]


class _AutoEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        # a bottleneck of 2 x 4 x 4 = 32 values for 64 pixels: it cannot learn the identity
        self.encode = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 3, stride=2, padding=1),
                                    nn.ReLU())
        self.decode = nn.Sequential(nn.ConvTranspose2d(2, 8, 2, stride=2), nn.ReLU(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


class _ReconstructionError(nn.Module):
    """score(x) = mean over pixels of (x - decode(encode(x)))^2: one value per sample."""

    def __init__(self, ae: _AutoEncoder) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.ae(x)) ** 2).mean(dim=(1, 2, 3))


def autoencoder_score_model(path: Path) -> onnx.ModelProto:
    """The conv autoencoder trained on digits 0-7 (8 and 9 score as anomalies), exported as its
    reconstruction error ``score`` [N]."""
    x, y, _, _ = digit_images()
    x = x[y < 8][:400]  # a few seconds of training on a shared 2-core machine
    torch.manual_seed(0)
    with one_thread():
        ae = _AutoEncoder()
        opt = torch.optim.Adam(ae.parameters(), lr=2e-2)
        xt = torch.from_numpy(x)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.mse_loss(ae(xt), xt).backward()
            opt.step()
    return export_onnx(_ReconstructionError(ae).eval(), torch.rand(2, 1, 8, 8), path, "score")


def embedding_model(path: Path) -> onnx.ModelProto:
    """A 64-48-16 MLP embedding of the digits, trained through a linear classifier head that is then
    dropped; the ONNX output ``embedding`` is L2-normalised [N, 16]."""
    x, y, _, _ = digit_images()
    x = x.reshape(len(x), -1)
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
    head = nn.Linear(16, 10)
    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    with one_thread():
        for _ in range(200):
            opt.zero_grad()
            nn.functional.cross_entropy(head(nn.functional.normalize(body(xt), dim=1) * 8), yt).backward()
            opt.step()

    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = body

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return nn.functional.normalize(self.body(v), dim=1)

    return export_onnx(Embed().eval(), torch.rand(2, 64), path, "embedding")
