"""Drift monitor statistics for a deployed (compressed) model; no labels needed.

The reference comes from the deployed model's outputs on the bundle's calibration samples.
Live inputs are accumulated in windows (closed by count, or by time once a minimum count is
reached); each closed window is judged statistic by statistic against a BAND around the
reference, a control-chart limit rather than a p-value:

    band = reference +/- (margin + k * sigma * sqrt(1/n + 1/n_ref))

where ``margin`` is the shift that matters in practice, k = ``band_sigmas`` and the sqrt
term is the sampling noise of a window of n samples against a reference of n_ref (each
statistic's own noise term is stated where it is computed). The window itself lives in
``toco_core.drift_window``.

Statistics (per sample, over output positions when there are several):

- agreement with the base model on the shadowed fraction: 1 - share of top-1 changes (for the
  other task kinds, 1 - share of samples disagreeing in the kind's metric, toco_core.task_kind);
- a classifier's confidence: max_c p(c|x);  entropy: H = -sum_c p log p (nats), compared as a
  distribution by PSI over reference quantile bins: PSI = sum_b (q_b - r_b) ln(q_b / r_b);
- the kinds without classes (regression, score, embedding) have neither: their window reports
  the mean and spread of an output summary s (toco_core.drift_window.output_summary: the mean
  of y / sigma, or of the unit embedding), and ``output_psi`` compares its distribution by the
  same PSI; there is no confidence check and ``mean_confidence`` / ``mean_entropy`` are None;
- input shift: RMS over input features of the standardized mean shift
  ((mean_window_j - mean_ref_j) / max(std_ref_j, floor)), features = pixels averaged in at
  most ``input_features`` groups;
- accuracy when feedback labels arrive.

An alert is raised only after ``consecutive_windows`` out-of-band windows in a row
(toco_core.drift_monitor keeps the streak). Pure numpy + pydantic, no I/O; times are passed in
(the wall clock when omitted).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from toco_core.drift_window import DriftWindow, input_features, output_stats
from toco_core.errors import PoolError
from toco_core.fidelity import OutputKind
from toco_core.model_inputs import Batch, flat_values
from toco_core.task_kind import CLASSIFIER, TaskKind, TaskSpec

__all__ = ["MAX_DISPUTED", "MAX_OUTPUT_VALUES", "MAX_REPORT_OUTPUT_VALUES", "DisputedSample", "DriftReference",
           "DriftReport", "DriftSettings", "DriftWindow", "StatCheck", "build_reference", "evaluate_window",
           "has_classes"]

# A window's report travels as one MQTT message (toco_core.messages.DriftMessage, which takes
# its fields and bounds from DriftReport): the disputed list is capped to keep it small.
MAX_DISPUTED = 1000
# A disputed sample of a kind without classes carries the served model's output (the server
# scores it against the base's): at most this many values per sample, and per report in all,
# which keeps the report well under the wire's 4 MiB JSON limit (~20 bytes per value).
MAX_OUTPUT_VALUES = 1024
MAX_REPORT_OUTPUT_VALUES = 65_536


class DriftSettings(BaseModel):
    """Window sizes, shadow sampling, band widths and alerting of the drift monitor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window_max_samples: int = Field(256, ge=10, le=1_000_000, description="a window closes at this count")
    window_min_samples: int = Field(64, ge=10, le=1_000_000, description="a timed-out window waits for this count")
    window_seconds: float = Field(300.0, gt=0, le=7 * 86400, description="a window closes after this time")
    shadow_fraction: float = Field(0.1, ge=0, le=1, description="share of inputs also run on the base model")
    consecutive_windows: int = Field(3, ge=1, le=100, description="out-of-band windows in a row before an alert")
    history: int = Field(20, ge=1, le=10_000, description="closed window reports kept")
    band_sigmas: float = Field(3.0, ge=0, le=10, description="k: sampling-noise width of every band")
    agreement_margin: float = Field(0.03, ge=0, le=1, description="allowed agreement drop below prediction")
    accuracy_margin: float = Field(0.05, ge=0, le=1, description="allowed accuracy drop below reference")
    confidence_margin: float = Field(0.03, ge=0, le=1, description="allowed mean-confidence change")
    entropy_psi_margin: float = Field(0.2, ge=0, le=10, description="allowed entropy PSI beyond noise")
    entropy_bins: int = Field(10, ge=2, le=100, description="quantile bins of the entropy reference")
    input_shift_margin: float = Field(0.15, ge=0, le=100, description="allowed RMS standardized input mean shift")
    input_features: int = Field(1024, ge=1, le=1_000_000, description="input summarised in at most this many groups")
    std_floor: float = Field(0.1, gt=0, le=10, description="feature std floor, as a share of the input std")
    min_shadow_samples: int = Field(10, ge=1, description="agreement is judged from this many shadowed samples")
    min_labels: int = Field(10, ge=1, description="accuracy is judged from this many labels")
    max_disputed: int = Field(16, ge=0, le=MAX_DISPUTED, description="disputed samples attached per window")

    @model_validator(mode="after")
    def _check(self) -> DriftSettings:
        if self.window_min_samples > self.window_max_samples:
            raise ValueError(f"window_min_samples {self.window_min_samples} > window_max_samples "
                             f"{self.window_max_samples}; lower the minimum or raise the maximum")
        return self


