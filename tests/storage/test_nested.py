"""The nested quantiser and its plane coding: octaves from master codes, prefixes that decode exactly."""

import numpy as np
import pytest

from toco_core.compression import plane_coding as planes
from toco_core.compression.nested import (
    MAX_OCTAVE,
    CodeLadder,
    choose_octaves,
    master_codes,
    octave_codes,
    octave_values,
    prune_classes,
    prune_level,
)


def _laplace_codes(rng, shape, scale=40.0):
    return np.clip(np.rint(rng.laplace(0, scale, shape)), -4095, 4095).astype(np.int32)


def test_octave_codes_round_half_away_from_zero():
    q = np.arange(-40, 41, dtype=np.int32)[None, :]
    for k in range(0, 6):
        expected = np.sign(q) * np.floor(np.abs(q) / 2.0**k + 0.5)
        assert np.array_equal(octave_codes(q, np.array([k]), 0), expected.astype(np.int32))
    assert octave_codes(np.array([[1, -1, 2, -2, 3]]), np.array([1]), 0).tolist() == [[1, -1, 1, -1, 2]]


def test_octave_values_stay_on_a_codes_times_step_lattice():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.1, (4, 30)).astype(np.float32)
    steps = np.array([0.01, 0.02, 0.005, 0.04], np.float32)
    q = master_codes(w, steps, 0)
    assert np.abs(w - q * steps[:, None]).max() <= steps.max() / 2 + 1e-7
    octs = np.array([0, 1, 3, 5])
    v = octave_values(q, steps, octs, 0)
    # codes times a power-of-two multiple of the master step, one float32 product: what the storage
    # form, QDQ int8 and MatMulNBits decode
    step_k = (steps * np.exp2(octs).astype(np.float32))[:, None]
    assert np.array_equal(v, octave_codes(q, octs, 0).astype(np.float32) * step_k)
    assert np.array_equal(octave_codes(q, octs, 0)[0], q[0])
    with pytest.raises(ValueError, match="octaves must lie"):
        octave_codes(q, np.array([0, 1, 2, MAX_OCTAVE + 1]), 0)


@pytest.mark.parametrize("axis", [0, 1])
def test_a_ladder_from_bit_planes_gives_the_master_ladders_codes(axis):
    rng = np.random.default_rng(1)
    shape = (6, 50) if axis == 0 else (50, 6)
    q = _laplace_codes(rng, shape)
    master = CodeLadder(axis, master=q)
    for bit in range(0, 8):
        truncated = (np.sign(q) * (np.abs(q) >> bit)).astype(np.int32)
        ladder = CodeLadder(axis, truncated=truncated, bit=bit)
        for k in range(ladder.finest, MAX_OCTAVE + 1):
            octs = np.full(6, k)
            octs[::2] = max(k, ladder.finest)
            assert np.array_equal(ladder.codes(octs), master.codes(octs)), (bit, k)
        if ladder.finest > 0:
            with pytest.raises(ValueError, match="finer than"):
                ladder.codes(np.full(6, ladder.finest - 1))


def test_prune_classes_follow_the_grid():
    grid = [0.3, 0.5, 0.7]
    rank = np.array([0.0, 0.3, 0.31, 0.5, 0.69, 0.7, 0.71, 1.0], np.float32)
    cls = prune_classes(rank, grid)
    for j, p in enumerate(grid):
        assert np.array_equal(cls <= j, rank.astype(np.float64) <= p)
    assert cls[-1] == len(grid)
    assert prune_level(grid, 0.5) == 1 and prune_level(grid, 0) == -1
    with pytest.raises(ValueError, match="not on the analysis' prune grid"):
        prune_level(grid, 0.6)


def test_choose_octaves_is_the_coarsest_within_tolerance():
    rng = np.random.default_rng(2)
    w = rng.normal(0, 1, (3, 400)).astype(np.float32)
    steps = np.full(3, 0.01, np.float32)
    q = master_codes(w, steps, 0)
    tau = np.full_like(w, 0.1)
    tau[1] = 0.001  # finer than the master can meet: stays at octave 0
    k = choose_octaves(w, q, steps, tau, np.ones_like(w, bool), 0, coverage=0.99)
    assert k[1] == 0 and k[0] == k[2] and k[0] >= 3
    err = np.abs(w - octave_values(q, steps, k, 0))
    assert ((err <= tau)[[0, 2]].mean(axis=1) >= 0.99).all()
    coarser = np.abs(w - octave_values(q, steps, k + 1, 0))
    assert ((coarser <= tau)[0].mean()) < 0.99


def test_bit_planes_round_trip_and_nest():
    rng = np.random.default_rng(3)
    masters = [_laplace_codes(rng, (8, 70)), _laplace_codes(rng, (3, 5, 5), 5.0), np.zeros((2, 4), np.int32)]
    top_bit = 9
    current = [(np.sign(q) * (np.abs(q) >> top_bit)).astype(np.int32) for q in masters]
    for b in range(top_bit - 1, -1, -1):
        current = planes.decode_bit_plane(planes.encode_bit_plane(masters, b), current)
        for got, q in zip(current, masters, strict=True):
            assert np.array_equal(got, np.sign(q) * (np.abs(q) >> b))
    assert all(np.array_equal(c, q) for c, q in zip(current, masters, strict=True))


def test_the_planes_cost_about_the_entropy_of_the_codes():
    rng = np.random.default_rng(4)
    q = _laplace_codes(rng, (32, 2000), 6.0)
    _, counts = np.unique(q, return_counts=True)
    entropy_bytes = -(counts * np.log2(counts / counts.sum())).sum() / 8
    top = planes.encode_top([(np.sign(q) * (np.abs(q) >> 8)).astype(np.int32)])
    coded = len(top) + sum(len(planes.encode_bit_plane([q], b)) for b in range(7, -1, -1))
    assert coded < 1.10 * entropy_bytes, (coded, entropy_bytes)


@pytest.mark.parametrize("shape", ["balanced", "chain"])
def test_prune_planes_resolve_any_level_from_its_path(shape):
    rng = np.random.default_rng(5)
    grid = [0.3, 0.4, 0.5, 0.6, 0.7, 0.9]
    ranks = [rng.random((5, 40)).astype(np.float32), rng.random(30).astype(np.float32)]
    classes = [prune_classes(r, grid) for r in ranks]
    coarse = [_laplace_codes(rng, r.shape, 3.0) for r in ranks]
    tree = planes.prune_tree(len(grid), shape)
    assert sorted(t for _, _, t in tree) == list(range(len(grid)))  # every level split exactly once
    parts = {node: planes.encode_prune_plane(classes, coarse, node) for node in tree}
    for level in range(len(grid)):
        path = planes.prune_path(len(grid), level, shape)
        assert path[-1][2] == level and len(path) <= (3 if shape == "balanced" else len(grid))
        known = planes.all_unknown([r.shape for r in ranks], len(grid))
        for node in path:
            known = planes.decode_prune_plane(parts[node], known, coarse, node)
        for (lo, hi), c in zip(known, classes, strict=True):
            assert ((lo <= c) & (c <= hi)).all()  # every interval holds the true class
            assert np.array_equal(hi <= level, c <= level)  # and is on the right side of the level


def test_a_plane_for_other_tensors_is_refused():
    q = [np.arange(12, dtype=np.int32).reshape(3, 4)]
    part = planes.encode_bit_plane(q, 0)
    with pytest.raises(ValueError, match="does not describe 2 tensors"):
        planes.decode_bit_plane(part, q + q)
    with pytest.raises(ValueError, match="header is truncated"):
        planes.decode_bit_plane(part[:10], q)
