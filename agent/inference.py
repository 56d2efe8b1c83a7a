"""The inference engine: the active onnxruntime session, hot swap, hooks, counters.

Usable as a plain Python API (``engine.infer(x)``) and served over HTTP by
``agent.inference_api``. One ``_Loaded`` snapshot (session + version + input spec) is
swapped as a whole; a request reads the snapshot once, so it runs entirely on the old or
entirely on the new model and reports the version that actually ran.

Trial after activation: a model loaded with ``trial=N`` is on trial for its first N runs. A
run-time error among them (onnxruntime raising on an input that passed ``check_input``: the
model's fault, not the caller's) calls ``on_trial_failure(context, version, error)`` once;
the daemon rolls back to the previous slot and reports it. After N clean runs the trial is
over and later errors are only counted and answered (500): an old, proven model is never
rolled back for one odd input, and the model rolled back to is never on trial, so a
rollback cannot turn into a loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort

from agent.inference_input import InputError, InputSpec, check_inputs, session_input_specs
from agent.latency_stats import LatencyStats
from agent.recent_requests import RecentRequests
from toco_core.errors import TocoError
from toco_core.model_inputs import Batch, feed
from toco_core.preprocessing import Preprocessing
from toco_core.runtime import make_session

log = logging.getLogger(__name__)

InferHook = Callable[[Batch, dict[str, np.ndarray], str], None]  # the inputs as checked: an array or ModelInputs
FeedbackHook = Callable[[str, list[int]], None]
TrialFailureHook = Callable[[Any, str, str], None]  # (context given to load, version, error text)

class NotReadyError(TocoError):
    """Raised when inference is asked for before a model is loaded."""


class RunError(TocoError):
    """Raised when onnxruntime fails while running the serving model on a valid input."""


class UnknownRequestError(TocoError):
    """Raised when feedback names a request id the engine does not remember."""


@dataclass
class _Trial:
    version: str
    left: int
    context: Any


class InferenceResult(NamedTuple):
    """What ``infer`` returns: outputs by ONNX output name, the model version, a request id."""

    outputs: dict[str, np.ndarray]
    model_version: str
    request_id: str


@dataclass(frozen=True)
class _Loaded:
    session: ort.InferenceSession
    version: str
    spec: InputSpec  # the first input
    specs: tuple[InputSpec, ...]  # every input, in graph order
    output_names: tuple[str, ...]
    preprocessing: Preprocessing | None


class InferenceEngine:
    """Holds the active model; ``infer`` is safe from many threads, ``load`` swaps models live.

    ``hook(x, outputs, request_id)`` runs after every successful inference in the caller's
    thread (keep it short: queue work elsewhere); its exceptions are logged, never raised.
    ``feedback_hook(request_id, labels)`` receives ground truth from ``feedback``.
    """

    def __init__(self, threads: int = 0, max_batch: int = 256, hook: InferHook | None = None,
                 feedback_hook: FeedbackHook | None = None, remember_requests: int = 10_000,
                 on_trial_failure: TrialFailureHook | None = None) -> None:
        self.threads, self.max_batch = threads, max_batch
        self.hook, self.feedback_hook, self.on_trial_failure = hook, feedback_hook, on_trial_failure
        self._trial: _Trial | None = None
        self._trial_lock = threading.Lock()
        self.stats = LatencyStats()
        self._loaded: _Loaded | None = None
        self._swap_lock = threading.Lock()
        self._requests = RecentRequests(remember_requests)

    # ------------------------------------------------------------- model
    def load(self, model: bytes, version: str, preprocessing: Preprocessing | None = None, trial: int = 0,
             context: Any = None) -> None:
        """Build a session for ``model`` and swap it in; in-flight requests finish on the old one.

        ``trial`` > 0 puts the model on trial for that many runs (module docstring);
        ``context`` is handed back to ``on_trial_failure``. Raises ModelError when onnxruntime
        cannot load it (the old model keeps serving).
        """
        session = make_session(model, self.threads)
        specs = session_input_specs(session)
        names = tuple(o.name for o in session.get_outputs())
        with self._swap_lock:
            self._loaded = _Loaded(session, version, specs[0], specs, names, preprocessing)
            with self._trial_lock:
                self._trial = _Trial(version, trial, context) if trial > 0 else None
        self.stats.count_swap()
        log.info("serving model %s", version)

    def unload(self) -> None:
        """Stop serving (readiness turns false); in-flight requests complete."""
        with self._swap_lock:
            self._loaded = None

    @property
    def ready(self) -> bool:
        """True when a model is loaded."""
        return self._loaded is not None

    @property
    def model_version(self) -> str | None:
        """Version of the serving model, None when none is loaded."""
        loaded = self._loaded
        return loaded.version if loaded else None

    @property
    def input_spec(self) -> InputSpec | None:
        """Input spec of the serving model."""
        loaded = self._loaded
        return loaded.spec if loaded else None

    @property
    def preprocessing(self) -> Preprocessing | None:
        """Image preprocessing declared with the serving model."""
        loaded = self._loaded
        return loaded.preprocessing if loaded else None

    # ------------------------------------------------------------- inference
    def infer(self, x: Any) -> InferenceResult:
        """Run the serving model on a batch ``x`` (array or nested list, batch axis first; for a model
        with several inputs a mapping of input name -> array, see inference_input.check_inputs).

        Returns InferenceResult(outputs by name, model_version, request_id).
        Raises NotReadyError without a model, InputError for a bad input.
        """
        loaded = self._loaded  # one read: the whole request uses this snapshot
        if loaded is None:
            self.stats.count_error()
            raise NotReadyError("no model is loaded yet", "wait for a deployment or check /v1/ready")
        try:
            arr = check_inputs(x, loaded.specs, self.max_batch)
        except InputError:
            self.stats.count_error()
            raise
        start = time.perf_counter()
        try:
            values = loaded.session.run(None, feed(arr, [spec.name for spec in loaded.specs]))
        except Exception as exc:  # onnxruntime's run errors share no base class
            self.stats.count_error()
            self._trial_run(loaded.version, exc)
            raise RunError(f"model {loaded.version} failed at run time: {str(exc)[:500]}",
                           "the agent rolls a newly activated model back by itself; else report it") from exc
        self.stats.record((time.perf_counter() - start) * 1e3, len(arr))
        if self._trial is not None:
            self._trial_run(loaded.version, None)
        outputs = dict(zip(loaded.output_names, values, strict=True))
        request_id = self._requests.add(len(arr))
        if self.hook is not None:
            try:
                self.hook(arr, outputs, request_id)
            except Exception:  # the hook is someone else's code: it must not fail inference
                log.exception("inference hook failed for request %s", request_id)
        return InferenceResult(outputs, loaded.version, request_id)

    @property
    def on_trial(self) -> bool:
        """True while the serving model is within its trial runs after an activation."""
        trial = self._trial
        return trial is not None and trial.version == self.model_version

    def _trial_run(self, version: str, error: Exception | None) -> None:
        """Count one run of ``version``; the first error within the trial fires on_trial_failure once."""
        with self._trial_lock:
            trial = self._trial
            if trial is None or trial.version != version:
                return
            if error is None:
                trial.left -= 1
                if trial.left <= 0:
                    self._trial = None
                    log.info("model %s passed its trial runs", version)
                return
            self._trial = None  # one report per activation, whatever happens next
        log.error("model %s failed at run time during its trial: %s", version, error)
        if self.on_trial_failure is not None:
            try:
                self.on_trial_failure(trial.context, version, str(error))
            except Exception:
                log.exception("trial failure hook failed")

    def feedback(self, request_id: str, label: int | list[int]) -> list[int]:
        """Accept ground-truth labels for a recent request (one per sample); returns them.

        Raises UnknownRequestError for an id not among the last ``remember_requests``,
        InputError when the label count differs from the request's batch size.
        """
        batch = self._requests.batch_of(request_id)
        if batch is None:
            raise UnknownRequestError(f"unknown request_id {request_id!r}",
                                      f"feedback is accepted for the last {self._requests.remember} requests only")
        labels = [label] if isinstance(label, int) else list(label)
        if len(labels) != batch:
            raise InputError(f"request {request_id} had {batch} samples, got {len(labels)} labels",
                             "send one label per sample")
        if self.feedback_hook is not None:
            self.feedback_hook(request_id, labels)
        return labels
