"""Engine hook -> DriftMonitor -> DriftMessage on the drift topic, disputed inputs on samples.

The inference hook only queues (the request thread must not wait); one worker thread
gathers what arrives within ``gather_s``, shadow-runs the base model on a sampled fraction,
feeds the monitor in batches and publishes every closed window. The base model's session is
loaded on the first shadow run (only while enough memory stays free) and dropped after
``shadow_idle_s`` without traffic: a box idles most of the day, and the session is most of the
agent's memory beyond the serving model's. Without a base session the agreement check stays
unjudged and the disputed inputs (lowest confidence) go to the server, which can shadow them
itself. Disputed inputs of the last windows are kept in memory for ``upload-samples`` commands;
with ``upload_samples`` they are also sent right after a window that was out of band, in
batches of at most ``batch_bytes``.
"""

from __future__ import annotations

import base64
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, get_args

import numpy as np
import psutil

from toco_core.drift import DisputedSample, DriftReference, DriftReport, DriftSettings
from toco_core.drift_monitor import DriftMonitor, WindowResult
from toco_core.errors import PoolError
from toco_core.messages import AgentMessage, DriftMessage, Sample, SampleDtype, SamplesMessage, UploadSamplesCommand
from toco_core.model_inputs import Batch, ModelInputs, concat, feed
from toco_core.runtime import make_session

if TYPE_CHECKING:
    import onnxruntime as ort

log = logging.getLogger("toco.agent.drift")
Send = Callable[[AgentMessage], bool]
_STOP = object()
_SAMPLE_OVERHEAD = 200  # JSON field names and quoting around one sample's base64


def scored_values(outputs: dict[str, np.ndarray], name: str | None) -> np.ndarray | None:
    """The output drift statistics are about.

    Takes the served model's outputs by name and the reference's scored output (None: a reference
    made before output selection, which described the first output). Returns that array, or None
    when the served model does not output the tensor (the probabilities of a ZipMap'd export are
    internal to it).
    """
    if name is None:
        return next(iter(outputs.values()))
    return outputs.get(name)


