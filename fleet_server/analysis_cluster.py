"""Analyses on a Dask cluster: ``toco-fleet serve --executor tcp://HOST:8786``.

Why Dask (distributed): it is pure Python and light (no daemon besides its own scheduler and
worker processes), and ``Client.get_executor()`` is a ``concurrent.futures.Executor``, so a
whole analysis is submitted exactly where the local process pool takes it (fleet_server.jobs).

What crosses the wire, since a worker shares no disk with the server: the model, pool and field
sample bytes go out with the task, the analysis's result directory comes back as file bytes
that the server writes into its own analysis folder. Progress cannot use the local mp.Queue:
the worker logs structured events on the scheduler (``Worker.log_event``) and the server's client
subscribes to the topic, feeding the same progress thread. Cancellation sets a Dask ``Event`` the
worker's progress callback reads (Dask cannot interrupt a running task, see ``cancel``).

Inside an analysis the calibration's combination grid (toco_core GridMap) is spread over the
cluster too: ``cluster_grid_map`` broadcasts the measuring object (model, held-out samples) to
each worker once and submits one task per grid point. The analysis task secedes from its
worker's thread pool while it waits, so its own thread measures points as well.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from distributed import Client, Event, KilledWorker, get_worker, worker_client

from toco_core.errors import ConfigError, TocoError
from toco_core.malloc_tuning import fix_mmap_threshold

log = logging.getLogger("toco.fleet.cluster")
PROGRESS_TOPIC = "toco-analysis-progress"  # [analysis_id, phase, done, total]
START_TOPIC = "toco-analysis-start"  # [analysis_id, worker address]: one per attempt
_CANCEL_CHECK_S = 1.0  # a progress callback asks the scheduler at most this often whether to stop
_T = TypeVar("_T")
_R = TypeVar("_R")


class AnalysisCancelled(TocoError):
    """Raised inside a cluster analysis whose cancellation was asked for."""


def _cancel_event_name(analysis_id: str) -> str:
    return f"toco-cancel-{analysis_id}"


def connect(address: str, timeout: float = 10.0) -> Client:
    """A client of the Dask scheduler at ``address`` (tcp://HOST:PORT).

    Returns the connected Client (not the process default). Raises ConfigError, one line with the
    fix, when the scheduler does not answer within ``timeout`` seconds.
    """
    try:
        return Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:  # distributed wraps refused/unresolvable/timed out in OSError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"cannot reach the Dask scheduler at {address}: {reason}",
                          "start it with `dask scheduler` (and workers with `dask worker ADDRESS`), "
                          "or leave --executor unset to analyse in local processes") from None


def check_scheduler(address: str, timeout: float = 10.0) -> int:
    """Connect once to the scheduler at ``address`` and count its workers (serve's start-up check).

    Returns the number of workers connected now (0 is allowed: analyses wait for one). Raises
    ConfigError when the scheduler cannot be reached.
    """
    client = connect(address, timeout)
    try:
        return len(client.scheduler_info(n_workers=-1).get("workers", {}))
    finally:
        client.close()


# --- on a worker -----------------------------------------------------------------------------------

def _apply(fn: Callable[[_T], _R], item: _T) -> _R:
    # a worker measures grid points for many analyses; the same malloc setting as analyze() keeps
    # its RSS from creeping (toco_core.malloc_tuning)
    fix_mmap_threshold()
    return fn(item)


def cluster_grid_map(fn: Callable[[_T], _R], items: Iterable[_T]) -> Iterator[_R]:
    """toco_core GridMap over the cluster, for use inside a task: ``fn(item)`` per item as one task
    each, results yielded in the items' order.

    ``fn`` (a bound method holding the model and samples) is broadcast to every worker once. The
    calling task secedes while it waits, so its worker thread measures points too. Closing the
    iterator early (an error, a cancellation) cancels the points not yet measured. Raises what a
    point raises, or KilledWorker when a point's workers kept dying.
    """
    items = list(items)
    with worker_client() as client:
        [shared] = client.scatter([fn], broadcast=True, hash=False)
        futures = [client.submit(_apply, shared, item, pure=False) for item in items]
        try:
            for f in futures:
                yield f.result()
        finally:
            client.cancel(futures)


def _progress_reporter(analysis_id: str) -> Callable[[str, int, int], None]:
    worker = get_worker()
    cancel = Event(_cancel_event_name(analysis_id))
    last = {"checked": time.monotonic()}

    def progress(phase: str, done: int, total: int) -> None:
        worker.log_event(PROGRESS_TOPIC, [analysis_id, phase, done, total])
        # the only way to stop a running task: it looks whether it should, between steps
        now = time.monotonic()
        if now - last["checked"] >= _CANCEL_CHECK_S:
            last["checked"] = now
            if cancel.is_set():
                raise AnalysisCancelled(f"analysis {analysis_id} was cancelled")

    return progress


def run_cluster_analysis(payload: dict) -> dict:
    """Worker task body: one whole analysis on a Dask worker.

    ``payload``: the job spec of fleet_server.jobs (analysis_id, settings, model_name) with the
    files as bytes (model, pool, field or None) instead of server paths. Returns {"summary": the
    manifest summary, "files": {name: bytes} of the result directory, "worker": this worker's
    address}. Raises AnalysisCancelled when cancelled, or whatever toco_core raises.
    """
    from fleet_server.jobs import analyse_files  # the same body as a local worker process runs

    aid = payload["analysis_id"]
    worker = get_worker()
    worker.log_event(START_TOPIC, [aid, worker.address])
    with tempfile.TemporaryDirectory(prefix=f"toco-analysis-{aid}-") as tmp:
        d = Path(tmp)
        (d / "model.onnx").write_bytes(payload["model"])
        (d / "pool.npz").write_bytes(payload["pool"])
        field_path = None
        if payload.get("field") is not None:
            (d / "field.npz").write_bytes(payload["field"])
            field_path = str(d / "field.npz")
        out = d / "result"
        out.mkdir()
        spec = {"analysis_id": aid, "model_path": str(d / "model.onnx"), "pool_path": str(d / "pool.npz"),
                "field_path": field_path, "settings": payload["settings"], "out_dir": str(out),
                "model_name": payload["model_name"]}
        summary = analyse_files(spec, _progress_reporter(aid), cluster_grid_map)
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return {"summary": summary, "files": files, "worker": worker.address}


# --- on the server ---------------------------------------------------------------------------------

def write_result_files(files: dict[str, bytes], out_dir: Path) -> None:
    """Write the result directory a cluster analysis returned into the server's ``out_dir``.

    Raises OSError when the folder cannot be written, ValueError for a name leaving ``out_dir``.
    """
    root = out_dir.resolve()
    for name, data in files.items():
        path = (root / name).resolve()
        if root not in path.parents:
            raise ValueError(f"a cluster analysis returned a file outside its folder: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


class ClusterExecutor:
    """The JobRunner's way to a Dask cluster: submit whole analyses, relay their progress and restarts.

    ``on_progress(item)`` receives (analysis_id, phase, done, total) and, when an analysis starts
    again on another worker after its worker was lost, (analysis_id, "restarted", 0, 0, note).
    """

    def __init__(self, address: str, on_progress: Callable[[tuple], None], timeout: float = 10.0) -> None:
        """Connect and subscribe to the progress topics. Raises ConfigError when the scheduler cannot be reached."""
        self.address = address
        self.client = connect(address, timeout)
        self.executor = self.client.get_executor(pure=False)
        self._on_progress = on_progress
        self._attempts: dict[str, list[str]] = {}  # analysis id -> worker addresses it started on
        self._lock = threading.Lock()
        self.client.subscribe_topic(PROGRESS_TOPIC, self._progress_event)
        self.client.subscribe_topic(START_TOPIC, self._start_event)

    def _progress_event(self, event: tuple[float, Any]) -> None:
        aid, phase, done, total = event[1]
        self._on_progress((aid, phase, done, total))

    def _start_event(self, event: tuple[float, Any]) -> None:
        aid, address = event[1]
        with self._lock:
            seen = self._attempts.setdefault(aid, [])
            seen.append(address)
            before = list(seen[:-1])
        if before:
            # the scheduler re-runs a task whose worker died; the user learns it, the work starts over
            note = (f"the Dask worker {before[-1]} running this analysis was lost; it started again on {address} "
                    f"(attempt {len(seen)})")
            log.warning("analysis restarted on another worker", extra={"fields": {"analysis": aid, "lost": before[-1],
                                                                                 "worker": address}})
            self._on_progress((aid, "restarted", 0, 0, note))

    def submit(self, spec: dict) -> Future:
        """Submit the analysis of a job spec (fleet_server.jobs); its files are read here and sent with the task.

        Returns a concurrent.futures Future of run_cluster_analysis's result. Raises OSError when a file
        cannot be read.
        """
        payload = {"analysis_id": spec["analysis_id"], "settings": spec["settings"], "model_name": spec["model_name"],
                   "model": Path(spec["model_path"]).read_bytes(), "pool": Path(spec["pool_path"]).read_bytes(),
                   "field": Path(spec["field_path"]).read_bytes() if spec.get("field_path") else None}
        with self._lock:
            self._attempts.pop(spec["analysis_id"], None)
        # inlined in the task, not scattered: the scheduler keeps a task's arguments, so when the worker
        # running it dies the task re-runs elsewhere; scattered data dies with the worker holding it
        # (and the analysis with it). The price: the files pass through the scheduler's memory.
        return self.executor.submit(run_cluster_analysis, payload)

    def cancel(self, analysis_id: str, future: Future) -> None:
        """Cancel an analysis. Not yet started: Dask drops it. Running: Dask cannot interrupt a task's
        thread, so the task stops at its next progress step (within about a second of it) on the event
        set here; its grid points still queued are cancelled with it. Raises nothing."""
        try:
            Event(_cancel_event_name(analysis_id), client=self.client).set()
        except Exception as exc:  # a scheduler gone: the future's cancellation below still releases the task
            log.warning("could not signal the cancellation", extra={"fields": {"analysis": analysis_id,
                                                                              "error": str(exc)}})
        future.cancel()

    def finished(self, analysis_id: str) -> None:
        """Forget an analysis that ended (its attempts, its cancellation event). Raises nothing."""
        with self._lock:
            self._attempts.pop(analysis_id, None)
        with contextlib.suppress(Exception):  # bookkeeping only: a scheduler gone has no events left
            Event(_cancel_event_name(analysis_id), client=self.client).clear()

    @staticmethod
    def explain(exc: BaseException) -> str | None:
        """A user's message for a cluster failure, or None when ``exc`` is not one."""
        if isinstance(exc, KilledWorker):
            return (f"the analysis was lost with its Dask worker each time it ran (last on {exc.last_worker.address}); "
                    f"the scheduler gave up after {exc.allowed_failures} retries (out of memory? see the worker's log)")
        if isinstance(exc, AnalysisCancelled):
            return "cancelled"
        return None

    def close(self) -> None:
        """Cancel what this server submitted and disconnect. Raises nothing."""
        try:
            self.executor.shutdown(wait=False)
            self.client.close(timeout=5)
        except Exception:  # stopping anyway
            log.exception("closing the Dask client failed")