class DriftReference(BaseModel):
    """What in-distribution looks like for the deployed model (JSON-serialisable)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: int = 1
    n_samples: int = Field(ge=2)
    output_kind: OutputKind = "logits"
    # the output the statistics describe (the analysis' scored tensor); None: the first output
    scored_output: str | None = None
    # the metric of the agreement check (toco_core.task_kind); None: a classifier (references
    # made before task kinds). A kind without classes keeps its output summary's statistics in
    # the entropy_* fields (and in confidence_* 1 +- 0, or a thresholded score's decision margin;
    # no check reads them): one layout for every kind, so references on boxes and in bundles stay valid
    task: TaskSpec | None = None
    sample_shape: tuple[int, ...]
    expected_agreement: float = Field(ge=0, le=1, description="predicted fidelity (top-1 agreement)")
    expected_accuracy: float | None = Field(None, ge=0, le=1)
    confidence_mean: float
    confidence_std: float
    entropy_mean: float
    entropy_std: float
    entropy_edges: list[float] = Field(description="interior quantile edges of the entropy")
    input_mean: float
    input_std: float
    feature_mean: list[float]
    feature_std: list[float]


def build_reference(inputs: Batch, outputs: np.ndarray, expected_agreement: float,
                    settings: DriftSettings | None = None, kind: OutputKind = "logits",
                    expected_accuracy: float | None = None, scored_output: str | None = None,
                    task: TaskSpec | None = None) -> DriftReference:
    """Reference statistics from calibration ``inputs`` and the deployed model's ``outputs``.

    Use held-out-like calibration samples: samples picked for being disputed (QBC) are less
    confident than live traffic and would make clean windows look drifted.
    ``scored_output`` names the model output ``outputs`` are (the agent observes that one);
    ``task`` is the analysis' task kind, whose metric the shadow agreement check uses (None: a classifier).
    Raises PoolError for fewer than 2 samples or mismatched counts.
    """
    s = settings or DriftSettings()
    inputs = flat_values(inputs)  # several inputs: one flat row of values per sample, as the monitor sees them
    if len(inputs) < 2 or len(inputs) != len(outputs):
        raise PoolError(f"reference needs >= 2 matching inputs/outputs, got {len(inputs)}/{len(outputs)}",
                        "pass the calibration samples and the model's outputs on them")
    st = output_stats(outputs, kind, task) if task is not None else output_stats(outputs, kind)
    feats = input_features(inputs, s.input_features)
    q = np.quantile(st.entropy, np.linspace(0, 1, s.entropy_bins + 1)[1:-1])
    x = np.asarray(inputs, dtype=np.float64)
    return DriftReference(
        n_samples=len(inputs), output_kind=kind, scored_output=scored_output, task=task,
        sample_shape=tuple(int(d) for d in inputs.shape[1:]),
        expected_agreement=float(expected_agreement), expected_accuracy=expected_accuracy,
        confidence_mean=float(st.confidence.mean()), confidence_std=float(st.confidence.std()),
        entropy_mean=float(st.entropy.mean()), entropy_std=float(st.entropy.std()),
        entropy_edges=[float(v) for v in q], input_mean=float(x.mean()), input_std=float(x.std()),
        feature_mean=feats.mean(0).tolist(), feature_std=feats.std(0).tolist(),
    )


class StatCheck(BaseModel):
    """One statistic of a window against its band; ``in_band`` None = too few samples to judge."""

    name: Literal["agreement", "confidence", "entropy_psi", "output_psi", "input_shift", "accuracy"]
    value: float | None
    reference: float | None
    low: float | None
    high: float | None
    n: int = Field(ge=0)
    in_band: bool | None


class DisputedSample(BaseModel):
    """A sample worth the server's re-analysis (its input travels separately, by ``ref``)."""

    ref: str = Field(min_length=1, max_length=128)
    reason: Literal["disagreement", "low_confidence"]
    confidence: float
    model_class: int
    base_class: int | None = None
    # the served model's scored output for this sample, flattened, for the kinds without classes
    # (whose model_class means nothing): the server compares it with the base's output in the
    # kind's metric (fleet_server.sample_scoring). None for a classifier, for an output wider than
    # MAX_OUTPUT_VALUES or past the report's MAX_REPORT_OUTPUT_VALUES, and from older agents
    output: list[float] | None = Field(None, max_length=MAX_OUTPUT_VALUES)


