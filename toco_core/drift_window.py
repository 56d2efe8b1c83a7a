"""One drift window: accumulates live samples with memory bounded by the settings.

Per sample it keeps confidence max_c p and entropy -sum_c p ln p (means over output
positions; for the task kinds without classes, 1 and the output summary instead: OutputStats),
agreement with the base on shadowed samples, label correctness, running sums of the input
features, and the inputs of at most ``max_disputed`` disagreeing plus ``max_disputed``
least-confident samples (without classes also their served outputs, which the server compares
with the base's). Judging a window is ``toco_core.drift``'s job.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from toco_core.errors import PoolError
from toco_core.fidelity import OutputKind, as_log_probs
from toco_core.model_inputs import Batch, ModelInputs, concat, flat_values
from toco_core.task_kind import CLASSIFIER, TaskKind, TaskSpec, prepare, sample_disagreement

if TYPE_CHECKING:
    from toco_core.drift import DriftSettings


@dataclass(frozen=True)
class OutputStats:
    """Per-sample confidence, entropy, top-1 (first position) and log-probs ``[N, P, C]``.

    For the task kinds that are not classifiers (toco_core.task_kind) there are no classes:
    ``confidence`` is 1 (for a score with a threshold, the margin to the decision: decision_margin),
    ``entropy`` holds a scalar summary of the output whose distribution the output PSI check then
    watches (output_summary), ``top1`` is 0 and ``log_probs`` holds the prepared output the
    agreement check compares. Confidence only ranks the samples a window keeps as disputed then:
    no check judges it.
    """

    confidence: np.ndarray
    entropy: np.ndarray
    top1: np.ndarray
    log_probs: np.ndarray


def output_summary(task: TaskSpec, prepared: np.ndarray) -> np.ndarray:
    """One number per sample of a prepared non-classifier output ``[N, D]`` whose distribution
    the drift monitor watches: the mean of z = y / sigma (regression, score) or
    sqrt(D) * mean of the unit vector's values (embedding: its projection on the diagonal)."""
    if task.kind is TaskKind.EMBEDDING:
        result: np.ndarray = prepared.mean(1) * np.sqrt(prepared.shape[1])
        return result
    result = prepared.mean(1)
    return result


def decision_margin(task: TaskSpec, prepared: np.ndarray) -> np.ndarray:
    """Per sample of a thresholded score's prepared output ``[N, D]``: min_k |z_k - t / sigma|, the
    distance to the decision in units of sigma. The samples nearest a flip are the least sure ones,
    as the least confident are for a classifier: a window keeps those as disputed."""
    assert task.threshold is not None, "only a score with a threshold has a decision"
    result: np.ndarray = np.abs(prepared - task.threshold / task.scale).min(axis=1)
    return result


def output_stats(outputs: np.ndarray, kind: OutputKind = "logits", task: TaskSpec = CLASSIFIER) -> OutputStats:
    """Confidence max_c p, entropy -sum_c p ln p (means over positions), top-1 per sample (a
    classifier; the other task kinds as OutputStats says)."""
    if task.kind is not TaskKind.CLASSIFIER:
        z = prepare(task, outputs)
        n = len(z)
        conf = decision_margin(task, z) if task.threshold is not None else np.ones(n)
        return OutputStats(conf, output_summary(task, z), np.zeros(n, np.int64), z)
    lp = as_log_probs(outputs, kind)
    p = np.exp(lp)
    entropy = -(p * lp).sum(-1).mean(axis=1)
    return OutputStats(p.max(-1).mean(axis=1), np.maximum(entropy, 0.0), lp[:, 0].argmax(-1), lp)


def input_features(x: np.ndarray, n_features: int) -> np.ndarray:
    """``[N, ...]`` -> ``[N, min(D, n_features)]``: means of contiguous groups of the D values."""
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    d = flat.shape[1]
    if d <= n_features:
        return flat
    starts = np.linspace(0, d, n_features + 1).astype(np.int64)[:-1]
    counts = np.diff(np.append(starts, d))
    return np.add.reduceat(flat, starts, axis=1) / counts


