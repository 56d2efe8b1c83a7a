"""The planned curves' disagreement read from each prune row's logistic fit (toco_core.analysis.row_fit),
on rows drawn from a known curve: the fit is monotone, nearer the truth than the points' own readings,
and rows too short to fit keep their readings."""

import numpy as np

from toco_core.analysis.row_fit import MIN_ROW, row_fitted_curves, row_readings
from toco_core.calibration import CurvePoint

N = 500  # calibration samples
QS = np.geomspace(0.1, 0.8, 10)


def _truth(q: np.ndarray, floor: float) -> np.ndarray:
    return floor + (1 - floor) / (1 + np.exp(-(-9.0 + 3.0 * np.log(q / 0.1))))


def _point(ps: float, qs: float, d: float) -> CurvePoint:
    return CurvePoint(prune_scale=ps, quant_scale=qs, disagreement=d, kl=d / 10, sparsity=ps, entropy_bits=3.0,
                      fixed_bits=4.0)


def test_each_row_is_read_from_a_monotone_fit_nearer_the_truth_than_its_readings():
    rng = np.random.default_rng(7)
    errors_fit, errors_raw = [], []
    for _ in range(20):
        rows = {0.5: _truth(QS, 0.002), 0.7: _truth(QS * 1.3, 0.004)}
        grid = [_point(ps, float(q), float(rng.binomial(N, d)) / N) for ps, ds in rows.items()
                for q, d in zip(QS, ds, strict=True)]
        # a two-point row of the prune sweep: too short to fit, its readings stay
        sweep = [_point(0.3, 0.05, 0.002), _point(0.5, 0.05, 0.004), _point(0.7, 0.05, 0.006)]
        readings = row_readings({"prune+quantize": grid, "prune": sweep}, N)
        assert (0.3, 0.05) not in readings and len([k for k in readings if k[0] == 0.5]) == len(QS) + 1 >= MIN_ROW
        for ps, ds in rows.items():
            fitted = np.array([readings[(ps, float(q))] for q in QS])
            assert np.all(np.diff(fitted) >= -1e-12), "monotone in the quant scale"
            raw = np.array([p.disagreement for p in grid if p.prune_scale == ps])
            errors_fit.append(float(((fitted - ds) ** 2).sum()))
            errors_raw.append(float(((raw - ds) ** 2).sum()))
        curves = row_fitted_curves({"prune+quantize": grid, "prune": sweep}, N)
        read = {(p.prune_scale, p.quant_scale): p.disagreement for p in curves["prune+quantize"].points}
        assert read == {k: v for k, v in readings.items() if k in read}
        prune = [p.disagreement for p in curves["prune"].points]
        assert prune == sorted(prune)  # the sweep crosses rows: made monotone in the prune scale again
    assert np.median(errors_fit) < 0.75 * np.median(errors_raw), (np.median(errors_fit), np.median(errors_raw))
