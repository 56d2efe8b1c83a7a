"""Nested quantisation: every plan's weights are a function of one set of master codes.

A box that holds the master codes (or a prefix of their embedded coding, see
toco_core.parts_codec) can build any calibrated plan, and gets exactly the weights the server
measured. Per output channel c of a weight:

- master codes:  q = rint(w / D_c), |q| <= MAX_CODE, D_c the master step (float16-exact);
- octave k:      c_k = sign(q) * floor(|q| / 2^k + 1/2)   (nearest, ties away from zero),
                 value = c_k * (2^k * D_c)                 (still a codes x step lattice, so the
                 storage form, QDQ int8 and MatMulNBits keep working);
- bit planes:    octave k is a function of sign(q) and |q| >> (k - 1), so a box that knows the
                 magnitude down to bit k - 1 builds octave k (see CodeLadder);
- pruning:       a weight is pruned at prune scale p_j of the analysis grid iff its prune class
                 is <= j, where class = the first grid index j with rank <= p_j (len(grid): never).

Integer arithmetic throughout, so every platform decodes the same codes; the float values are
one float32 multiply of an exact code by an exact power-of-two multiple of the master step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_CODE = 4095  # the storage coder's limit (13-bit codes); the master never exceeds it
MAX_OCTAVE = 12  # 2^12 > MAX_CODE: at octave 12 every code is 0 or +-1


def channel_axis_shape(ndim: int, out_axis: int) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``out_axis`` of an ``ndim`` array."""
    shape = [1] * ndim
    shape[out_axis] = -1
    return shape


def master_codes(w: np.ndarray, steps: np.ndarray, out_axis: int) -> np.ndarray:
    """q = rint(w / D_c), clipped to +-MAX_CODE (int32, the weight's shape).

    Takes the float weight, its master steps (one > 0 per output channel) and the channel axis.
    Raises ValueError for steps that are not finite and positive or do not match the channels.
    """
    steps = np.asarray(steps, dtype=np.float32)
    if steps.shape != (w.shape[out_axis],) or not (np.isfinite(steps).all() and (steps > 0).all()):
        raise ValueError(f"master steps {steps.shape} do not fit {w.shape[out_axis]} channels or are not > 0")
    q = np.rint(w.astype(np.float64) / steps.astype(np.float64).reshape(channel_axis_shape(w.ndim, out_axis)))
    return np.clip(q, -MAX_CODE, MAX_CODE).astype(np.int32)


def octave_codes(q: np.ndarray, octaves: np.ndarray, out_axis: int) -> np.ndarray:
    """c_k = sign(q) * ((|q| + 2^(k-1)) >> k) per channel (k = 0 leaves q as it is).

    Takes master codes, one octave (0..MAX_OCTAVE) per output channel and the channel axis.
    Returns int32 codes of q's shape. Raises ValueError for an octave outside 0..MAX_OCTAVE.
    """
    k = np.asarray(octaves, dtype=np.int64)
    if k.size and (k.min() < 0 or k.max() > MAX_OCTAVE):
        raise ValueError(f"octaves must lie in 0..{MAX_OCTAVE}, got {int(k.min())}..{int(k.max())}")
    k = k.reshape(channel_axis_shape(q.ndim, out_axis))
    half = np.where(k > 0, np.left_shift(np.int64(1), np.maximum(k - 1, 0)), 0)
    mag = np.right_shift(np.abs(q.astype(np.int64)) + half, k)
    result: np.ndarray = (np.sign(q) * mag).astype(np.int32)
    return result


def octave_steps(steps: np.ndarray, octaves: np.ndarray) -> np.ndarray:
    """Per-channel steps of octave k: D_c * 2^k (exact in float32: a power-of-two scaling)."""
    return (np.asarray(steps, dtype=np.float32) * np.exp2(np.asarray(octaves, dtype=np.float32))).astype(np.float32)


def octave_values(q: np.ndarray, steps: np.ndarray, octaves: np.ndarray, out_axis: int) -> np.ndarray:
    """float32 weights of octave k per channel: c_k * (2^k * D_c)."""
    codes = octave_codes(q, octaves, out_axis)
    scale = octave_steps(steps, octaves).reshape(channel_axis_shape(q.ndim, out_axis))
    result: np.ndarray = codes.astype(np.float32) * scale
    return result


def prune_classes(rank: np.ndarray, grid: Sequence[float] | np.ndarray) -> np.ndarray:
    """class_i = min { j : rank_i <= grid_j }, len(grid) when no grid scale prunes weight i (uint8).

    Pruning at grid scale grid_j zeroes exactly the weights whose class is <= j. ``grid`` must be
    sorted ascending. Raises ValueError otherwise or for more than 254 scales.
    """
    g = np.asarray(grid, dtype=np.float64)
    if g.size > 254 or (g.size > 1 and (np.diff(g) <= 0).any()):
        raise ValueError("the prune grid must be strictly ascending and hold at most 254 scales")
    return np.searchsorted(g, rank.astype(np.float64), side="left").astype(np.uint8)


