"""Band coding: prune masks and the codes of one prune class, exact, truncated at any bit, refused when damaged."""

from __future__ import annotations

import numpy as np
import pytest

from toco_core.compression.band_coding import decode_band, decode_mask, encode_band, encode_mask

RNG = np.random.default_rng(0)


def _codes() -> list[np.ndarray]:
    sizes_scales = ((100, 30.0), (0, 1.0), (1000, 3.0), (7, 4000.0))
    return [np.clip(np.rint(RNG.laplace(size=n) * s), -4095, 4095).astype(np.int32) for n, s in sizes_scales]


def test_a_band_decodes_exactly_and_stops_at_any_bit_each_tensor_asks_for():
    codes, top_bits = _codes(), [2, 0, 1, 3]
    top, fine = encode_band(codes, top_bits)
    sizes = [c.size for c in codes]
    assert sorted(fine) == [0, 1, 2]
    exact = decode_band(top, fine, sizes, top_bits, [0, 0, 0, 0])
    assert all(np.array_equal(a, b) for a, b in zip(exact, codes, strict=True))
    for stop, have in (([2, 0, 1, 3], {}), ([1, 0, 1, 2], {2: fine[2], 1: fine[1]}), ([2, 0, 0, 3], {0: fine[0]})):
        got = decode_band(top, have, sizes, top_bits, stop)
        assert all(np.array_equal(g, np.sign(c) * (np.abs(c) >> s))
                   for g, c, s in zip(got, codes, stop, strict=True)), stop
    with pytest.raises(ValueError, match="fine bit 1"):
        decode_band(top, {2: fine[2]}, sizes, top_bits, [1, 0, 1, 2])
    with pytest.raises(ValueError, match="another bit"):
        decode_band(top, {2: fine[2], 1: fine[0]}, sizes, top_bits, [1, 0, 1, 2])
    assert all(len(f) > 0 for f in encode_band([np.zeros(5, np.int32)], [2])[1].values())


def test_the_top_part_costs_about_the_entropy_of_the_bit_lengths_plus_the_raw_bits():
    q = np.rint(RNG.laplace(size=20_000) * 12).astype(np.int32)
    top, fine = encode_band([q], [0])
    mag = np.abs(q)
    lengths = np.floor(np.log2(np.maximum(mag, 1))).astype(int) + 1
    lengths[mag == 0] = 0
    p = np.bincount(lengths) / lengths.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum() * q.size
    raw = (mag > 0).sum() + np.maximum(lengths - 1, 0).sum()
    assert not fine and len(top) * 8 < 1.03 * (entropy + raw) + 400


def test_masks_round_trip_and_damage_is_refused():
    masks = [RNG.random(50) < 0.2, np.zeros(0, bool), RNG.random(3000) < 0.9]
    data = encode_mask(masks)
    back = decode_mask(data, [m.size for m in masks])
    assert all(np.array_equal(a, b) for a, b in zip(masks, back, strict=True))
    with pytest.raises(ValueError, match="tensors"):
        decode_mask(data, [50, 3000])
    with pytest.raises(ValueError):
        decode_band(b"\x02\x00\x00\x00\x05", {}, [3, 4], [0, 0])
    with pytest.raises(ValueError, match="does not fit"):
        encode_band([np.array([5000], np.int32)], [0])
