"""Classify the alert of a box that shadows nothing, from its uploaded samples.

Such a box (no base model on board, or shadow_fraction 0) cannot measure agreement, so it
cannot tell fidelity drift from data drift. Its alert is ``classifying``: the server asked for
the window's disputed inputs, and here runs the fp32 base on them and compares its answer with
the box's, in the task kind of the bundle's analysis (toco_core.task_kind):

- a classifier: the box's class (DisputedRef.model_class) against the base's top-1;
- a regression, score or embedding has no class: the box reports its model's output for each
  disputed sample (DisputedRef.output), and the two outputs agree when the kind's metric says
  so (relative error within the tolerance and, for a thresholded score, the same decision;
  cosine above its floor). A sample reported without its output (an agent older than the
  field, or an output too wide to send) is not scored; when no sample can be, the operator
  decides.

The disputed inputs are the box's least sure ones (a classifier's least confident, a thresholded
score's nearest its decision; a regression's or an embedding's are any of the window's), so this
agreement is a pessimistic one: when even it holds, the compressed model agrees with the base
and the alert is data drift.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
from sqlalchemy import select

from fleet_server.db import AnalysisRow, BundleRow, DriftAlertRow, ModelRow, SampleRow
from fleet_server.drift_alerts import decide
from fleet_server.drift_classify import Verdict, agreement_upper_bound
from toco_core.analysis_result import AnalysisManifest
from toco_core.drift_kind import DATA, FIDELITY
from toco_core.onnx_model import load_model
from toco_core.output_tail import fidelity_view
from toco_core.runtime import input_dtype, make_session
from toco_core.task_kind import CLASSIFIER, TaskKind, TaskSpec, prepare, sample_disagreement

log = logging.getLogger("toco.fleet.scoring")
MIN_SCORED = 8


class Unscorable(ValueError):
    """The alert's samples cannot be compared with the base (the operator decides)."""


def _inputs(rows: list[SampleRow], dtype: np.dtype) -> np.ndarray:
    # in the base input's own dtype: a uint8 camera model refuses float32 and fails every score
    return np.stack([np.frombuffer(r.data, dtype=np.dtype(r.dtype).newbyteorder("<")).reshape(r.shape)
                     for r in rows]).astype(dtype)


def sample_agreement(task: TaskSpec, base_out: np.ndarray, box: list) -> float:
    """Share of disputed samples on which the box's answer agrees with the base's, in the task's metric.

    Takes the task spec, the base's scored output ``[N, ...]`` on the samples, and per sample
    what the box reported: its class (an int) for a classifier, else its output values (a list,
    flattened). Classifier: share with top-1 of the base (first position) == the box's class
    (the same top-1 whatever the output form: logits, probabilities or log-probabilities).
    Other kinds: 1 - mean sample_disagreement of the prepared outputs (toco_core.task_kind).
    Raises Unscorable when an output's size differs from the base's.
    """
    if task.kind is TaskKind.CLASSIFIER:
        out = np.asarray(base_out)
        top1 = out.reshape(len(out), -1).argmax(-1) if out.ndim == 2 else \
            out.reshape(len(out), -1, out.shape[-1])[:, 0].argmax(-1)
        return float(np.mean([int(b) == int(c) for b, c in zip(top1, box, strict=True)]))
    base = np.asarray(base_out, dtype=np.float64).reshape(len(base_out), -1)
    sizes = {len(v) for v in box}
    if sizes != {base.shape[1]}:
        raise Unscorable(f"the box reported outputs of {sorted(sizes)} values, the base gives {base.shape[1]}")
    served = np.asarray(box, dtype=np.float64)
    dis = sample_disagreement(task, prepare(task, base), prepare(task, served))
    return float(1.0 - dis.mean())


