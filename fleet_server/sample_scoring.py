"""Classify the alert of a box that shadows nothing, from its uploaded samples.

Such a box (no base model on board, or shadow_fraction 0) cannot measure agreement, so it
cannot tell fidelity drift from data drift. Its alert is ``classifying``: the server asked for
the window's disputed inputs, and here runs the fp32 base on them and compares with the class
the box's model gave each (DisputedRef.model_class). The disputed inputs are the box's least
confident ones, so this agreement is a pessimistic one: when even it holds, the compressed model
agrees with the base and the alert is data drift.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from sqlalchemy import select

from fleet_server.db import DriftAlertRow, ModelRow, SampleRow
from fleet_server.drift_alerts import decide
from fleet_server.drift_classify import Verdict, agreement_upper_bound
from toco_core.drift_kind import DATA, FIDELITY
from toco_core.runtime import input_dtype, make_session

log = logging.getLogger("toco.fleet.scoring")
MIN_SCORED = 8


def _inputs(rows: list[SampleRow], dtype: np.dtype) -> np.ndarray:
    # in the base input's own dtype: a uint8 camera model refuses float32 and fails every score
    return np.stack([np.frombuffer(r.data, dtype=np.dtype(r.dtype).newbyteorder("<")).reshape(r.shape)
                     for r in rows]).astype(dtype)


class SampleScorer:
    """Scores ``classifying`` alerts on the policy's tick (see the module docstring)."""

    def __init__(self, *, budget: float, margin: float, wait_s: float) -> None:
        """``wait_s``: how long to wait for samples before classifying on what arrived (then: data)."""
        self.floor, self.wait_s = 1.0 - budget - margin, wait_s
        self._sessions: dict[str, object] = {}

    def base_session(self, s, model_id: str):
        """The base model's inference session (kept per model). Raises ModelError when it does not load."""
        if model_id not in self._sessions:
            path = s.get(ModelRow, model_id).path
            with open(path, "rb") as f:
                self._sessions[model_id] = make_session(f.read(), 1)
        return self._sessions[model_id]

    def score(self, s, alert: DriftAlertRow) -> tuple[float, int] | None:
        """(agreement of the box's classes with the base, samples scored), None without samples."""
        disputed = {d["ref"]: d["model_class"] for d in (alert.evidence or {}).get("disputed", [])}
        rows = [r for r in s.scalars(select(SampleRow).where(SampleRow.device_id == alert.device_id,
                                                             SampleRow.t >= alert.created_at - 60))
                if r.ref in disputed]
        if not rows:
            return None
        if alert.model_id is None:
            raise ValueError("the alert names no model to score its samples against")
        sess = self.base_session(s, alert.model_id)
        inp = sess.get_inputs()[0]
        out = sess.run(None, {inp.name: _inputs(rows, input_dtype(inp))})[0]
        if out.ndim == 2:
            base = out.reshape(len(rows), -1).argmax(-1)
        else:
            base = out.reshape(len(rows), -1, out.shape[-1])[:, 0].argmax(-1)
        agree = float(np.mean([int(b) == int(disputed[r.ref]) for b, r in zip(base, rows, strict=True)]))
        return agree, len(rows)

    def tick(self, s, policy, now: float, after: list) -> None:
        """Classify each ``classifying`` alert whose samples are in, or that waited ``wait_s``."""
        for alert in s.scalars(select(DriftAlertRow).where(DriftAlertRow.status == "classifying")):
            try:
                got = self.score(s, alert)
            except Exception as exc:  # a base that does not load: the operator decides
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
