"""Bias parts: each calibrated point's corrected biases, so a box that builds from parts needs
neither the correction samples nor the base model's channel means.

Bias correction fits every point's biases on the analysis samples (toco_core.compression.
bias_correction). A box building from parts would need those samples to fit them again: 256
MNIST digits, 40 KB of LeNet-5's bundle, against 0.5 KB of deltas per point. The server fits
them once per point when it packs, and a box fetches the part of its prune level. Exact by
construction: the fit rounds each delta to float16, the form it travels in, and both builds turn
deltas into biases with one formula (bias_correction.apply_deltas).

Part ``bias/{j}`` holds the points pruned at grid level j, ``bias/none`` the unpruned ones: a
float16 matrix of deltas, a row per point (the whole part under LZMA; float16 noise barely
compresses: 0.47 KB a point on LeNet-5).
"""

from __future__ import annotations

import numpy as np

from toco_core.compression.nested import prune_level
from toco_core.plan_table import PlanTable

PointDeltas = dict[int, dict[str, np.ndarray]]  # point index -> {bias initializer: float16 deltas}


def bias_part_name(table: PlanTable, i: int) -> str:
    """The part holding point ``i``'s biases: bias/{prune level} or bias/none (unpruned)."""
    level = prune_level(table.prune_grid, table.points[i][0])
    return "bias/none" if level < 0 else f"bias/{level}"


def bias_parts_of(table: PlanTable, deltas: PointDeltas) -> dict[str, PointDeltas]:
    """``deltas`` grouped by the part each point belongs to (bias_part_name)."""
    out: dict[str, PointDeltas] = {}
    for i, d in sorted(deltas.items()):
        out.setdefault(bias_part_name(table, i), {})[i] = d
    return out


def bias_arrays(points: PointDeltas) -> dict[str, np.ndarray]:
    """The arrays of one bias part: ``names`` (the bias names, sorted, '\n'-joined, as uint8),
    ``points`` (int32 point indices) and ``deltas`` (float16 [points, channels of every bias in
    name order]: one array, so the part pays one header, not one per point and layer)."""
    names = sorted({n for d in points.values() for n in d})
    order = sorted(points)
    rows = [np.concatenate([np.asarray(points[i][n], np.float16).ravel() for n in names]) for i in order]
    return {"names": np.frombuffer("\n".join(names).encode(), np.uint8), "points": np.asarray(order, np.int32),
            "deltas": np.stack(rows) if rows else np.zeros((0, 0), np.float16)}


def deltas_from_arrays(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]]) -> PointDeltas:
    """Inverse of bias_arrays, each delta in the shape of its bias (``shapes``: the graph's).

    Raises ValueError when the arrays do not fit the biases or name an unknown one, KeyError when
    one is missing.
    """
    names = bytes(arrays["names"]).decode().split("\n") if arrays["names"].size else []
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"the part names biases the graph lacks: {unknown}")
    sizes = [int(np.prod(shapes[n])) for n in names]
    deltas, order = arrays["deltas"], arrays["points"]
    if deltas.dtype != np.float16 or deltas.shape != (len(order), sum(sizes)):
        raise ValueError(f"deltas of shape {deltas.shape}, {deltas.dtype}; the graph's biases need "
                         f"({len(order)}, {sum(sizes)}) float16")
    ends = np.cumsum(sizes)
    return {int(i): {n: row[e - k:e].reshape(shapes[n]) for n, k, e in zip(names, sizes, ends)}
            for i, row in zip(order, deltas)}