def prune_level(grid: Sequence[float] | np.ndarray, prune_scale: float) -> int:
    """The grid index j of a plan's prune scale (-1 for no pruning). Raises ValueError off the grid."""
    if prune_scale <= 0:
        return -1
    g = [float(v) for v in grid]
    for j, v in enumerate(g):
        if abs(v - prune_scale) <= 1e-9:
            return j
    raise ValueError(f"prune scale {prune_scale} is not on the analysis' prune grid {g}")


def choose_octaves(w: np.ndarray, q: np.ndarray, steps: np.ndarray, tau: np.ndarray, keep: np.ndarray,
                   out_axis: int, coverage: float = 0.99) -> np.ndarray:
    """The coarsest octave per channel whose error stays within tau for >= ``coverage`` of its weights.

    Error of octave k: |w - c_k 2^k D_c| over the kept (unpruned, non-zero) weights; octave 0 (the
    master) is the finest offered, so a channel no octave covers gets 0. Takes the float weight,
    its master codes and steps, the tolerance (same shape), the kept mask and the channel axis.
    Returns uint8 octaves, one per channel. Raises ValueError for a coverage outside (0, 1].
    """
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    channels = w.shape[out_axis]
    best = np.zeros(channels, dtype=np.uint8)
    live = keep & (w != 0)
    counts = np.moveaxis(live, out_axis, 0).reshape(channels, -1).sum(axis=1)
    for k in range(1, MAX_OCTAVE + 1):
        err = np.abs(w - octave_values(q, steps, np.full(channels, k), out_axis))
        ok = (err <= tau) & live
        share = np.moveaxis(ok, out_axis, 0).reshape(channels, -1).sum(axis=1) / np.maximum(counts, 1)
        fits = (share >= coverage) & (counts > 0)
        if not fits.any():
            break  # coarser octaves only grow the error
        best[fits] = k
    return best


class CodeLadder:
    """The codes of one weight at every octave it may be built at, from either source.

    From the master codes (the server, or a box that holds the fp32 base): ``c_k`` directly.
    From bit planes (a box that downloaded parts): ``t = sign(q) * (|q| >> b)``, the magnitude
    known down to bit b. Octave k >= 1 needs bits down to k - 1, since
    c_k = sign(q) * ((|q| >> (k - 1)) + 1) >> 1 (rounding half away from zero); octave 0 needs
    every bit. Both sources give the same integers for every octave both reach.
    """

    def __init__(self, out_axis: int, master: np.ndarray | None = None, truncated: np.ndarray | None = None,
                 bit: int = 0) -> None:
        """Give ``master`` codes, or the ``truncated`` codes known down to bit ``bit``.
        Raises ValueError when neither is given."""
        codes = master if master is not None else truncated
        if codes is None:
            raise ValueError("a code ladder needs the master codes or truncated codes")
        self.out_axis = out_axis
        self.master = master
        self.truncated = codes
        self.bit = 0 if master is not None else bit

    @property
    def finest(self) -> int:
        """The finest octave this ladder can build (0 = the master)."""
        return 0 if self.bit == 0 else self.bit + 1

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape."""
        return self.truncated.shape

    def codes(self, octaves: np.ndarray) -> np.ndarray:
        """int32 codes with channel c at octave ``octaves[c]``.

        Raises ValueError when an octave is finer than the ladder reaches (fetch more planes).
        """
        octaves = np.asarray(octaves, dtype=np.int64)
        if octaves.size and int(octaves.min()) < self.finest:
            raise ValueError(f"octave {int(octaves.min())} is finer than the {self.finest} these parts reach")
        if self.master is not None:
            return octave_codes(self.master, octaves, self.out_axis)
        k = octaves.reshape(channel_axis_shape(self.truncated.ndim, self.out_axis))
        mag = np.abs(self.truncated.astype(np.int64))
        shifted = np.right_shift(mag, np.maximum(k - 1 - self.bit, 0))
        coarse = np.where(k == 0, mag, np.right_shift(shifted + 1, 1))
        result: np.ndarray = (np.sign(self.truncated) * coarse).astype(np.int32)
        return result


def nested_steps_ok(steps: np.ndarray) -> bool:
    """True when master steps are a 1-D array of finite, positive float32 values."""
    steps = np.asarray(steps)
    return steps.ndim == 1 and steps.dtype == np.float32 and bool(np.isfinite(steps).all() and (steps > 0).all())
