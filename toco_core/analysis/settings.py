"""Typed settings of an analysis run, with bounds and defaults that work on one machine."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class AnalysisSettings(BaseModel):
    """How the QBC loop, the tolerance rounds and the calibration run."""

    model_config = ConfigDict(extra="forbid")

    budget: float = Field(0.01, gt=0, lt=1, description="fleet fidelity budget: max share of samples that disagree "
                                                      "with the base in the task kind's metric (toco_core.task_kind)")
    initial_samples: int = Field(64, ge=8, description="random start of the analysis set")
    samples_per_round: int = Field(64, ge=1, description="disputed samples added per QBC round")
    # 6, not 4: with the stop rule of toco_core.tolerance.log_tolerance_change, LeNet-5 variants settle
    # after 3-4 rounds, and a cap of 4 cut some short (bench/plan_honesty.py --dev, docs/analysis.md)
    max_rounds: int = Field(6, ge=1, le=50, description="QBC rounds at most (fewer once tolerances settle)")
    max_heldout: int = Field(500, ge=10, description="held-out samples for calibration at most")
    heldout_share: float = Field(0.5, gt=0, lt=1, description="share of the pool held out")
    committee_members: int = Field(8, ge=2, le=64)
    committee_target: float = Field(0.05, gt=0, lt=0.5, description="committee disagreement the scale aims at")
    tolerance_change_stop: float = Field(0.02, ge=0, description="stop QBC when the map's shape moves less than "
                                         "this between rounds (median |dlog tau|, common shift and capped "
                                         "weights left out)")
    floor_rel: float = Field(1e-2, gt=0, le=1, description="Fisher floor relative to the tensor's median")
    prune_rounds: int = Field(1, ge=1, le=20, description="pruning rounds, Fisher and input moments re-measured "
                                                          "at the pruned point")
    prune_round_samples: int = Field(128, ge=8, description="analysis samples used per pruning round")
    max_sparsity: float = Field(0.95, gt=0, lt=1)
    coverage: float = Field(0.99, gt=0, le=1,
                            description="share of a channel's weights whose rounding stays in tolerance")
    bias_correction: bool = Field(True, description="curves (and devices) correct each layer's bias for the mean "
                                                    "shift compression causes, fitted on the analysis samples")
    compensated_rounding: bool = Field(True, description="round each point's codes against the layer's output "
                                                       "error (GPTQ-style, toco_core.compression.compensated_rounding);"
                                                       " boxes then fetch each point's code differences")
    seed: int = 0
    output: str | None = Field(None, description="the tensor the analysis scores (a graph output or an "
                                                 "intermediate float tensor); None: detected "
                                                 "(toco_core.output_tail.detect_scored_output)")
    task: Literal["classifier", "regression", "score", "embedding"] | None = Field(
        None, description="task kind of the scored output; None: detected (toco_core.task_kind.detect_task_kind)")
    task_tolerance: float | None = Field(None, gt=0, description="per-sample error above which a sample disagrees: "
                                         "relative error (regression, score), 1 - cosine (embedding); None: the "
                                         "kind's default")
    threshold: float | None = Field(None, description="score: decision threshold; a flipped decision also disagrees")
