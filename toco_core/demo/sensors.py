"""The sensor scenario's model and data: a regression MLP on tabular sensor-like readings (server side: torch).

The data is scikit-learn's Friedman #1 benchmark standing in for a machine's sensors: 10 readings
in [0, 1] per row and one scalar target (read as a wear estimate); five readings drive the target,
five are noise. Trained in a second or two on one thread, exported to ONNX with a dynamic batch.
``sensor_fault`` is the scenario's field fault: some readings of one box gain an offset and a gain.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import make_friedman1
from torch import nn

# readings 3 and 4 enter the Friedman target linearly (10 x3 + 5 x4): a faulty pair of them moves
# the estimate without taking the base model anywhere its compressions were not checked to follow
FAULT_FEATURES = (3, 4)
FAULT_GAIN = 1.3
FAULT_OFFSET = 0.25


def sensor_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The readings, split. Returns (pool x, pool y, held-out x, held-out y): float32 [N, 10] readings in
    [0, 1] and float32 [N] targets, 1000 rows each."""
    x, y = make_friedman1(n_samples=2000, n_features=10, noise=0.5, random_state=0)
    x, y = x.astype(np.float32), y.astype(np.float32)
    return x[:1000], y[:1000], x[1000:], y[1000:]


def sensor_fault(x: np.ndarray, features: Sequence[int] = FAULT_FEATURES, gain: float = FAULT_GAIN,
                 offset: float = FAULT_OFFSET) -> np.ndarray:
    """Readings of a box whose sensors drifted: ``x_j * gain + offset`` for the readings in ``features``.

    Takes float [N, D] readings. Returns a float32 copy (the input is left alone). Raises IndexError for a
    feature index outside [0, D).
    """
    out = np.array(x, dtype=np.float32, copy=True)
    cols = list(features)
    out[:, cols] = out[:, cols] * gain + offset
    return out


@contextmanager
def one_thread() -> Iterator[None]:
    """Train on one thread: these models are small enough that torch's threads only contend on a
    shared machine (a small autoencoder: 53 s -> 4 s on 2 busy cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def export_onnx(net: nn.Module, example: torch.Tensor, path: Path, output: str) -> onnx.ModelProto:
    """Export ``net`` to ``path`` with input ``x`` and output ``output``, batch dimension dynamic.

    Returns the loaded ONNX model. Raises what torch.onnx.export raises.
    """
    torch.onnx.export(net, (example,), str(path), input_names=["x"], output_names=[output],
                      dynamic_axes={"x": {0: "n"}, output: {0: "n"}}, dynamo=False)
    return onnx.load(str(path))


class _Scaled(nn.Module):
    """The standardised-target network with the target's scale put back, so the output is in target units."""

    def __init__(self, net: nn.Module, mu: float, sd: float) -> None:
        super().__init__()
        self.net, self.mu, self.sd = net, mu, sd

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(v) * self.sd + self.mu
        return out


def regression_model(path: Path) -> onnx.ModelProto:
    """A 10-64-64-1 MLP fitted to the pool's targets, written to ``path``.

    Returns the ONNX model: input ``x`` [N, 10], output ``target`` [N, 1] in target units.
    """
    x, y, _, _ = sensor_split()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    mu, sd = float(yt.mean()), float(yt.std())
    with one_thread():
        for _ in range(400):
            opt.zero_grad()
            nn.functional.mse_loss(net(xt), (yt - mu) / sd).backward()
            opt.step()
    return export_onnx(_Scaled(net, mu, sd).eval(), torch.rand(2, 10), path, "target")
