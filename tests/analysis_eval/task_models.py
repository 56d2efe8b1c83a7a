"""Models that are not classifiers, trained here with torch in a second or two and exported to ONNX.

- a regression MLP on tabular sensor-like data (scikit-learn's Friedman #1: 10 readings, one
  scalar target);
- a small conv autoencoder on scikit-learn's 8x8 digits whose ONNX output is the reconstruction
  error per sample (an anomaly score);
- an embedding MLP on the digits (trained through a classifier head, exported up to the
  L2-normalised 16-value embedding).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits, make_friedman1
from torch import nn


def sensor_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool x, pool y, held-out x, held-out y): float32 [N, 10] readings in [0, 1], float32 [N] targets."""
    x, y = make_friedman1(n_samples=2000, n_features=10, noise=0.5, random_state=0)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def digit_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool x, pool y, held-out x, held-out y): float32 [N, 1, 8, 8] in [0, 1] and int64 labels."""
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    return x[:1000], y[:1000], x[1000:], y[1000:]


@contextmanager
def _one_thread() -> Iterator[None]:
    """Train on one thread: these models are small enough that torch's threads only contend on a
    shared machine (the autoencoder: 53 s -> 4 s on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _export(net: nn.Module, example: torch.Tensor, path: Path, output: str) -> onnx.ModelProto:
    torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=[output],
                      dynamic_axes={"x": {0: "n"}, output: {0: "n"}}, dynamo=False)
    return onnx.load(str(path))


def regression_model(path: Path) -> onnx.ModelProto:
    """A 10-64-64-1 MLP fitted to the Friedman target (standardised inside the model, so the output is in
    target units)."""
    x, y, _, _ = sensor_split()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    mu, sd = float(yt.mean()), float(yt.std())
    with _one_thread():
        for _ in range(400):
            opt.zero_grad()
            nn.functional.mse_loss(net(xt), (yt - mu) / sd).backward()
            opt.step()

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, v: torch.Tensor) -> torch.Tensor:
            return self.net(v) * sd + mu

    return _export(Scaled().eval(), torch.rand(2, 10), path, "target")


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
    with _one_thread():
        ae = _AutoEncoder()
        opt = torch.optim.Adam(ae.parameters(), lr=2e-2)
        xt = torch.from_numpy(x)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.mse_loss(ae(xt), xt).backward()
            opt.step()
    return _export(_ReconstructionError(ae).eval(), torch.rand(2, 1, 8, 8), path, "score")


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
    with _one_thread():
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

    return _export(Embed().eval(), torch.rand(2, 64), path, "embedding")