class DriftReport(BaseModel):
    """One closed window judged against the reference.

    Also the body of the drift message (toco_core.messages.DriftMessage): the bounds and
    defaults here are the wire's.
    """

    schema_version: int = 1
    window_index: int = Field(0, ge=0)
    opened_at: float
    closed_at: float
    n_samples: int = Field(ge=0)
    n_shadowed: int = Field(0, ge=0, description="inputs also run on the base model")
    n_labeled: int = Field(0, ge=0)
    predicted_agreement: float | None = Field(None, ge=0, le=1, description="the served model's self-test agreement")
    measured_agreement: float | None = Field(None, ge=0, le=1, description="on the shadowed inputs")
    accuracy: float | None = Field(None, ge=0, le=1, description="on the labelled inputs")
    # the task kind of the served model (toco_core.task_kind); None: a classifier, or an agent older than the field
    task_kind: TaskKind | None = None
    mean_confidence: float | None = Field(None, description="a classifier's mean top-1 probability; None for "
                                                            "the kinds without classes")
    mean_entropy: float | None = Field(None, description="a classifier's mean entropy (nats); None for the kinds "
                                                         "without classes")
    output_mean: float | None = Field(None, description="kinds without classes: mean of the output summary "
                                                        "(toco_core.drift_window.output_summary); None for a "
                                                        "classifier")
    output_std: float | None = Field(None, ge=0, description="its spread (standard deviation over the window)")
    input_mean: float
    input_std: float
    checks: list[StatCheck] = Field(default_factory=list)
    out_of_band: list[str] = Field(default_factory=list, description="names of the checks outside their band")
    consecutive_out_of_band: int = Field(0, ge=0)
    alert: bool = False
    # what the alert means (toco_core.drift_kind): None on windows without an alert, from boxes
    # that cannot tell (no shadow run) and from agents older than this field; the server decides then
    kind: Literal["fidelity", "data"] | None = Field(None, description="fidelity drift (the compressed model "
                                                      "stops agreeing with the base) or data drift (new inputs)")
    disputed: list[DisputedSample] = Field(default_factory=list, max_length=MAX_DISPUTED)


def _noise(reference: DriftReference, n: int) -> float:
    """sqrt(1/n + 1/n_ref): relative sampling noise of a window mean against the reference."""
    return float(np.sqrt(1.0 / max(n, 1) + 1.0 / reference.n_samples))


def _lower_check(name: str, values: np.ndarray, ref: float, margin: float, k: float,
                 min_n: int) -> StatCheck:
    """One-sided band for a rate that must not drop: low = ref - margin - k sqrt(v/n), v >= 0.01."""
    n = len(values)
    value = float(values.mean()) if n else None
    if n < min_n:
        return StatCheck(name=name, value=value, reference=ref, low=None, high=None, n=n, in_band=None)
    low = ref - margin - k * np.sqrt(max(ref * (1 - ref), 0.01) / n)
    return StatCheck(name=name, value=value, reference=ref, low=float(low), high=1.0, n=n,
                     in_band=bool(value >= low))


def entropy_psi(entropy: np.ndarray, edges: list[float]) -> float:
    """PSI = sum_b (q_b - r_b) ln(q_b / r_b) over the reference quantile bins (r_b = 1/B).

    Counts get +0.5 (Jeffreys) so an empty bin does not make the index infinite.
    """
    bins = len(edges) + 1
    counts = np.bincount(np.searchsorted(np.asarray(edges), entropy, side="right"), minlength=bins)
    q = (counts + 0.5) / (len(entropy) + 0.5 * bins)
    r = np.full(bins, 1.0 / bins)
    return float(((q - r) * np.log(q / r)).sum())


def input_shift(window_mean: np.ndarray, reference: DriftReference, std_floor: float) -> float:
    """RMS_j (m_j - mu_j) / max(sigma_j, std_floor * input_std) over the input features."""
    mu = np.asarray(reference.feature_mean)
    sigma = np.maximum(np.asarray(reference.feature_std), std_floor * max(reference.input_std, 1e-12))
    return float(np.sqrt((((window_mean - mu) / sigma) ** 2).mean()))


def has_classes(task: TaskSpec | None) -> bool:
    """Whether a task kind has classes, so confidence and entropy mean something (None: a classifier)."""
    return (task or CLASSIFIER).kind is TaskKind.CLASSIFIER


