"""K-FAC pruning order: input moments of real models, the greedy row order, and what it buys."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from toco_core.analysis.graph_eval import GraphEvaluator
from toco_core.analysis.input_moments import InputMoments
from toco_core.analysis.prune_order import greedy_row_costs, prune_scores
from toco_core.onnx_model import compressible_weights, read_weights


def _moments(model, x):
    names = [w.name for w in compressible_weights(model)]
    acc = InputMoments(GraphEvaluator(model, names), names)
    acc.add_batch(x)
    return acc.result(), read_weights(model)


def test_gemm_moments_are_the_input_second_moment(mlp, digits):
    x = digits.x_pool[:40]
    moments, weights = _moments(mlp, x)
    first = next(k for k, w in weights.items() if w.shape == (300, 784))
    flat = x.reshape(len(x), -1).astype(np.float64)
    np.testing.assert_allclose(moments[first].a[0], flat.T @ flat / len(x), rtol=1e-4, atol=1e-7)
    assert len(moments) == len(weights)  # every layer of the MLP is covered


def test_conv_moments_predict_the_output_energy_of_each_channel(lenet5, digits):
    # diag(W A W^T)_i = mean_x sum_positions (w_i . patch)^2 = the energy of channel i without its bias
    x = digits.x_pool[:24]
    moments, weights = _moments(lenet5, x)
    first = next(k for k, w in weights.items() if w.ndim == 4 and w.shape[1] == 1)
    w = weights[first]
    m = moments[first]
    rows = m.layout.rows(w).astype(np.float64)
    predicted = np.einsum("ic,cd,id->i", rows, m.a[0], rows)
    out = F.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding=2).double()
    measured = (out**2).sum(dim=(2, 3)).mean(0).numpy()
    np.testing.assert_allclose(predicted, measured, rtol=1e-4)


def test_greedy_lets_a_cancelling_pair_go_together():
    # inputs 0 and 1 are identical, input 2 independent: pruning w0 = 1 and w1 = -1 together costs nothing
    a = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    w = np.array([[1.0, -1.0, 0.9]])
    costs = greedy_row_costs(w, a, np.zeros(w.shape, bool))[0]
    np.testing.assert_allclose(costs[2], 0.81, rtol=1e-6)  # cheapest alone goes first
    np.testing.assert_allclose(costs[:2], [1.0, 1.0], rtol=1e-6)  # the pair's second adds -1: the running max keeps 1
    again = greedy_row_costs(w, a, np.array([[True, False, False]]))[0]
    assert again[0] == -np.inf
    np.testing.assert_allclose(again[1:], [-1.0, 0.81], rtol=1e-6)  # with w0 gone, w1 cancels its error


def test_kfac_order_beats_diagonal_obd_on_the_mlp(mlp, digits):
    # measured, not assumed: same Fisher-free comparison at 75% sparsity on unseen pool digits
    from toco_core.analysis.fisher import FisherAccumulator
    from toco_core.fidelity import compare_outputs
    from toco_core.runtime import run_model, run_with_weights

    x, test = digits.x_pool[:64], digits.x_pool[500:]
    names = [w.name for w in compressible_weights(mlp)]
    ev = GraphEvaluator(mlp, names)
    moments, weights = _moments(mlp, x)
    acc = FisherAccumulator(ev, {k: torch.from_numpy(v) for k, v in weights.items()})
    acc.add_batch(x)
    fisher = acc.result()
    none = {k: np.zeros(w.shape, bool) for k, w in weights.items()}
    base = run_model(mlp, test)

    def agreement(scores):
        flat = np.concatenate([s.ravel() for s in scores.values()])
        cut = np.quantile(flat, 0.75)
        pruned = {k: np.where(scores[k] <= cut, np.float32(0), w) for k, w in weights.items()}
        return compare_outputs(base, run_with_weights(mlp, pruned, test)).agreement

    kfac = agreement(prune_scores(weights, fisher, moments, none, 1e-2))
    obd = agreement(prune_scores(weights, fisher, {}, none, 1e-2))
    assert kfac > obd + 0.01, (kfac, obd)
