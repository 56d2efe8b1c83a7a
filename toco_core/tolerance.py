"""Closed-form per-weight tolerances from the Fisher diagonal (the TOCO method).

Maximise sum_i log tau_i subject to 1/2 sum_i F_i tau_i^2 <= eps. The Lagrangian gives
every weight an equal share of the budget: F_i tau_i^2 = 2 eps / n, so

    tau_i = sqrt(2 eps / (n F_i)).

We store tau_hat = tau at eps = 1; a device uses tau = s * tau_hat with one scale s per
compression operator. Two refinements the measurements call for:

- F_i = 0 (dead inputs, dead units) makes tau infinite. F is floored at
  ``floor_rel * median(F | F > 0)`` of its tensor, and tau is capped at the tensor's weight
  range max|w| (moving a weight by more than the range is never needed).
- All arrays are float64 internally for the division, float32 out.
"""

from __future__ import annotations

import numpy as np


def fisher_floor(fisher: np.ndarray, floor_rel: float) -> float:
    """The smallest Fisher value used for a tensor: floor_rel * median of its positive entries.

    Returns a tiny positive number when the whole tensor has F = 0.
    """
    positive = fisher[fisher > 0]
    if positive.size == 0:
        return 1e-30
    return float(max(floor_rel * np.median(positive), 1e-30))


def closed_form_tolerance(
    fisher: dict[str, np.ndarray],
    weights: dict[str, np.ndarray],
    eps: float = 1.0,
    floor_rel: float = 1e-2,
) -> dict[str, np.ndarray]:
    """tau_i = sqrt(2 eps / (n max(F_i, F_floor))), capped at max|w| of the tensor.

    Takes the Fisher diagonal and the weights (same names and shapes), the budget eps and the
    relative floor. Returns tau per tensor. Raises ValueError on mismatched names or shapes
    or a non-positive eps.
    """
    if eps <= 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if set(fisher) != set(weights):
        raise ValueError(f"fisher and weights name different tensors: {sorted(set(fisher) ^ set(weights))}")
    n = sum(f.size for f in fisher.values())
    out = {}
    for name, f in fisher.items():
        w = weights[name]
        if f.shape != w.shape:
            raise ValueError(f"{name}: fisher shape {f.shape} != weight shape {w.shape}")
        floored = np.maximum(f.astype(np.float64), fisher_floor(f, floor_rel))
        tau = np.sqrt(2.0 * eps / (n * floored))
        out[name] = np.minimum(tau, tolerance_cap(w)).astype(np.float32)
    return out


def tolerance_cap(w: np.ndarray) -> np.float32:
    """The largest tolerance a weight of this tensor gets: max|w| (1.0 for an all-zero tensor)."""
    return np.float32(float(np.abs(w).max()) or 1.0)


def scaled(tau_hat: dict[str, np.ndarray], s: float) -> dict[str, np.ndarray]:
    """tau = s * tau_hat for every tensor."""
    return {k: (v * np.float32(s)) for k, v in tau_hat.items()}


def log_tolerance_change(a: dict[str, np.ndarray], b: dict[str, np.ndarray],
                         weights: dict[str, np.ndarray]) -> float:
    """How much an analysis round moved the map's shape: with d_i = log tau_a,i - log tau_b,i over the
    weights below their tensor's cap in either map, median_i |d_i - median_j d_j|.

    Weights at the cap (tolerance_cap) in both maps are left out: their change is 0 by construction,
    and on LeNet-5 they are 53-56% of all weights, so a median over every weight read 0.0 after two
    rounds whatever the others did (QBC stopped there on most variants). The common shift is taken
    out: the samples QBC adds are the most disputed ones, whose gradients are larger than the pool's,
    so each round lowers most taus by about the same factor (0.09-0.16 in log per round on LeNet-5),
    which the committee's scale absorbs; what the stop rule asks is whether the map's shape settled.

    Takes the two maps and the weights (same names and shapes). Returns the change, 0.0 when every
    weight is at its cap in both maps.
    """
    diffs = []
    for k in a:
        cap = tolerance_cap(weights[k])
        free = (a[k] < cap) | (b[k] < cap)
        diffs.append(np.log(a[k][free].astype(np.float64)) - np.log(b[k][free].astype(np.float64)))
    d = np.concatenate(diffs) if diffs else np.zeros(0)
    return float(np.median(np.abs(d - np.median(d)))) if d.size else 0.0
