"""Bias parts: each calibrated point's corrected biases, so a box that builds from parts needs
neither the correction samples nor the base model's channel means.

Bias correction fits every point's biases on the analysis samples (toco_core.compression.
bias_correction). A box building from parts would need those samples to fit them again: 256
MNIST digits, 40 KB of LeNet-5's bundle, against 0.5 KB of deltas per point. The server fits
them once per point when it packs, and a box fetches the part of its prune level. Exact by
construction: the fit rounds each layer's deltas to a power-of-two grid, the form they travel in
(int8 codes and one exponent per layer; bias_correction.on_delta_grid), and both builds turn
deltas into biases with one formula (bias_correction.apply_deltas).

Part ``bias/{j}`` holds the points pruned at grid level j, ``bias/none`` the unpruned ones: their
int8 codes, channel-major, and the exponents, under LZMA. Bundles packed before the grid carry a
float16 matrix of deltas instead (0.47 KB a point on LeNet-5), and still open.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save

from toco_core.compression.bias_correction import DELTA_CODE, delta_exponent
from toco_core.compression.nested import prune_level
from toco_core.errors import AnalysisError
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


def _grid_codes(names: list[str], rows: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray] | None:
    """(exponents int8 [points, biases], codes int8 [points, channels]) when every delta lies on
    its layer's grid (on_delta_grid), else None (deltas fitted before the grid: sent as float16)."""
    exps, codes = np.zeros((len(rows), len(names)), np.int8), []
    for p, row in enumerate(rows):
        parts = []
        for k, n in enumerate(names):
            d = np.asarray(row[n], np.float16).ravel().astype(np.float64)
            e = delta_exponent(d)
            q = d / 2.0**e
            if not (np.array_equal(q, np.rint(q)) and np.abs(q).max(initial=0) <= DELTA_CODE):
                return None
            exps[p, k] = e
            parts.append(q.astype(np.int8))
        codes.append(np.concatenate(parts) if parts else np.zeros(0, np.int8))
    return exps, np.stack(codes) if codes else np.zeros((0, 0), np.int8)


def bias_arrays(points: PointDeltas) -> dict[str, np.ndarray]:
    """The arrays of one bias part: ``names`` (the bias names, sorted, '\n'-joined, as uint8),
    ``points`` (int32 point indices) and either ``exponents`` (int8 [points, biases]) with ``codes``
    (int8 [channels of every bias in name order, points]: delta = code * 2^exponent, a channel's
    codes side by side, as its shift varies little from point to point) or, for deltas not on the
    grid, ``deltas`` (float16 [points, channels]). One array each, so the part pays one header."""
    names = sorted({n for d in points.values() for n in d})
    order = sorted(points)
    head: dict[str, np.ndarray] = {"names": np.frombuffer("\n".join(names).encode(), np.uint8),
                                   "points": np.asarray(order, np.int32)}
    grid = _grid_codes(names, [points[i] for i in order])
    if grid is not None:
        return {**head, "exponents": grid[0], "codes": np.ascontiguousarray(grid[1].T)}
    rows = [np.concatenate([np.asarray(points[i][n], np.float16).ravel() for n in names]) for i in order]
    return {**head, "deltas": np.stack(rows) if rows else np.zeros((0, 0), np.float16)}


def _deltas_of(arrays: dict[str, np.ndarray], sizes: list[int]) -> np.ndarray:
    """float16 [points, channels] from either form of bias_arrays. Raises ValueError when the
    arrays do not fit ``sizes``, KeyError when one is missing."""
    n_points = len(arrays["points"])
    if "deltas" in arrays:
        deltas = arrays["deltas"]
        if deltas.dtype != np.float16 or deltas.shape != (n_points, sum(sizes)):
            raise ValueError(f"deltas of shape {deltas.shape}, {deltas.dtype}; the graph's biases need "
                             f"({n_points}, {sum(sizes)}) float16")
        return deltas
    exps, codes = arrays["exponents"], arrays["codes"]
    if exps.shape != (n_points, len(sizes)) or codes.shape != (sum(sizes), n_points) \
            or exps.dtype != np.int8 or codes.dtype != np.int8:
        raise ValueError(f"bias codes of shape {codes.shape} and exponents of shape {exps.shape}; the graph's "
                         f"biases need ({sum(sizes)}, {n_points}) and ({n_points}, {len(sizes)}) int8")
    steps = np.repeat(2.0 ** exps.astype(np.float64), sizes, axis=1)
    result: np.ndarray = (codes.T.astype(np.float64) * steps).astype(np.float16)
    return result


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
    deltas, order = _deltas_of(arrays, sizes), arrays["points"]
    ends = np.cumsum(sizes)
    return {int(i): {n: row[e - k:e].reshape(shapes[n]) for n, k, e in zip(names, sizes, ends, strict=True)}
            for i, row in zip(order, deltas, strict=True)}


def save_point_deltas(deltas: PointDeltas, path: Path) -> None:
    """Write every point's deltas (the analysis' own copy, OUT/bias_deltas.safetensors): the arrays
    of bias_arrays, the biases' shapes in the metadata. Takes PointDeltas and a path; returns None."""
    shapes = {n: list(np.shape(d)) for point in deltas.values() for n, d in point.items()}
    Path(path).write_bytes(save(bias_arrays(deltas), metadata={"shapes": json.dumps(shapes, sort_keys=True)}))


def load_point_deltas(path: Path) -> PointDeltas:
    """Read what save_point_deltas wrote. Raises AnalysisError when the file is unreadable."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            shapes = {n: tuple(s) for n, s in json.loads(f.metadata()["shapes"]).items()}
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  # a safe_open handle, not a dict
        return deltas_from_arrays(arrays, shapes)
    except Exception as exc:  # safetensors, json, key and shape errors all mean the same to a user
        raise AnalysisError(f"the bias deltas {path} are unreadable: {type(exc).__name__}: {exc}",
                            "re-run the analysis") from None
