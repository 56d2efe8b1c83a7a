"""Rebase a drift reference on field windows: the new inputs become "in distribution".

Two uses: an operator accepts a data-drift alert's new data as normal, and, after a
re-analysis with field samples is deployed, the box's reference must include the field
distribution so that a stable new distribution is in band (convergence: without it the box
would alert again on the very bundle built for its inputs).

A closed window leaves a FieldSummary (its size, its mean input features, its per-sample
confidence and entropy); the rebased reference takes its location statistics from the pooled
summaries and keeps the old reference's per-feature spreads (a window keeps no per-feature
variance, and the spread of a feature is what standardises its shift, not what moved).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from toco_core.drift import DriftReference, DriftSettings
from toco_core.drift_window import DriftWindow
from toco_core.errors import PoolError

FIELD_WINDOWS = 4  # closed windows' summaries a monitor keeps for a rebase


@dataclass(frozen=True)
class FieldSummary:
    """What a rebase needs of one closed window (about 2 KB for a 256-sample window)."""

    count: int
    feature_mean: np.ndarray
    confidences: np.ndarray
    entropies: np.ndarray


def summarise(window: DriftWindow) -> FieldSummary | None:
    """The FieldSummary of a closed window; None for an empty one."""
    fmean = window.feature_mean()
    if window.count == 0 or fmean is None:
        return None
    return FieldSummary(window.count, fmean.copy(), window.confidences().copy(), window.entropies().copy())


def rebase(reference: DriftReference, field: list[FieldSummary], settings: DriftSettings) -> DriftReference:
    """``reference`` moved onto the pooled field windows.

    Takes the current reference, at least one summary whose features match it, and the settings
    (entropy bins). Returns the new reference: feature means, confidence and entropy statistics
    and entropy quantile edges from the field; spreads per feature, sample shape, output kind and
    expected agreement/accuracy from the old one. Raises PoolError when there is no field window
    or the features do not match.
    """
    if not field:
        raise PoolError("no closed field window to rebase the drift reference on",
                        "let the box serve at least one full drift window first")
    if any(len(f.feature_mean) != len(reference.feature_mean) for f in field):
        raise PoolError("field windows summarise other inputs than the reference's",
                        "rebase only on windows of the model being served")
    counts = np.asarray([f.count for f in field], dtype=np.float64)
    fmean = (np.stack([f.feature_mean for f in field]) * counts[:, None]).sum(0) / counts.sum()
    conf = np.concatenate([f.confidences for f in field])
    ent = np.concatenate([f.entropies for f in field])
    edges = np.quantile(ent, np.linspace(0, 1, settings.entropy_bins + 1)[1:-1])
    shift = float(fmean.mean() - np.mean(reference.feature_mean))
    return reference.model_copy(update={
        "n_samples": max(int(counts.sum()), 2), "confidence_mean": float(conf.mean()),
        "confidence_std": float(conf.std()), "entropy_mean": float(ent.mean()), "entropy_std": float(ent.std()),
        "entropy_edges": [float(v) for v in edges], "feature_mean": fmean.tolist(),
        "input_mean": reference.input_mean + shift})