def _checks(window: DriftWindow, ref: DriftReference, s: DriftSettings) -> list[StatCheck]:
    k, n = s.band_sigmas, window.count
    checks = [_lower_check("agreement", window.agreements(), ref.expected_agreement, s.agreement_margin, k,
                           s.min_shadow_samples)]
    classes = has_classes(ref.task)
    if classes:  # without classes the confidence is 1 on every sample: a check that can never fail
        conf = float(window.confidences().mean())
        half = s.confidence_margin + k * ref.confidence_std * _noise(ref, n)
        checks.append(StatCheck(name="confidence", value=conf, reference=ref.confidence_mean,
                                low=ref.confidence_mean - half, high=ref.confidence_mean + half, n=n,
                                in_band=abs(conf - ref.confidence_mean) <= half))
    # n * PSI is about chi-square with B - 1 degrees of freedom when nothing changed. Without
    # classes the window keeps the output summary where a classifier keeps the entropy.
    dof, v = len(ref.entropy_edges), _noise(ref, n) ** 2
    psi = entropy_psi(window.entropies(), ref.entropy_edges)
    high = s.entropy_psi_margin + dof * v + k * np.sqrt(2 * dof) * v
    checks.append(StatCheck(name="entropy_psi" if classes else "output_psi", value=psi, reference=0.0, low=0.0,
                            high=float(high), n=n, in_band=psi <= high))
    # Under no shift each standardized feature mean z_j has variance <= v = 1/n + 1/n_ref, so
    # shift^2 = mean_j z_j^2 <= v (1 + k sqrt(2)) even if all features move together.
    window_mean = window.feature_mean()
    assert window_mean is not None, "the drift checks run on a window with samples"
    shift = input_shift(window_mean, ref, s.std_floor)
    high = s.input_shift_margin + np.sqrt(v * (1 + k * np.sqrt(2)))
    checks.append(StatCheck(name="input_shift", value=shift, reference=0.0, low=0.0, high=float(high), n=n,
                            in_band=shift <= high))
    if ref.expected_accuracy is not None:
        checks.append(_lower_check("accuracy", window.correct().astype(float), ref.expected_accuracy,
                                   s.accuracy_margin, k, s.min_labels))
    return checks


def _pick_disputed(window: DriftWindow, limit: int) -> list[DisputedSample]:
    disagree, low = window.dispute_candidates()
    out: dict[str, DisputedSample] = {}
    values = 0  # output values attached so far (MAX_REPORT_OUTPUT_VALUES)
    for reason, kept in [*(("disagreement", k) for k in disagree), *(("low_confidence", k) for k in low)]:
        if len(out) >= limit:
            break
        if kept.ref in out:
            continue
        output = None
        if kept.output is not None and kept.output.size <= MAX_OUTPUT_VALUES \
                and values + kept.output.size <= MAX_REPORT_OUTPUT_VALUES:
            output, values = [float(v) for v in kept.output], values + kept.output.size
        out[kept.ref] = DisputedSample(ref=kept.ref, reason=reason, confidence=kept.confidence,
                                       model_class=kept.model_class, base_class=kept.base_class, output=output)
    return list(out.values())


def evaluate_window(window: DriftWindow, reference: DriftReference, settings: DriftSettings,
                    closed_at: float | None = None) -> DriftReport:
    """Judge a window against the reference; returns the report (alert fields left to the monitor).

    Raises PoolError for an empty window or inputs shaped unlike the reference's samples.
    """
    if window.count == 0:
        raise PoolError("the drift window is empty", "add samples before evaluating it")
    fmean = window.feature_mean()
    if fmean is None or len(fmean) != len(reference.feature_mean):
        raise PoolError(f"window inputs give {0 if fmean is None else len(fmean)} features, the reference "
                        f"{len(reference.feature_mean)}", "build the reference from the same kind of inputs")
    checks = _checks(window, reference, settings)
    agree, correct = window.agreements(), window.correct()
    in_mean, in_std = window.input_moments()
    classes = has_classes(reference.task)
    summary = window.entropies()  # a classifier's entropies, else the output summaries (see _checks)
    task_kind = None if reference.task is None else reference.task.kind
    return DriftReport(
        opened_at=window.opened_at, closed_at=closed_at if closed_at is not None else window.opened_at,
        n_samples=window.count, n_shadowed=len(agree), n_labeled=len(correct),
        predicted_agreement=reference.expected_agreement,
        measured_agreement=float(agree.mean()) if len(agree) else None,
        accuracy=float(correct.mean()) if len(correct) else None,
        task_kind=task_kind,
        mean_confidence=float(window.confidences().mean()) if classes else None,
        mean_entropy=float(summary.mean()) if classes else None,
        output_mean=None if classes else float(summary.mean()),
        output_std=None if classes else float(summary.std()),
        input_mean=in_mean, input_std=in_std, checks=checks,
        out_of_band=[c.name for c in checks if c.in_band is False],
        disputed=_pick_disputed(window, settings.max_disputed),
    )
