"""Bias parts: each calibrated point's corrected biases, so a box that builds from parts needs
neither the correction samples nor the base model's channel means.

Bias correction fits every point's biases on the analysis samples (toco_core.compression.
bias_correction). A box building from parts would need those samples to fit them again: 256
MNIST digits, 40 KB of LeNet-5's bundle, against 0.9 KB of biases per point. The server fits
them once per point when it packs, and a box fetches the part of its prune level. Exact by
construction: a build takes the shipped biases as they are, and the server's own build fits the
same values (the fit is deterministic).

Part ``bias/{j}`` holds the points pruned at grid level j, ``bias/none`` the unpruned ones.
Per point and biased layer: the float32 bias XOR the base bias (which the box has in the head's
graph), its four bytes split into planes, the whole under the part's LZMA: a corrected bias
stays close to the original, so its sign, exponent and high mantissa bytes XOR to zero.
"""

from __future__ import annotations

import numpy as np

from toco_core.compression.nested import prune_level
from toco_core.plan_table import PlanTable

PointBiases = dict[int, dict[str, np.ndarray]]  # point index -> {bias initializer: float32 values}


def bias_part_name(table: PlanTable, i: int) -> str:
    """The part holding point ``i``'s biases: bias/{prune level} or bias/none (unpruned)."""
    level = prune_level(table.prune_grid, table.points[i][0])
    return "bias/none" if level < 0 else f"bias/{level}"


def bias_parts_of(table: PlanTable, biases: PointBiases) -> dict[str, PointBiases]:
    """``biases`` grouped by the part each point belongs to (bias_part_name)."""
    out: dict[str, PointBiases] = {}
    for i, b in sorted(biases.items()):
        out.setdefault(bias_part_name(table, i), {})[i] = b
    return out


def _xor_planes(values: np.ndarray, base: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(values, "<f4").view("<u4") ^ np.ascontiguousarray(base, "<f4").view("<u4")
    return np.ascontiguousarray(x.view(np.uint8).reshape(-1, 4).T)


def bias_arrays(points: PointBiases, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of one bias part: ``p{i}/{k}`` = the byte planes (uint8 [4, channels]) of
    point i's k-th bias (in sorted name order) XOR the base bias, plus ``names`` (the bias names,
    as one '\\n'-joined uint8 string). Raises KeyError for a bias the base lacks."""
    names = sorted({n for b in points.values() for n in b})
    arrays = {"names": np.frombuffer("\n".join(names).encode(), np.uint8)}
    for i, b in points.items():
        for k, n in enumerate(names):
            arrays[f"p{i}/{k}"] = _xor_planes(b[n], base[n])
    return arrays


def biases_from_arrays(arrays: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> PointBiases:
    """Inverse of bias_arrays. Raises ValueError when the arrays do not fit the base biases."""
    names = bytes(arrays["names"]).decode().split("\n") if arrays["names"].size else []
    out: PointBiases = {}
    for key, planes in arrays.items():
        if key == "names":
            continue
        point, _, k = key[1:].partition("/")
        name = names[int(k)]
        ref = np.ascontiguousarray(base[name], "<f4")
        if planes.shape != (4, ref.size):
            raise ValueError(f"bias {name!r} of point {point} has {planes.shape[-1]} values, the graph {ref.size}")
        x = np.ascontiguousarray(planes.T).view("<u4").ravel() ^ ref.view("<u4").ravel()
        out.setdefault(int(point), {})[name] = x.view("<f4").reshape(ref.shape).astype(np.float32)
    return out
