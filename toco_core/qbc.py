"""Query-By-Committee: which unlabeled samples does a committee of tolerable models dispute?

The committee is the base weights plus uniform noise within the tolerance,
w^(m) = w + U(-s tau, +s tau). It is an instrument for choosing informative samples,
not a predictor of a compressed model's fidelity (docs/design_notes.md). Numpy + onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx

from toco_core.fidelity import OutputKind, per_sample_disagreement, per_sample_kl
from toco_core.model_inputs import Batch
from toco_core.runtime import run_with_weights
from toco_core.task_kind import CLASSIFIER, TaskSpec, prepare


def noisy_weights(weights: dict[str, np.ndarray], tau: dict[str, np.ndarray],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One committee member: w + U(-tau, +tau) per weight."""
    return {k: (w + rng.uniform(-1.0, 1.0, w.shape) * tau[k]).astype(np.float32) for k, w in weights.items()}


def committee_log_probs(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    tau: dict[str, np.ndarray],
    x: Batch,
    members: int,
    seed: int,
    kind: OutputKind = "logits",
) -> np.ndarray:
    """Log-probabilities of every member on x: ``[M, N, P, C]``."""
    return committee_outputs(model, weights, tau, x, members, seed, CLASSIFIER, kind)


def committee_outputs(
    model: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    tau: dict[str, np.ndarray],
    x: Batch,
    members: int,
    seed: int,
    task: TaskSpec,
    kind: OutputKind = "logits",
) -> np.ndarray:
    """Every member's output on x as the task's metric compares it (toco_core.task_kind.prepare):
    ``[M, N, P, C]`` log-probabilities for a classifier, ``[M, N, D]`` otherwise."""
    rng = np.random.default_rng(seed)
    outs = [prepare(task, run_with_weights(model, noisy_weights(weights, tau, rng), x), kind) for _ in range(members)]
    return np.stack(outs)


def vote_entropy(member_lp: np.ndarray) -> np.ndarray:
    """Vote entropy per sample: H(votes) = -sum_c v_c log v_c, v_c = share of members voting c.

    Takes ``[M, N, P, C]``; averages over positions; returns ``[N]``.
    """
    m, _, _, c = member_lp.shape
    votes = member_lp.argmax(-1)  # [M, N, P]
    share = np.stack([(votes == k).mean(0) for k in range(c)], axis=-1)  # [N, P, C]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(share > 0, share * np.log(share), 0.0).sum(-1)
    result: np.ndarray = h.mean(-1)
    return result


def mean_kl_to_base(base_lp: np.ndarray, member_lp: np.ndarray) -> np.ndarray:
    """Mean over members of KL(p_base || p_member) per sample; ``[N]``."""
    result: np.ndarray = np.mean([per_sample_kl(base_lp, lp) for lp in member_lp], axis=0)
    return result


def disagreement_score(base_lp: np.ndarray, member_lp: np.ndarray) -> np.ndarray:
    """QBC score: vote entropy (base included as a member) plus mean KL to the base as tiebreak.

    Vote entropy is 0 for most samples at a small committee scale; the KL term orders them.
    """
    all_lp = np.concatenate([base_lp[None], member_lp])
    result: np.ndarray = vote_entropy(all_lp) + mean_kl_to_base(base_lp, member_lp)
    return result


def committee_disagreement(base_lp: np.ndarray, member_lp: np.ndarray) -> float:
    """Mean top-1 disagreement of the members with the base."""
    return float(np.mean([per_sample_disagreement(base_lp, lp).mean() for lp in member_lp]))


def select_top(scores: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k highest scores, skipping ``exclude`` (a bool mask or index array)."""
    s = scores.astype(np.float64).copy()
    if exclude is not None and len(exclude):
        s[exclude] = -np.inf
    order = np.argsort(-s, kind="stable")
    order = order[np.isfinite(s[order])]
    return order[:k]
