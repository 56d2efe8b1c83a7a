"""The 224x224 benchmark model builds with >= 1.5M weights and a cheap forward pass (no training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toco_core.demo.large import WIDTHS, build_large, upscale_u8, weight_count


@pytest.mark.parametrize("arch,expected", [("large", 1_573_888), ("large_wide", 2_648_576)])
def test_large_models_hold_at_least_1_5m_weights(arch, expected):
    model = build_large(arch)
    assert weight_count(model) == expected >= 1_500_000
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 224, 224)).shape == (2, 10)


def test_seeds_give_different_models():
    a, b = (next(build_large("large", seed).parameters()) for seed in (0, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, next(build_large("large", 0).parameters()))


def test_unknown_arch_is_refused():
    with pytest.raises(ValueError, match="large"):
        build_large("huge")
    assert set(WIDTHS) == {"large", "large_wide"}


def test_upscaling_keeps_uint8_levels_and_edges():
    x = np.random.default_rng(0).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    up = upscale_u8(x)
    assert up.shape == (3, 1, 224, 224) and up.dtype == np.uint8
    # corners sit outside the first/last pixel centre: clamped to the source corner
    assert np.array_equal(up[..., 0, 0], x[..., 0, 0]) and np.array_equal(up[..., -1, -1], x[..., -1, -1])
    flat = np.full((1, 28, 28), 77, dtype=np.uint8)
    assert (upscale_u8(flat) == 77).all()
