import numpy as np
import pytest

from toco_core.tolerance import closed_form_tolerance, log_tolerance_change, tolerance_cap


def quadratic_kl(fisher: dict[str, np.ndarray], delta: dict[str, np.ndarray]) -> float:
    """Second-order prediction of the KL a weight change causes: 1/2 sum_i F_i delta_i^2."""
    return 0.5 * float(sum((fisher[k].astype(np.float64) * delta[k].astype(np.float64) ** 2).sum() for k in delta))


def _random_problem(seed=0):
    rng = np.random.default_rng(seed)
    weights = {"a": rng.normal(size=(8, 5)).astype(np.float32), "b": rng.normal(size=(3, 7)).astype(np.float32) * 10}
    fisher = {k: rng.gamma(0.5, 1.0, size=w.shape) for k, w in weights.items()}
    return fisher, weights


@pytest.mark.parametrize("eps", [1e-3, 0.1, 1.0])
def test_closed_form_spends_exactly_the_budget(eps):
    """1/2 sum F tau^2 = eps when no floor or cap binds, and every weight spends eps/n."""
    fisher, weights = _random_problem()
    tau = closed_form_tolerance(fisher, weights, eps=eps, floor_rel=1e-9)
    n = sum(f.size for f in fisher.values())
    share = {k: 0.5 * fisher[k] * tau[k].astype(np.float64) ** 2 for k in fisher}
    uncapped = {k: tau[k] < np.abs(weights[k]).max() for k in tau}
    for k in share:
        np.testing.assert_allclose(share[k][uncapped[k]], eps / n, rtol=1e-5)
    if all(u.all() for u in uncapped.values()):
        assert quadratic_kl(fisher, tau) == pytest.approx(eps, rel=1e-5)
    assert quadratic_kl(fisher, tau) <= eps * (1 + 1e-5)


def test_zero_fisher_is_floored_and_capped_at_the_weight_range():
    fisher, weights = _random_problem(1)
    fisher["a"][0, :] = 0.0
    tau = closed_form_tolerance(fisher, weights, floor_rel=1e-2)
    assert np.all(np.isfinite(tau["a"]))
    assert tau["a"].max() <= np.abs(weights["a"]).max() + 1e-6
    # a zero-Fisher weight is at least as tolerant as any weight with positive Fisher in its tensor
    assert tau["a"][0].min() >= tau["a"][1:].min()


def test_bad_inputs_raise():
    fisher, weights = _random_problem()
    with pytest.raises(ValueError, match="eps"):
        closed_form_tolerance(fisher, weights, eps=0)
    with pytest.raises(ValueError, match="different tensors"):
        closed_form_tolerance({"a": fisher["a"]}, weights)


def test_run_with_weights_equals_a_patched_model(lenet5, digits):
    """Session initializer overrides must reach every layer (Conv included) exactly."""
    from toco_core.onnx_model import read_weights, with_weights
    from toco_core.runtime import run_model, run_with_weights

    w = {k: v * 0.5 for k, v in read_weights(lenet5).items()}
    x = digits.x_pool[:32]
    np.testing.assert_allclose(run_with_weights(lenet5, w, x), run_model(with_weights(lenet5, w), x), atol=1e-5)


def _two_rounds(seed=0):
    """Two rounds' maps of one problem: the second with a fresh Fisher on three fifths of the weights."""
    fisher, weights = _random_problem(seed)
    rng = np.random.default_rng(seed + 1)
    later = {k: np.where(rng.random(f.shape) < 0.6, rng.gamma(0.5, 1.0, size=f.shape), f) for k, f in fisher.items()}
    return closed_form_tolerance(fisher, weights), closed_form_tolerance(later, weights), weights


def test_the_tolerance_change_ignores_capped_weights_that_are_most_of_the_map():
    first, second, weights = _two_rounds()
    capped = {k: np.full_like(v, tolerance_cap(weights[k])) for k, v in first.items()}
    # three capped copies of every tensor beside it: three quarters of all weights sit at the cap in both rounds
    wide = {f"{k}{i}": (first if i == 0 else capped)[k] for k in first for i in range(4)}
    wide2 = {f"{k}{i}": (second if i == 0 else capped)[k] for k in first for i in range(4)}
    ws = {f"{k}{i}": weights[k] for k in weights for i in range(4)}
    diffs = np.concatenate([np.abs(np.log(wide[k]) - np.log(wide2[k])).ravel() for k in wide])
    assert np.median(diffs) == 0.0  # what a median over every weight reads
    assert log_tolerance_change(wide, wide2, ws) == pytest.approx(log_tolerance_change(first, second, weights))
    assert log_tolerance_change(first, second, weights) > 0.1


def test_a_common_shift_of_the_tolerances_is_no_change_and_all_capped_maps_read_zero():
    first, _, weights = _two_rounds()
    lower = {k: (v * np.float32(0.8)) for k, v in first.items()}  # every tau 20% lower, the shape unchanged
    assert log_tolerance_change(lower, first, weights) < 1e-6
    capped = {k: np.full_like(v, tolerance_cap(weights[k])) for k, v in first.items()}
    assert log_tolerance_change(capped, capped, weights) == 0.0