class DriftReporter:
    """Watches the serving model's traffic; see the module docstring."""

    def __init__(self, send: Send, device_id: str, settings: DriftSettings, upload_samples: bool = False,
                 batch_bytes: int = 256 * 1024, shadow_min_free: int = 128 * 1024**2, threads: int = 1,
                 queue_size: int = 1024, seed: int | None = None, shadow_idle_s: float = 60.0,
                 release: Callable[[], None] = lambda: None, gather_s: float = 0.05) -> None:
        self.send, self.device_id, self.settings = send, device_id, settings
        self.upload_samples, self.batch_bytes, self.shadow_min_free = upload_samples, batch_bytes, shadow_min_free
        self.threads, self.seed, self.shadow_idle_s, self.release = threads, seed, shadow_idle_s, release
        self.gather_s = gather_s
        self.dropped = 0
        self.unscored = 0  # batches not observed: the served model does not output the scored tensor
        self.last_report: DriftReport | None = None
        self.on_report: Callable[[DriftReport], None] = lambda report: None
        self._bundle_id: str | None = None
        self._monitor: DriftMonitor | None = None
        self._base: ort.InferenceSession | None = None  # the shadow session, while in use
        self._base_model: bytes | None = None  # what it is made from; None: no shadow run
        self.shadow_mode = "none"  # what the shadow runs: fp32 (the base), master, none
        self._base_used = 0.0
        # window -> (disputed, inputs)
        self._kept: OrderedDict[int, tuple[list[DisputedSample], Batch]] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._worker = threading.Thread(target=self._loop, name="drift-worker", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- wiring
    def attach(self, bundle_id: str | None, reference: DriftReference | None, base_model: bytes | None,
               shadow_mode: str = "fp32") -> None:
        """Watch a newly served model: fresh monitor from its reference; ``base_model`` for shadow runs.

        With no reference (a model installed by hand) drift is not monitored; with no base model
        (or shadow_fraction 0) the agreement check stays unjudged, and drift relies on the
        confidence, entropy and input checks plus the uploaded samples, which the server scores
        against the fp32 base. ``shadow_mode`` says what ``base_model`` is (fp32 or master).
        """
        with self._lock:
            self.shadow_mode = shadow_mode if base_model is not None and self.settings.shadow_fraction > 0 else "none"
            self._bundle_id = bundle_id
            # the field windows outlive the bundle: after a redeploy for these inputs, the server's
            # rebase-drift command moves the new reference onto them (toco_core.drift_rebase)
            field = self._monitor.field if self._monitor is not None else None
            self._monitor = DriftMonitor(reference, self.settings, seed=self.seed, field=field) if reference else None
            self._base = None
            self._base_model = base_model if self.settings.shadow_fraction > 0 else None
            self._kept.clear()

    @property
    def shadowing(self) -> bool:
        """Whether the base model is shadow-run on sampled inputs (its session may be idle-dropped)."""
        return self._base_model is not None

    @property
    def shadow_loaded(self) -> bool:
        """Whether the shadow session is in memory now."""
        return self._base is not None

    def hook(self, x: Batch, outputs: dict[str, np.ndarray], request_id: str) -> None:
        """InferenceEngine hook: queue the batch (dropped and counted when the queue is full)."""
        monitor = self._monitor
        if monitor is None:
            return
        out = scored_values(outputs, monitor.reference.scored_output)
        if out is None:  # the scored tensor is internal to the served model (a ZipMap'd export)
            self.unscored += 1
            return
        try:
            self._queue.put_nowait(("observe", x, out, request_id))
        except queue.Full:
            self.dropped += 1

    def feedback(self, request_id: str, labels: list[int]) -> None:
        """InferenceEngine feedback hook: labels for the samples of a recent request."""
        self._queue.put(("feedback", request_id, labels))

    def tick(self) -> None:
        """Close a window on time alone (call periodically)."""
        self._queue.put(("tick",))

    def close(self) -> None:
        """Stop the worker."""
        self._queue.put(_STOP)
        self._worker.join(5)

    # ---------------------------------------------------------------- worker
    def _loop(self) -> None:
        while True:
            items = [self._queue.get()]
            if items[0] is not _STOP and items[0][0] == "observe":
                items += self._gather()
            stop = _STOP in items
            try:
                self._handle_all([i for i in items if i is not _STOP])
            except Exception:  # drift watching must never take the agent down
                log.exception("drift worker step failed")
            if stop:
                return

    def _gather(self) -> list[Any]:
        """Whatever else arrives within ``gather_s``: the monitor then works on one batch, not on
        every request, which keeps this thread off the interpreter lock the request threads need."""
        items: list[Any] = []
        deadline = time.monotonic() + self.gather_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            items.append(item)
            if item is _STOP:
                break
        return items

    def _handle_all(self, items: list[Any]) -> None:
        """Handle queued items in order; consecutive observations go to the monitor together."""
        observed: list[tuple[Any, ...]] = []
        for item in items:
            if item[0] == "observe":
                observed.append(item)
                continue
            self._observe(observed)
            observed = []
            self._handle(item)
        self._observe(observed)

    def _shadow_session(self) -> ort.InferenceSession | None:
        """The base model's session for a shadow run, loaded on first need; None when it cannot be.

        Worker thread only. Too little free memory skips this run (memory may free up later);
        a base model that does not load disables shadowing for this bundle.
        """
        with self._lock:
            base, model = self._base, self._base_model
        if base is None and model is not None:
            free = psutil.virtual_memory().available
            if free - 4 * len(model) < self.shadow_min_free:
                log.debug("not enough free memory for the shadow run", extra={"fields": {"free": free}})
                return None
            try:
                base = make_session(model, self.threads)
            except Exception as exc:  # no shadow is a degraded mode, not a failure
                log.warning("base model does not load for the shadow run", extra={"fields": {"error": str(exc)}})
                with self._lock:
                    if self._base_model is model:
                        self._base_model = None
                return None
            with self._lock:
                if self._base_model is not model:  # a new model was attached meanwhile
                    return None
                self._base = base
        self._base_used = time.monotonic()
        return base

    def _drop_idle_shadow(self) -> None:
        if self._base is None or time.monotonic() - self._base_used < self.shadow_idle_s:
            return
        with self._lock:
            self._base = None
        self.release()
        log.debug("shadow session dropped after idle time")

    def _handle(self, item: tuple[Any, ...]) -> None:
        """A tick (closes a window on time, drops an idle shadow) or feedback labels."""
        if item[0] == "tick":
            self._drop_idle_shadow()
        with self._lock:
            monitor, bundle_id = self._monitor, self._bundle_id
        if monitor is None:
            return
        if item[0] == "feedback":
            _, rid, labels = item
            for i, label in enumerate(labels):
                monitor.feedback(f"{rid}.{i}", int(label))
            return
        result = monitor.tick()
        if result is not None:
            self._publish(result, bundle_id)

    def _observe(self, items: list[tuple[Any, ...]]) -> None:
        """Feed observed requests to the monitor, a window's worth at a time.

        A group ends with the request that fills the open window, so windows close where they
        would have one request at a time. Inside a group the shadowed requests (with base
        outputs) and the others are added as two batches, the one holding the filling request last.
        """
        with self._lock:
            monitor, bundle_id = self._monitor, self._bundle_id
        if monitor is None or not items:
            return
        group: list[tuple[Any, ...]] = []
        room = monitor.room()
        for item in items:
            group.append(item)
            room -= len(item[1])
            if room <= 0:
                self._observe_group(monitor, bundle_id, group)
                group, room = [], monitor.room()
        self._observe_group(monitor, bundle_id, group)

    def _observe_group(self, monitor: DriftMonitor, bundle_id: str | None, group: list[tuple[Any, ...]]) -> None:
        if not group:
            return
        shadowed: list[tuple[Any, ...]] = []
        plain: list[tuple[Any, ...]] = []
        for item in group:
            base = self._shadow_session() if monitor.should_shadow() else None
            if base is None:
                plain.append(item)
            else:
                scored = monitor.reference.scored_output
                shadowed.append((*item, base.run(None if scored is None else [scored],
                                                 feed(item[1], [i.name for i in base.get_inputs()]))[0]))
        last = group[-1][3]
        batches = sorted((b for b in (shadowed, plain) if b), key=lambda b: b[-1][3] == last)
        for batch in batches:
            x = concat(i[1] for i in batch)
            out = np.concatenate([i[2] for i in batch])
            base_out = np.concatenate([i[4] for i in batch]) if batch is shadowed else None
            refs = [f"{i[3]}.{k}" for i in batch for k in range(len(i[1]))]
            try:
                result = monitor.observe(x, out, base_out, refs=refs)
            except (PoolError, ValueError) as exc:  # ValueError: requests shaped unlike each other
                log.warning("input not usable for drift", extra={"fields": {"error": str(exc)}})
                continue
            if result is not None:
                self._publish(result, bundle_id)

    def _publish(self, result: WindowResult, bundle_id: str | None) -> None:
        report = result.report
        self.last_report = report
        with self._lock:
            self._kept[report.window_index] = (report.disputed, result.disputed_inputs)
            while len(self._kept) > self.settings.history:
                self._kept.popitem(last=False)
        self.send(DriftMessage.from_report(report, device_id=self.device_id, bundle_id=bundle_id))
        log.info("drift window closed", extra={"fields": {"window": report.window_index, "alert": report.alert,
                                                          "out_of_band": ",".join(report.out_of_band)}})
        if self.upload_samples and report.out_of_band and report.disputed:
            self.upload(UploadSamplesCommand(cmd_id=f"auto-{report.window_index}", window=report.window_index,
                                             max_bytes=self.batch_bytes))
        try:
            self.on_report(report)
        except Exception:
            log.exception("drift report callback failed")

    def rebase(self, windows: int) -> DriftReference:
        """Move the served model's drift reference onto the last ``windows`` closed windows.

        Returns the new reference (the caller stores it). Raises PoolError when no model is
        watched or no window closed yet.
        """
        with self._lock:
            monitor = self._monitor
        if monitor is None:
            raise PoolError("no served model is watched for drift", "deploy a bundle first")
        return monitor.rebase(windows)

    # ---------------------------------------------------------------- samples
    def upload(self, cmd: UploadSamplesCommand) -> int:
        """Send the kept disputed inputs a command asks for (by window and/or refs); returns samples sent."""
        with self._lock:
            kept = list(self._kept.items())
        wanted = set(cmd.refs or [])
        samples: list[Sample] = []
        for window, (disputed, inputs) in kept:
            if cmd.window is not None and window != cmd.window:
                continue
            for d, x in zip(disputed, inputs, strict=True):
                if wanted and d.ref not in wanted:
                    continue
                # several inputs: one Sample per input, ref "REF/NAME" (the server joins them again)
                parts = {f"{d.ref}/{k}": v[0] for k, v in x.arrays.items()} if isinstance(x, ModelInputs) \
                    else {d.ref: x}
                samples += [_sample(ref, arr, d.reason) for ref, arr in parts.items()]
        limit = min(cmd.max_bytes, self.batch_bytes)
        batches: list[list[Sample]] = [[]]
        size = 0
        for s in samples:
            cost = len(s.data_b64) + _SAMPLE_OVERHEAD
            if batches[-1] and size + cost > limit:
                batches.append([])
                size = 0
            batches[-1].append(s)
            size += cost
        for i, batch in enumerate(batches):
            self.send(SamplesMessage(device_id=self.device_id, cmd_id=cmd.cmd_id, window=cmd.window, batch=i,
                                     last=i == len(batches) - 1, samples=batch))
        return len(samples)


def _sample(ref: str, x: np.ndarray, reason: str) -> Sample:
    """One uploaded input in its own dtype: the server re-analyses with these very values
    (uint8 camera bytes cast to float32 would be 4x the upload and a different input)."""
    arr = np.asarray(x)
    if arr.dtype.name not in get_args(SampleDtype):
        arr = arr.astype(np.float32)
    wire = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return Sample(ref=ref, dtype=arr.dtype.name, shape=list(arr.shape),
                  data_b64=base64.b64encode(wire.tobytes()).decode(), reason=reason)
