"""Bias parts: the deltas of each point travel as int8 grid codes and come back bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from toco_core.bias_parts import bias_arrays, deltas_from_arrays
from toco_core.compression.bias_correction import on_delta_grid
from toco_core.parts_bundle import decode_arrays, encode_arrays

SHAPES = {"conv.b": (6,), "fc.b": (120,), "out.b": (10,)}


def _points(rng, fit) -> dict[int, dict[str, np.ndarray]]:
    return {i: {n: fit(rng.normal(size=s) * rng.choice([1e-4, 0.05, 3.0])) for n, s in SHAPES.items()}
            for i in (3, 4, 9)}


def test_grid_deltas_travel_as_int8_codes_and_decode_bit_identical():
    pts = _points(np.random.default_rng(0), on_delta_grid)
    arrays = bias_arrays(pts)
    assert "deltas" not in arrays and arrays["codes"].dtype == np.int8
    back = deltas_from_arrays(decode_arrays(encode_arrays(arrays), "bias/2"), SHAPES)
    assert back.keys() == pts.keys()
    for i in pts:
        for n in SHAPES:
            assert back[i][n].dtype == np.float16
            assert back[i][n].tobytes() == pts[i][n].tobytes()


def test_grid_codes_take_under_half_the_bytes_of_float16_deltas():
    rng = np.random.default_rng(1)
    grid = _points(rng, on_delta_grid)
    plain = {i: {n: d.astype(np.float16) + np.float16(1e-3) for n, d in p.items()} for i, p in grid.items()}
    assert "deltas" in bias_arrays(plain)  # off the grid: sent as float16, as bundles did before
    assert len(encode_arrays(bias_arrays(grid))) < len(encode_arrays(bias_arrays(plain))) / 2 + 300


def test_float16_deltas_of_older_bundles_still_decode_and_misfits_are_refused():
    pts = _points(np.random.default_rng(2), lambda d: d.astype(np.float16))
    arrays = bias_arrays(pts)
    assert "deltas" in arrays
    back = deltas_from_arrays(arrays, SHAPES)
    assert all(back[i][n].tobytes() == pts[i][n].tobytes() for i in pts for n in SHAPES)
    grid = bias_arrays(_points(np.random.default_rng(3), on_delta_grid))
    with pytest.raises(ValueError, match="int8"):
        deltas_from_arrays(grid, {**SHAPES, "fc.b": (119,)})
    with pytest.raises(ValueError, match="lacks"):
        deltas_from_arrays(grid, {"conv.b": (6,)})
