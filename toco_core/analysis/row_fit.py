"""The planned curves' disagreement read from a smooth curve per prune row, not the isotonic envelope.

Every planned point's disagreement is a count of flips among the n calibration samples. Read point
by point (or through an isotonic envelope, which a single lucky reading pulls down and a single
unlucky one pushes up for its whole row) the size objective picks the point whose estimate was
luckiest. Here every point of one prune row (all planned curves' points at that prune scale with
a quant scale above 0) informs every other: per row, a binomial maximum-likelihood fit of

    d(q) = d0 + (1 - d0) sigmoid(a + b ln q),   b >= 0, 0 <= d0 < 1,

monotone in q by construction (d0: the row's floor, the pruning's own cost). A row of fewer than
four points keeps its points' own readings; KL keeps the isotonic envelope; a one-operator curve
(the prune sweep crosses rows) is made monotone in its own scale again. The joint curve keeps its
rows' readings: unlike the envelope they need not rise from one prune row to the next. Chosen on the
development variants of bench/plan_honesty.py --dev (docs/analysis.md, "Session 26").
"""

from __future__ import annotations

import numpy as np

from toco_core.calibration import PLANNED, CalibrationCurve, CurvePoint, monotone, monotone_curve
from toco_core.curve_operators import curve_operator

MIN_ROW = 4  # three parameters: a row needs more points than that to be fitted


def logistic_row_fit(log_q: np.ndarray, flips: np.ndarray, n: int) -> np.ndarray:
    """Binomial maximum-likelihood fit of d(q) = d0 + (1 - d0) sigmoid(a + b ln q) (module doc) to
    ``flips`` (counts out of ``n``) at ``log_q`` = ln q; returns the fitted d at each point.

    Parameters theta = (a, ln b, logit d0); L-BFGS from three starting slopes on the negative
    log-likelihood -sum(k ln d + (n - k) ln(1 - d)) and its exact gradient, the best likelihood kept
    (deterministic). With s = sigmoid(a + b ln q), the gradient's parts are
    dd/da = (1 - d0) s (1 - s), dd/d(ln b) = dd/da * b ln q, dd/d(logit d0) = d0 (1 - d0) (1 - s).
    (Nelder-Mead found the same optima within 7e-7 of d, 5.7x slower: 0.69 s of LeNet-5's analysis.)
    """
    from scipy.optimize import minimize  # analysis side only
    from scipy.special import expit

    k = flips.astype(float)

    def parts(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float, np.ndarray]:
        d0 = float(expit(theta[2]))
        s = expit(theta[0] + np.exp(theta[1]) * log_q)
        raw = d0 + (1 - d0) * s
        return np.clip(raw, 1e-9, 1 - 1e-9), raw, d0, s

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        d, raw, d0, s = parts(theta)
        # d(nll)/dd, zero where the clip holds d (the clipped value does not move with theta)
        g = np.where((raw > 1e-9) & (raw < 1 - 1e-9), (n - k) / (1 - d) - k / d, 0.0)
        dd_da = (1 - d0) * s * (1 - s)
        grad = np.array([(g * dd_da).sum(), (g * dd_da * np.exp(theta[1]) * log_q).sum(),
                         (g * d0 * (1 - d0) * (1 - s)).sum()])
        return float(-(k * np.log(d) + (n - k) * np.log1p(-d)).sum()), grad

    rate = np.clip(k / n, 1e-4, 1 - 1e-4)
    starts = [np.array([np.log(rate[-1] / (1 - rate[-1])) - b * log_q[-1], np.log(b), np.log(rate[0] / 2)])
              for b in (1.0, 3.0, 8.0)]
    best = min((minimize(nll, x0, jac=True, method="L-BFGS-B", options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
                for x0 in starts), key=lambda r: r.fun)
    return parts(best.x)[0]


def row_readings(points: dict[str, list[CurvePoint]], samples: int) -> dict[tuple[float, float], float]:
    """(prune scale, quant scale) -> the disagreement read from its prune row's fit (rows of at least
    MIN_ROW points with a quant scale above 0), over the points of every planned curve in ``points``
    (measured, not fitted: a point on two curves is one measurement)."""
    raw: dict[tuple[float, float], float] = {}
    for op, pts in points.items():
        if op in PLANNED:
            raw.update({(p.prune_scale, p.quant_scale): p.disagreement for p in pts if p.quant_scale > 0})
    out = {}
    for ps in sorted({k[0] for k in raw}):
        row = sorted(k for k in raw if k[0] == ps)
        if len(row) < MIN_ROW:
            continue
        flips = np.rint(np.array([raw[k] for k in row]) * samples)
        fit = logistic_row_fit(np.log([k[1] for k in row]), flips, samples)
        out.update({k: float(d) for k, d in zip(row, fit, strict=True)})
    return out


def row_fitted_curves(points: dict[str, list[CurvePoint]], samples: int) -> dict[str, CalibrationCurve]:
    """The curves of the measured ``points`` (operator -> points as measured): each made monotone
    (monotone_curve: order, KL), then every planned point in a fitted row given its row reading
    (row_readings) and every other planned point its own reading. Curves that are not planned
    (``master``) keep the envelope."""
    readings = row_readings(points, samples)
    curves = {}
    for op, pts in points.items():
        curve = monotone_curve(op, pts, samples)
        if op in PLANNED:
            own = {(p.prune_scale, p.quant_scale): p.disagreement for p in pts}
            read = [p.model_copy(update={"disagreement": readings.get((p.prune_scale, p.quant_scale),
                                                                      own[(p.prune_scale, p.quant_scale)])})
                    for p in curve.points]
            spec = curve_operator(op).spec
            # a one-operator curve stays monotone in its own scale (the prune sweep crosses rows); the
            # joint one keeps its rows' readings, which need not rise from one row to the next
            curve = curve.model_copy(update={"points": read if spec.joint else monotone(read, spec.scale)})
        curves[op] = curve
    return curves
