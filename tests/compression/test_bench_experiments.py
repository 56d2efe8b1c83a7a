"""The pieces of bench/plan_honesty.py and bench/compensated_rounding.py that decide their numbers:
the Clopper-Pearson bound, and the layer Hessians and GPTQ-style rounding (toco_core.compression.
compensated_rounding, which the experiment reads) on the demo LeNet-5 and real digits."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from bench.plan_honesty import clopper_pearson_upper
from toco_core.compression.compensated_rounding import compensated_codes, inverse_factor, layer_hessians
from toco_core.compression.storage import quantize_to_codes
from toco_core.onnx_model import compressible_weights


def test_clopper_pearson_zero_events_is_closed_form():
    # with no event the bound solves (1 - q)^n = alpha
    assert clopper_pearson_upper(0, 500) == pytest.approx(1 - 0.05 ** (1 / 500), rel=1e-6)


@pytest.mark.parametrize("k", [1, 3, 5, 20])
def test_clopper_pearson_bound_leaves_alpha_below(k):
    n = 500
    q = clopper_pearson_upper(k, n)
    cdf = sum(math.comb(n, i) * q**i * (1 - q) ** (n - i) for i in range(k + 1))
    assert cdf == pytest.approx(0.05, abs=1e-6)
    assert k / n < q < clopper_pearson_upper(k + 1, n)


@pytest.fixture(scope="module")
def hessians(lenet5, digits):
    infos = compressible_weights(lenet5)
    return [i.name for i in infos], layer_hessians(lenet5, infos, digits.x_pool[:200])


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def test_layer_hessians_cover_every_layer_with_its_columns(lenet5, hessians):
    names, h = hessians
    w = _weights(lenet5)
    assert set(h) == set(names)  # the demo LeNet-5 is Conv and Gemm only
    for name in names:
        columns = int(np.prod(w[name].shape[1:]))  # Conv: in x kh x kw, Gemm (transB): inputs
        assert h[name].shape == (columns, columns)
        assert np.allclose(h[name], h[name].T)
        assert np.linalg.eigvalsh(h[name]).min() > -1e-6 * np.abs(h[name]).max()


def _steps(w: np.ndarray, bits: int) -> np.ndarray:
    return (np.abs(w.reshape(len(w), -1)).max(axis=1) / (2 ** (bits - 1) - 1)).astype(np.float32)


def test_identity_hessian_is_plain_rounding(lenet5):
    w = _weights(lenet5)["3.weight"]
    plain = quantize_to_codes(w, _steps(w, 3), 0, "3.weight")
    h = np.eye(int(np.prod(w.shape[1:])))
    comp = compensated_codes(w, plain, np.ones(w.shape, bool), inverse_factor(h))
    assert np.array_equal(comp.codes, plain.codes)


@pytest.mark.parametrize("name", ["3.weight", "7.weight"])
@pytest.mark.parametrize("pruned", [False, True])
def test_compensation_lowers_the_layer_output_error(lenet5, hessians, name, pruned):
    w = _weights(lenet5)[name]
    h = hessians[1][name]
    plain = quantize_to_codes(w, _steps(w, 3), 0, name)
    keep = np.abs(w) > np.quantile(np.abs(w), 0.5) if pruned else np.ones(w.shape, bool)
    plain_codes = np.where(keep, plain.codes, 0)
    comp = compensated_codes(w, plain, keep, inverse_factor(h))
    assert not comp.codes[~keep].any()  # the prune mask holds

    def output_error(codes: np.ndarray) -> float:
        d = (w - codes * plain.steps.reshape(-1, *[1] * (w.ndim - 1))).reshape(len(w), -1)
        return float(np.einsum("ij,jk,ik->", d, h, d))  # mean squared error of the layer's output

    # measured 0.05-0.21 of plain at 3 bits on these layers; half leaves room for another training run
    assert output_error(comp.codes) < 0.5 * output_error(plain_codes)


def test_logistic_row_fit_is_monotone_and_beats_the_raw_reading_on_binomial_counts():
    # counts drawn from a known row curve: the fit is non-decreasing in the quant scale and lands
    # closer to the truth than the raw rates (the noise a smoother exists to remove), over 20 draws
    from scipy.special import expit

    from bench.plan_honesty import logistic_row_fit

    log_q = np.log(np.geomspace(0.1, 0.8, 10))
    truth = 0.004 + 0.996 * expit(-3.0 + 4.0 * log_q)
    n, rng = 500, np.random.default_rng(7)
    fit_err, raw_err = [], []
    for _ in range(20):
        k = rng.binomial(n, truth)
        fit = logistic_row_fit(log_q, k, n)
        assert np.all(np.diff(fit) >= -1e-9)
        fit_err.append(np.abs(fit - truth).mean())
        raw_err.append(np.abs(k / n - truth).mean())
    assert np.mean(fit_err) < 0.75 * np.mean(raw_err)  # measured 0.62x


def test_calibration_split_sets_the_held_out_half_the_analysis_splits_off(digits):
    # the bench's split experiment reaches the pool split the analysis makes (700 of 1,000 pool digits),
    # and its cache and result names never collide with the defaults'
    from pydantic import ValidationError

    from bench.compression import calibration_split
    from toco_core.analysis.pool_split import split_pool

    assert calibration_split(None, None) == (None, "")
    settings, suffix = calibration_split(0.7, 700)
    assert settings is not None and suffix == "-held0.7-700"
    split = split_pool(digits.x_pool, settings)
    assert (len(split.held), len(split.cand)) == (700, len(digits.x_pool) - 700)
    capped, _ = calibration_split(0.7, None)  # the default cap (500) still applies
    assert capped is not None and len(split_pool(digits.x_pool, capped).held) == 500
    with pytest.raises(ValidationError):
        calibration_split(1.2, 700)
    nearest, suffix = calibration_split(None, None, "nearest")  # the baseline of compensated rounding
    assert nearest is not None and not nearest.compensated_rounding and suffix == "-nearest"
    assert nearest.heldout_share == 0.5 and nearest.max_heldout == 500


def test_a_plan_at_exactly_the_budget_counts_as_within_it():
    # 990 of 1,000 digits agree: 1 - 0.99 is 0.010000000000000009 in floats, yet it is 1.0%
    from bench._common import within_budget

    agreement = float(np.mean(np.arange(1000) >= 10))
    assert 1 - agreement > 0.01  # the float fact the check must not trip on
    assert within_budget(1 - agreement, 0.01)
    assert not within_budget(1 - float(np.mean(np.arange(1000) >= 11)), 0.01)
