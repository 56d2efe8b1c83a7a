"""Matplotlib figures of an analysis result (server/dev side)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from toco_core.analysis_result import AnalysisResult
from toco_core.curve_operators import CurveOperator


def plot_analysis(result: AnalysisResult, path: Path) -> Path:
    """Two panels: per-layer tolerance distribution (box plot, log scale) and the calibration curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    tmap = result.tolerances
    assert tmap is not None, "a finished analysis has its tolerance map"
    names = list(tmap.quant)
    data = [np.log10(np.maximum(tmap.quant[k].ravel(), 1e-12)) for k in names]
    ax1.boxplot(data, showfliers=False)
    ax1.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right", fontsize=8)
    ax1.set_ylabel("log10 tau_hat")
    ax1.set_title("per-layer tolerance")
    prune = result.curves[CurveOperator.PRUNE].points
    ax2.plot([p.sparsity for p in prune], [p.disagreement for p in prune], "o-", label="prune (x = sparsity)")
    quant = result.curves[CurveOperator.QUANTIZE].points
    ax2.plot([1 - p.entropy_bits / 32 for p in quant], [p.disagreement for p in quant], "s-",
             label="quantize (x = 1 - bits/32)")
    budget = result.manifest.settings.get("budget", 0.01)
    ax2.axhline(budget, color="grey", ls="--", label=f"budget {budget:.0%}")
    ax2.set_ylim(0, max(0.2, 2 * budget))
    ax2.set_xlabel("compression")
    ax2.set_ylabel("top-1 disagreement with base (held-out)")
    ax2.set_title("calibration curves")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
