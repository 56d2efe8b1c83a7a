"""The row coder alone: exact round trips on awkward code arrays, size near the entropy."""

from __future__ import annotations

import numpy as np
import pytest

from toco_core.compression import entropy


def _round_trip(rows: np.ndarray) -> bytes:
    side = entropy.side_info(rows)
    data = entropy.encode_rows(rows, side)
    back = entropy.decode_rows(data, side, rows.shape[1])
    np.testing.assert_array_equal(back, rows)
    return data


def test_awkward_rows_round_trip():
    rng = np.random.default_rng(0)
    rows = rng.integers(-7, 8, size=(9, 50)).astype(np.int32)
    rows[0] = 0  # all zero: no stream at all
    rows[1] = rng.choice([-3, 3], size=50)  # no zeros, min == max: signs only
    rows[2] = 0
    rows[2, 7] = entropy.MAX_CODE  # a single extreme code
    rows[3] = np.where(rng.random(50) < 0.9, 0, rows[3])
    _round_trip(rows)


def test_all_zero_tensor_is_empty():
    assert len(_round_trip(np.zeros((4, 10), np.int32))) <= 8


def test_single_row_and_single_column():
    _round_trip(np.array([[0, 1, -2, 0, 5]], np.int32))
    _round_trip(np.array([[0], [3], [-1], [0]], np.int32))


def test_size_close_to_histogram_entropy():
    rng = np.random.default_rng(1)
    rows = np.rint(rng.laplace(scale=1.5, size=(64, 500))).clip(-7, 7).astype(np.int32)
    _, counts = np.unique(rows, return_counts=True)
    h_bytes = -(counts * np.log2(counts / counts.sum())).sum() / 8
    size = len(_round_trip(rows))
    assert size <= 1.03 * h_bytes, (size, h_bytes)
    assert abs(entropy.estimate_bits(rows) / 8 - size) <= 0.05 * size


def test_too_wide_codes_refused():
    rows = np.array([[entropy.MAX_CODE + 1, 0]], np.int32)
    with pytest.raises(ValueError, match="limit"):
        entropy.encode_rows(rows, entropy.side_info(rows))


def test_inconsistent_side_information_refused():
    rows = np.array([[1, 0, 2]], np.int32)
    side = entropy.side_info(rows)
    bad = entropy.SideInfo(side.nnz, side.max_abs + 1, side.max_abs)  # min > max
    with pytest.raises(ValueError, match="inconsistent"):
        entropy.decode_rows(entropy.encode_rows(rows, side), bad, 3)
