"""The calibration curves' monotone fit: least squares, non-decreasing, one value per scale."""

import numpy as np
from sklearn.isotonic import IsotonicRegression

from toco_core.calibration import CurvePoint, _isotonic, monotone


def test_the_fit_matches_scikit_learns_isotonic_regression_with_tied_scales():
    rng = np.random.default_rng(7)
    for _ in range(300):
        n = int(rng.integers(1, 25))
        x = np.sort(rng.choice(rng.random(max(1, n // 2)), n))  # about half the scales repeat
        y = rng.random(n) * rng.choice([1e-3, 1.0, 50.0])
        want = IsotonicRegression(increasing=True).fit_transform(x, y)
        np.testing.assert_allclose(_isotonic(list(x), list(y)), want, rtol=1e-12, atol=1e-15)


def test_a_noisy_high_point_is_pooled_with_its_neighbours_not_carried_forward():
    pts = [CurvePoint(prune_scale=0.0, quant_scale=s, disagreement=d, kl=d / 10, accuracy=0.9, sparsity=0.0,
                      entropy_bits=4.0, coded_bits=4.0, fixed_bits=4.0)
           for s, d in ((0.1, 0.0), (0.2, 0.02), (0.3, 0.0), (0.4, 0.01), (0.5, 0.03))]
    fit = monotone(pts, "quant_scale")
    dis = [p.disagreement for p in fit]
    assert dis == sorted(dis)
    assert dis[1] == dis[2] == 0.01  # 0.02 and 0.0 pooled to their mean, not 0.02 kept for 0.3
    assert dis[3] == 0.01 and dis[4] == 0.03 and dis[0] == 0.0