class SampleScorer:
    """Scores ``classifying`` alerts on the policy's tick (see the module docstring)."""

    def __init__(self, *, budget: float, margin: float, wait_s: float) -> None:
        """``wait_s``: how long to wait for samples before classifying on what arrived (then: data)."""
        self.floor, self.wait_s = 1.0 - budget - margin, wait_s
        self._sessions: dict[tuple[str, str | None], object] = {}
        self._manifests: dict[str, AnalysisManifest | None] = {}

    def manifest(self, s, bundle_id: str | None) -> AnalysisManifest | None:
        """The analysis manifest of the bundle an alert is about (kept per bundle); None when the
        server has no such bundle or analysis on disk: the sample is then judged as a classifier's."""
        if bundle_id is None:
            return None
        if bundle_id not in self._manifests:
            bundle = s.get(BundleRow, bundle_id)
            analysis = None if bundle is None else s.get(AnalysisRow, bundle.analysis_id)
            path = None if analysis is None or not analysis.result_dir else Path(analysis.result_dir) / "manifest.json"
            self._manifests[bundle_id] = AnalysisManifest.model_validate(json.loads(path.read_text())) \
                if path is not None and path.is_file() else None
        return self._manifests[bundle_id]

    def base_session(self, s, model_id: str, scored: str | None = None):
        """The base model's inference session at its scored tensor (toco_core.output_tail; None: the
        first output), kept per model and tensor. Raises ModelError when it does not load."""
        key = (model_id, scored)
        if key not in self._sessions:
            path = s.get(ModelRow, model_id).path
            if scored is None:
                with open(path, "rb") as f:
                    self._sessions[key] = make_session(f.read(), 1)
            else:  # the scored tensor may be internal (a label tail after it): run the head up to it
                self._sessions[key] = make_session(fidelity_view(load_model(Path(path)), scored), 1)
        return self._sessions[key]

    def score(self, s, alert: DriftAlertRow) -> tuple[float, int] | None:
        """(agreement of the box's answers with the base's, samples scored), None without samples.

        Raises Unscorable when the alert's model has no classes and the box reported no output
        for any of its disputed samples, or ModelError when the base does not load.
        """
        manifest = self.manifest(s, alert.bundle_id)
        task = (manifest.task if manifest is not None else None) or CLASSIFIER
        disputed = (alert.evidence or {}).get("disputed", [])
        if task.kind is TaskKind.CLASSIFIER:
            answers = {d["ref"]: d["model_class"] for d in disputed}
        else:
            answers = {d["ref"]: d["output"] for d in disputed if d.get("output") is not None}
            if disputed and not answers:
                raise Unscorable(f"the box reported no model output for its {task.kind.value} samples "
                                 "(an agent older than DisputedRef.output, or an output too wide to send)")
        rows = [r for r in s.scalars(select(SampleRow).where(SampleRow.device_id == alert.device_id,
                                                             SampleRow.t >= alert.created_at - 60))
                if r.ref in answers]
        if not rows:
            return None
        if alert.model_id is None:
            raise ValueError("the alert names no model to score its samples against")
        sess = self.base_session(s, alert.model_id, None if manifest is None else manifest.scored_output)
        inp = sess.get_inputs()[0]
        out = sess.run(None, {inp.name: _inputs(rows, input_dtype(inp))})[0]
        return sample_agreement(task, out, [answers[r.ref] for r in rows]), len(rows)

    def tick(self, s, policy, now: float, after: list) -> None:
        """Classify each ``classifying`` alert whose samples are in, or that waited ``wait_s``."""
        for alert in s.scalars(select(DriftAlertRow).where(DriftAlertRow.status == "classifying")):
            try:
                got = self.score(s, alert)
            except Exception as exc:  # a base that does not load, outputs to compare missing: the operator decides
                log.warning("samples not scored", extra={"fields": {"alert": alert.id, "error": str(exc)}})
                decide(alert, "open", f"samples could not be scored against the base ({exc}): operator decides")
                continue
            if (got is None or got[1] < MIN_SCORED) and now - alert.created_at < self.wait_s:
                continue
            if got is None:
                v = Verdict(DATA, "no samples arrived to score: treated as data drift (no automatic re-analysis)")
            elif agreement_upper_bound(got[0], got[1]) < self.floor:
                v = Verdict(FIDELITY, f"the server scored {got[1]} samples: agreement with the base {got[0]:.0%}")
            else:
                v = Verdict(DATA, f"the server scored {got[1]} samples: agreement with the base {got[0]:.0%} holds")
            policy.classified(s, alert, v, after)
            alert.updated_at = time.time()
