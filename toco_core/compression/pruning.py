"""Unstructured tolerance pruning: w_i = 0 where |w_i| <= tau_i.

Saves storage and transfer only: onnxruntime does not run sparse weights faster on CPU.
"""

from __future__ import annotations

import numpy as np


def prune_mask(w: np.ndarray, tau: np.ndarray) -> np.ndarray:
    """Boolean mask of the weights to zero: |w| <= tau (same shape as w)."""
    result: np.ndarray = np.abs(w) <= tau
    return result


def prune(weights: dict[str, np.ndarray], tau: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Zero every weight within its tolerance; returns new arrays, inputs untouched."""
    return {k: np.where(prune_mask(w, tau[k]), np.float32(0), w).astype(np.float32) for k, w in weights.items()}


def sparsity(weights: dict[str, np.ndarray]) -> float:
    """Share of exactly-zero weights over all tensors."""
    total = sum(w.size for w in weights.values())
    return sum(int((w == 0).sum()) for w in weights.values()) / max(total, 1)


def magnitude_thresholds(weights: dict[str, np.ndarray], target: float, layerwise: bool = False) -> dict[str, float]:
    """Baseline: the |w| threshold per tensor that zeroes a ``target`` share of weights.

    Global (one threshold over all tensors) or layer-wise (the same share in each tensor).
    """
    if layerwise:
        return {k: float(np.quantile(np.abs(w), target)) for k, w in weights.items()}
    allw = np.concatenate([np.abs(w).ravel() for w in weights.values()])
    t = float(np.quantile(allw, target))
    return {k: t for k in weights}