@dataclass
class _Kept:
    """A sample kept as a dispute candidate (inputs are kept only for these)."""

    ref: str
    x: np.ndarray | ModelInputs  # one sample; a ModelInputs is a batch of one
    confidence: float
    model_class: int
    base_class: int | None = None
    disagreement: float | None = None
    output: np.ndarray | None = None  # the served output, flattened: kinds without classes only


class DriftWindow:
    """Accumulates live samples for one window; memory bounded by the settings, not by traffic.

    Keeps per-sample confidence/entropy, running input feature sums, and the inputs of at
    most ``max_disputed`` disagreeing plus ``max_disputed`` least-confident samples.
    """

    def __init__(self, settings: DriftSettings, opened_at: float, kind: OutputKind = "logits",
                 task: TaskSpec | None = None) -> None:
        """``task``: the metric of the agreement check (toco_core.task_kind; None: a classifier)."""
        self.settings, self.kind, self.opened_at = settings, kind, opened_at
        self.task = task or CLASSIFIER
        self.closed_at: float | None = None
        self.count = 0
        self._conf: list[np.ndarray] = []
        self._ent: list[np.ndarray] = []
        self._agree: list[np.ndarray] = []
        self._correct: list[bool] = []
        self._feat_sum: np.ndarray | None = None
        self._sum = self._sumsq = 0.0
        self._n_values = 0
        self._top1: dict[str, int] = {}
        self._low: list[tuple[float, int, _Kept]] = []  # max-heap on confidence via negation
        self._disagree: list[tuple[float, int, _Kept]] = []

    def add(self, x: Batch, outputs: np.ndarray, base_outputs: np.ndarray | None = None,
            labels: np.ndarray | None = None, refs: list[str] | None = None) -> None:
        """Add a batch: inputs ``[N, ...]`` (or a ModelInputs: statistics read every input's values,
        flattened and joined), model outputs, optional base outputs and labels.

        ``refs`` name the samples (e.g. request ids) for feedback and disputed-sample lists.
        Raises PoolError when the batch sizes or output shapes differ.
        """
        n = len(x)
        refs = refs if refs is not None else [f"s{self.count + i}" for i in range(n)]
        for name, arr in (("outputs", outputs), ("base_outputs", base_outputs), ("labels", labels), ("refs", refs)):
            if arr is not None and len(arr) != n:
                raise PoolError(f"{name} has {len(arr)} rows for {n} inputs", "pass one row per input")
        if base_outputs is not None and np.shape(base_outputs) != np.shape(outputs):
            raise PoolError(f"base outputs {np.shape(base_outputs)} differ from outputs {np.shape(outputs)}",
                            "shadow-run the base model on the same batch")
        # Everything is computed before anything is recorded, so a bad batch leaves no trace.
        st = output_stats(outputs, self.kind, self.task)
        flat = flat_values(x)
        feats = input_features(flat, self.settings.input_features)
        xv = np.asarray(flat, dtype=np.float64)
        base_top1: np.ndarray | None = None
        dis: np.ndarray | None = None
        if base_outputs is not None:
            base_st = output_stats(base_outputs, self.kind, self.task)
            dis = sample_disagreement(self.task, base_st.log_probs, st.log_probs)
            base_top1 = base_st.top1
            self._agree.append(1.0 - dis)
        self._conf.append(st.confidence)
        self._ent.append(st.entropy)
        self._feat_sum = feats.sum(0) if self._feat_sum is None else self._feat_sum + feats.sum(0)
        self._sum += float(xv.sum())
        self._sumsq += float((xv * xv).sum())
        self._n_values += xv.size
        for i in range(n):
            if self.task.kind is not TaskKind.CLASSIFIER:
                pass  # labels are classes: no accuracy for the other task kinds
            elif labels is not None:
                self._correct.append(int(st.top1[i]) == int(labels[i]))
            elif len(self._top1) < 4 * self.settings.window_max_samples:  # awaits feedback
                self._top1[refs[i]] = int(st.top1[i])
            # the input as served (each input of a several-input model in its own dtype) for uploads
            sample = x[i] if isinstance(x, ModelInputs) else np.asarray(x[i])
            kept = _Kept(refs[i], sample, float(st.confidence[i]), int(st.top1[i]))
            if self.task.kind is not TaskKind.CLASSIFIER:  # no class to report: the output itself is the answer
                kept.output = np.asarray(outputs[i], dtype=np.float32).reshape(-1)
            if dis is not None and base_top1 is not None:
                kept.base_class, kept.disagreement = int(base_top1[i]), float(dis[i])
                if dis[i] > 0:
                    self._push(self._disagree, kept)
            self._push(self._low, kept)
        self.count += n

    def add_feedback(self, ref: str, label: int) -> bool:
        """Record a ground-truth label for a sample of this window; False if the ref is unknown."""
        top1 = self._top1.pop(ref, None)
        if top1 is None:
            return False
        self._correct.append(top1 == int(label))
        return True

    def should_close(self, now: float) -> bool:
        """Full, or old enough with at least the minimum count."""
        s = self.settings
        return self.count >= s.window_max_samples or (
            self.count >= s.window_min_samples and now - self.opened_at >= s.window_seconds)

    def _push(self, heap: list[tuple[float, int, _Kept]], kept: _Kept) -> None:
        """Keep the ``max_disputed`` least confident: heap[0] is the most confident kept one."""
        item = (-kept.confidence, id(kept), kept)
        if len(heap) < self.settings.max_disputed:
            heapq.heappush(heap, item)
        elif heap and item > heap[0]:
            heapq.heapreplace(heap, item)
        else:
            return
        # a view would keep the caller's whole batch alive
        if isinstance(kept.x, ModelInputs):
            kept.x = ModelInputs({k: v.copy() for k, v in kept.x.arrays.items()})
        elif kept.x.base is not None:
            kept.x = kept.x.copy()
        if kept.output is not None and kept.output.base is not None:
            kept.output = kept.output.copy()

    # Read-only views used by evaluate_window.
    def confidences(self) -> np.ndarray:
        """Per-sample confidence of all samples so far."""
        return np.concatenate(self._conf) if self._conf else np.zeros(0)

    def entropies(self) -> np.ndarray:
        """Per-sample entropy (nats) of all samples so far."""
        return np.concatenate(self._ent) if self._ent else np.zeros(0)

    def agreements(self) -> np.ndarray:
        """Per-sample agreement with the base on the shadowed samples."""
        return np.concatenate(self._agree) if self._agree else np.zeros(0)

    def correct(self) -> np.ndarray:
        """Per-label correctness (bool) of labeled samples."""
        return np.asarray(self._correct, dtype=bool)

    def feature_mean(self) -> np.ndarray | None:
        """Mean input feature vector, None before the first sample."""
        return None if self._feat_sum is None else self._feat_sum / max(self.count, 1)

    def input_moments(self) -> tuple[float, float]:
        """Mean and std over every input value."""
        m = self._sum / max(self._n_values, 1)
        return m, float(np.sqrt(max(self._sumsq / max(self._n_values, 1) - m * m, 0.0)))

    def dispute_candidates(self) -> tuple[list[_Kept], list[_Kept]]:
        """(disagreeing, least confident) kept samples, each sorted by confidence ascending."""
        key = lambda k: k.confidence  # noqa: E731
        return sorted((k for *_, k in self._disagree), key=key), sorted((k for *_, k in self._low), key=key)

    def inputs_of(self, refs: list[str]) -> Batch:
        """Stack the kept inputs of ``refs`` (disputed samples); ``[len(refs), ...]`` or a ModelInputs."""
        kept = {k.ref: k.x for *_, k in [*self._disagree, *self._low]}
        missing = [r for r in refs if r not in kept]
        if missing:
            raise PoolError(f"inputs of {missing[:3]} were not kept by this window", "ask for disputed refs only")
        if refs and isinstance(kept[refs[0]], ModelInputs):
            return concat(kept[r] for r in refs)
        return np.stack([np.asarray(kept[r]) for r in refs]) if refs else np.zeros((0,))
