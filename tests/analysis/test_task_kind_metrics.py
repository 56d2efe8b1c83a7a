"""The task kinds' metrics and Fisher weighting against their formulas (toco_core.task_kind, docs/analysis.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from toco_core.analysis.fisher import FisherAccumulator
from toco_core.errors import ConfigError, PoolError
from toco_core.fidelity import compare_outputs
from toco_core.task_kind import (
    CLASSIFIER,
    TaskKind,
    TaskSpec,
    committee_score,
    committee_variance,
    compare,
    detect_task_kind,
    disagreement,
    output_spread,
    parse_task_kind,
    prepare,
    task_spec,
)

RNG = np.random.default_rng(0)


def test_a_classifier_is_measured_exactly_as_before():
    base, new = RNG.normal(size=(200, 10)), RNG.normal(size=(200, 10))
    labels = RNG.integers(0, 10, 200)
    assert compare(CLASSIFIER, base, new, labels) == compare_outputs(base, new, labels)
    assert compare(CLASSIFIER, base, new, output_kind="probs") == compare_outputs(base, new, kind="probs")


def test_regression_disagrees_on_the_share_beyond_the_relative_tolerance():
    y = RNG.normal(3.0, 2.0, size=(1000, 1))
    task = task_spec(TaskKind.REGRESSION, y)
    assert task.scale == pytest.approx(y.std())
    err = np.where(np.arange(1000)[:, None] < 30, 0.15, 0.05) * task.scale  # 3% of samples off by 0.15 sigma
    fid = compare(task, y, y + err)
    assert fid.disagreement == pytest.approx(0.03)
    assert fid.kl == pytest.approx(np.mean((err[:, 0] / task.scale) ** 2 / 2))
    assert fid.accuracy is None
    # an error relative to the spread, not to the value: a target near zero is no harder
    assert disagreement(task, y - 3.0, y - 3.0 + err) == pytest.approx(0.03)


def test_a_vector_output_uses_the_euclidean_norm_over_its_values():
    y = RNG.normal(size=(500, 3))
    task = task_spec(TaskKind.REGRESSION, y, tolerance=0.2)
    assert task.scale == pytest.approx(np.sqrt(((y - y.mean(0)) ** 2).sum(1).mean()))
    step = np.array([0.12, 0.12, 0.12]) * task.scale  # ||step|| = 0.208 sigma > 0.2
    assert disagreement(task, y, y + step) == 1.0
    assert disagreement(task, y, y + step * 0.9) == 0.0


def test_a_thresholded_score_also_disagrees_where_the_decision_flips():
    y = np.linspace(0.0, 1.0, 101)
    task = task_spec(TaskKind.SCORE, y, threshold=0.5)
    nudge = y + 0.011  # well within the tolerance (0.1 sigma = 0.029), but 0.49 and 0.5 cross to > 0.5
    assert disagreement(task, y, nudge) == pytest.approx(2 / 101)
    assert disagreement(task_spec(TaskKind.SCORE, y), y, nudge) == 0.0
    base = prepare(task, y)
    members = np.stack([prepare(task, nudge), prepare(task, y)])
    score = committee_score(task, base, members)
    assert set(np.flatnonzero(score == score.max())) == {49, 50}  # the samples that flipped


def test_an_embedding_is_judged_by_its_cosine_and_ignores_the_norm():
    e = RNG.normal(size=(400, 16))
    task = task_spec(TaskKind.EMBEDDING, e)
    assert task.tolerance == 0.02
    assert disagreement(task, e, 3.0 * e) == 0.0
    noisy = e + RNG.normal(size=e.shape) * 0.3
    cos = (e * noisy).sum(1) / np.linalg.norm(e, axis=1) / np.linalg.norm(noisy, axis=1)
    fid = compare(task, e, noisy)
    assert fid.disagreement == pytest.approx(np.mean(cos < 0.98))
    assert fid.kl == pytest.approx(np.mean(1 - cos))


def test_committee_variance_sums_the_per_value_variance_over_members_and_base():
    base = np.zeros((2, 2))
    members = np.array([[[1.0, 0.0], [0.0, 0.0]], [[-1.0, 0.0], [0.0, 2.0]]])
    # sample 0: values (0, 1, -1) and (0, 0, 0) -> var 2/3; sample 1: (0, 0, 0) and (0, 0, 2) -> var 8/9
    np.testing.assert_allclose(committee_variance(base, members), [2 / 3, 8 / 9])
    np.testing.assert_allclose(committee_score(TaskSpec(kind=TaskKind.REGRESSION, tolerance=0.1), base, members),
                               [2 / 3, 8 / 9])


def test_names_widths_and_constant_outputs_are_refused_with_what_to_do():
    with pytest.raises(ConfigError, match="unknown task kind 'ranking'.*classifier, regression, score, embedding"):
        parse_task_kind("ranking")
    assert parse_task_kind(" Embedding ") is TaskKind.EMBEDDING
    with pytest.raises(ConfigError, match="--threshold applies to --task score"):
        task_spec(TaskKind.REGRESSION, RNG.normal(size=(10, 1)), threshold=0.3)
    with pytest.raises(PoolError, match="does not vary over the pool"):
        output_spread(np.full((50, 1), 4.2))
    with pytest.raises(ConfigError, match="out of range for embedding"):
        task_spec(TaskKind.EMBEDDING, RNG.normal(size=(10, 4)), tolerance=2.5)
    assert detect_task_kind("Softmax", 1) is TaskKind.CLASSIFIER
    assert detect_task_kind("Gemm", 1) is TaskKind.REGRESSION
    assert detect_task_kind("Gemm", 1, threshold=0.5) is TaskKind.SCORE
    assert detect_task_kind("LpNormalization", 16) is TaskKind.EMBEDDING
    assert detect_task_kind("Gemm", 10) is TaskKind.CLASSIFIER


@pytest.mark.parametrize("sampled", [False, True])
def test_the_gaussian_fisher_of_a_linear_map_is_x_squared_over_sigma_squared(sampled):
    # y = W x: dy_k / dW_kj = x_j, so diag(J^T J) / sigma^2 = mean_x x_j^2 / sigma^2 in every row k
    x = RNG.normal(size=(256, 5)).astype(np.float32)
    w = torch.from_numpy(RNG.normal(size=(3, 5)).astype(np.float32))
    task = TaskSpec(kind=TaskKind.REGRESSION, scale=2.0, tolerance=0.1)

    def forward(xb, weights):
        return xb @ weights["w"].T

    acc = FisherAccumulator(forward, {"w": w}, task=task, sampled=sampled, y_samples=64, seed=0)
    acc.add_batch(x)
    want = np.tile((x.astype(np.float64) ** 2).mean(0) / 4.0, (3, 1))
    np.testing.assert_allclose(acc.result()["w"], want, rtol=0.25 if sampled else 1e-5)
