"""Per-output-channel mixed precision from tolerances.

For each output channel c we pick the largest quantization step Delta_c such that the rounding
error |w - Delta_c * round(w / Delta_c)| stays within tau for at least ``coverage`` of the
channel's weights; bits follow from the step: b_c = ceil(log2(2 * max|code| + 1)).
Already-zero (pruned) weights stay exactly zero (code 0).
"""

from __future__ import annotations

import numpy as np

_GRID = 48
MAX_CODE = 4095  # candidate steps per channel, geometric between the smallest tolerance and the range


def _channels_first(a: np.ndarray, out_axis: int) -> np.ndarray:
    return np.moveaxis(a, out_axis, 0).reshape(a.shape[out_axis], -1)


def channel_steps(w: np.ndarray, tau: np.ndarray, out_axis: int, coverage: float = 0.99) -> np.ndarray:
    """The largest step per output channel whose rounding error is within tau for >= coverage.

    Takes the weight, its tolerance (same shape), the output-channel axis and the coverage in
    (0, 1]. Returns float32 steps, one per channel (a channel of zeros gets step 1.0).
    Raises ValueError for a coverage outside (0, 1] or mismatched shapes.
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if w.shape != tau.shape:
        raise ValueError(f"weight shape {w.shape} != tolerance shape {tau.shape}")
    wc, tc = _channels_first(w, out_axis).astype(np.float64), _channels_first(tau, out_axis).astype(np.float64)
    live = wc != 0
    steps = np.ones(wc.shape[0], dtype=np.float32)
    for c in range(wc.shape[0]):
        x, t = wc[c][live[c]], tc[c][live[c]]
        if x.size == 0:
            continue
        top = 2.0 * np.abs(x).max()
        # never finer than 13-bit codes (|code| <= 4095: the storage coder's limit)
        low = max(2.0 * _quantile(t, 1 - coverage), top / MAX_CODE * 0.5 * 1.001)
        # steps on the float16 grid: the storage form then keeps 2 bytes per channel, not 4
        cands = np.unique(_geomspace(low, max(top, low)).astype(np.float16).astype(np.float64))  # [G]
        cands = cands[np.isfinite(cands) & (cands > 0)]
        if cands.size == 0:
            continue
        err = np.abs(x[None, :] - cands[:, None] * np.round(x[None, :] / cands[:, None]))  # [G, k]
        ok = (err <= t[None, :]).mean(axis=1) >= coverage
        steps[c] = cands[np.nonzero(ok)[0].max()] if ok.any() else low
    return steps


def _geomspace(lo: float, hi: float) -> np.ndarray:
    """np.geomspace(lo, hi, _GRID) for 0 < lo <= hi, the same arithmetic without its per-call overhead."""
    out = np.power(10.0, np.linspace(np.log10(lo), np.log10(hi), _GRID))
    out[0], out[-1] = lo, hi
    return out


def _quantile(t: np.ndarray, q: float) -> float:
    """np.quantile(t, q) (linear method, the same arithmetic) without its per-call overhead."""
    v = np.sort(t)
    pos = (v.size - 1) * q
    lo = int(np.floor(pos))
    hi = min(lo + 1, v.size - 1)
    frac = pos - lo
    a, b = float(v[lo]), float(v[hi])
    diff = b - a
    return b - diff * (1 - frac) if frac >= 0.5 else a + diff * frac


def quantize(w: np.ndarray, steps: np.ndarray, out_axis: int) -> tuple[np.ndarray, np.ndarray]:
    """codes = round(w / step_c) per channel; returns (int32 codes, float32 dequantized weights)."""
    shape = [1] * w.ndim
    shape[out_axis] = -1
    st = steps.reshape(shape).astype(np.float64)
    codes = np.round(w / st).astype(np.int32)
    return codes, (codes * st).astype(np.float32)


def channel_bits(codes: np.ndarray, out_axis: int) -> np.ndarray:
    """Bits per output channel for a fixed-width signed code: ceil(log2(2 max|code| + 1))."""
    m = np.abs(_channels_first(codes, out_axis)).max(axis=1)
    result: np.ndarray = np.ceil(np.log2(2 * m + 1)).astype(np.int32)
    return result


def code_entropy_bits(codes: np.ndarray) -> float:
    """Empirical entropy of the codes in bits per weight (what an entropy coder approaches)."""
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())
