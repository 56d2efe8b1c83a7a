"""The live drift monitor: samples into windows, each closed window judged, an alert after K in a row.

The statistics and the bands are toco_core.drift's; the window is toco_core.drift_window's.
This holds the state between windows (the out-of-band streak, the history) and is what the
agent feeds from its inference path.
"""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from toco_core.drift import DriftReference, DriftReport, DriftSettings, evaluate_window
from toco_core.drift_kind import classify
from toco_core.drift_rebase import FIELD_WINDOWS, FieldSummary, rebase, summarise
from toco_core.drift_window import DriftWindow
from toco_core.errors import PoolError
from toco_core.model_inputs import Batch, flat_values


@dataclass(frozen=True)
class WindowResult:
    """A closed window: its report and the inputs of its disputed samples (same order)."""

    report: DriftReport
    disputed_inputs: Batch


class DriftMonitor:
    """Feeds live samples into windows, judges each closed window, alerts after K in a row.

    Thread-safe. ``should_shadow()`` draws whether the caller should also run the base model
    on the next input (probability ``shadow_fraction``, seeded).
    """

    def __init__(self, reference: DriftReference, settings: DriftSettings | None = None,
                 seed: int | None = None, now: float | None = None,
                 field: deque[FieldSummary] | None = None) -> None:
        """``field``: summaries of earlier closed windows to keep (a new bundle's monitor inherits
        the previous one's, so the box can rebase on the inputs that made it drift)."""
        self.reference, self.settings = reference, settings or DriftSettings()
        self.history: deque[DriftReport] = deque(maxlen=self.settings.history)
        self.field: deque[FieldSummary] = deque(field or (), maxlen=FIELD_WINDOWS)
        # The stdlib generator (already loaded by pydantic), not numpy's: numpy.random costs the
        # edge daemon about 2 MB resident for this one coin flip per inference.
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._streak = 0
        self._index = 0
        self.window = DriftWindow(self.settings, time.time() if now is None else now, reference.output_kind,
                                  self.reference.task)

    def should_shadow(self) -> bool:
        """True with probability ``shadow_fraction``: run the base model on this input too."""
        with self._lock:
            return bool(self._rng.random() < self.settings.shadow_fraction)

    def observe(self, x: Batch, outputs: np.ndarray, base_outputs: np.ndarray | None = None,
                labels: np.ndarray | None = None, refs: list[str] | None = None,
                now: float | None = None) -> WindowResult | None:
        """Add a batch; returns the WindowResult when this batch closed the window, else None.

        Raises PoolError when the samples are shaped unlike the reference's (nothing is added).
        """
        now = time.time() if now is None else now
        shape = tuple(np.shape(flat_values(x))[1:])  # several inputs: one flat row of values per sample
        if shape != tuple(self.reference.sample_shape):
            want = list(self.reference.sample_shape)
            raise PoolError(f"drift samples have shape {list(shape)}, the reference {want}",
                            "feed the monitor the model's inputs, batch axis first")
        with self._lock:
            self.window.add(x, outputs, base_outputs, labels, refs)
            return self._maybe_close(now)

    def room(self) -> int:
        """Samples the open window takes before it closes on count."""
        with self._lock:
            return self.settings.window_max_samples - self.window.count

    def feedback(self, ref: str, label: int) -> bool:
        """Attach a label to a sample of the open window; False when it is not (or no longer) there."""
        with self._lock:
            return self.window.add_feedback(ref, label)

    def tick(self, now: float | None = None) -> WindowResult | None:
        """Close the window on time alone (call it periodically when traffic is sparse)."""
        with self._lock:
            return self._maybe_close(time.time() if now is None else now)

    def rebase(self, windows: int = FIELD_WINDOWS, now: float | None = None) -> DriftReference:
        """Judge from now on against a reference moved onto the last ``windows`` closed windows.

        The out-of-band streak restarts and the open window is dropped (it was judged against the
        old reference). Returns the new reference. Raises PoolError when no window closed yet.
        """
        with self._lock:
            recent = list(self.field)[-max(windows, 1):]
            self.reference = rebase(self.reference, recent, self.settings)
            self._streak = 0
            self.window = DriftWindow(self.settings, time.time() if now is None else now,
                                      self.reference.output_kind, self.reference.task)
            return self.reference

    @property
    def alerting(self) -> bool:
        """Whether the last K closed windows were all out of band."""
        return self._streak >= self.settings.consecutive_windows

    def _maybe_close(self, now: float) -> WindowResult | None:
        if not self.window.should_close(now):
            return None
        window = self.window
        self.window = DriftWindow(self.settings, now, self.reference.output_kind, self.reference.task)
        report = evaluate_window(window, self.reference, self.settings, closed_at=now)
        self._streak = self._streak + 1 if report.out_of_band else 0
        report = report.model_copy(update={"window_index": self._index, "consecutive_out_of_band": self._streak,
                                           "alert": self.alerting})
        report = report.model_copy(update={"kind": classify(report)})
        summary = summarise(window)
        if summary is not None:
            self.field.append(summary)
        self._index += 1
        self.history.append(report)
        inputs = window.inputs_of([d.ref for d in report.disputed])
        return WindowResult(report, inputs)
