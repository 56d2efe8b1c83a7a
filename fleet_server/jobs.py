"""Analysis jobs: toco_core's analysis in worker processes, never in the request path.

The API only inserts a ``queued`` row. The JobRunner's dispatcher thread starts queued
analyses oldest first, at most ``concurrency`` at a time, in a spawn-context process pool
(fork is unsafe in a process with paho and uvicorn threads; spawn also keeps torch out of
the server process). Workers report ``(analysis_id, phase, done, total)`` on a queue that a
progress thread turns into DB updates and ``analysis`` events. On success the server process
packs the parts bundle (toco_core.parts_bundle, format 2: head, weight planes, calibration parts
and the optional fp32 ``base`` part), signs its manifest (which lists every part's offset, size
and SHA-256) with the server key and stores it content-addressed (fleet_server.registry.store_bundle).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psutil
from sqlalchemy import select

from fleet_server.bundle_layout import fleet_band_bounds
from fleet_server.bundle_sequence import bundle_model_id, next_bundle_sequence
from fleet_server.db import AnalysisRow, Database, ModelRow, SampleRow
from fleet_server.events import EventBus
from fleet_server.registry import ConflictError, Store, fetch, store_bundle, update_analysis
from toco_core.bundle import make_manifest, pack_bundle
from toco_core.model_bundle import BundleInfo
from toco_core.model_inputs import Batch, concat, from_arrays, to_arrays

if TYPE_CHECKING:  # the server process never loads the analysis (torch) itself
    from fleet_server.analysis_cluster import ClusterExecutor
    from toco_core.analysis.nested_calibration import GridMap

log = logging.getLogger("toco.fleet.jobs")
_PROGRESS: mp.Queue | None = None  # set in each worker process by _worker_init


_PID_FILE = "worker.pid"  # in an analysis's result dir while a worker runs it


def _worker_init(progress_queue: mp.Queue, server_pid: int) -> None:
    global _PROGRESS
    _PROGRESS = progress_queue
    # Ctrl-C in a terminal reaches the whole process group: the server stops the workers itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_server, args=(server_pid,), name="server-watch", daemon=True).start()


def _exit_with_server(server_pid: int) -> None:
    # a server killed with SIGKILL (or crashed) cannot stop its workers: each ends itself within a second
    # of becoming an orphan, so a restarted server never finds the old analysis still running
    while os.getppid() == server_pid:
        time.sleep(1.0)
    os._exit(1)


def end_stale_worker(result_dir: str | None, timeout: float = 10.0) -> int | None:
    """End the worker process a previous server run left on an analysis, if it still runs.

    ``result_dir``: the analysis's result folder, where the worker wrote its pid. Returns the pid
    ended, or None. Only the Python multiprocessing worker that wrote the file is ended (a reused pid is
    left alone).
    Raises nothing.
    """
    if not result_dir:
        return None
    path = Path(result_dir) / _PID_FILE
    try:
        proc = psutil.Process(int(path.read_text()))
        # the pid's process must be a multiprocessing worker that existed when the file was written,
        # not a later process that got the same pid
        is_worker = ("multiprocessing" in " ".join(proc.cmdline())
                     and proc.create_time() <= path.stat().st_mtime + 1)
    except (OSError, ValueError, psutil.Error):
        return None
    if not is_worker:
        return None
    proc.terminate()
    try:
        proc.wait(timeout)
    except psutil.TimeoutExpired:
        proc.kill()
    except psutil.Error:
        pass
    log.warning("ended a worker a previous run left on an analysis", extra={"fields": {"pid": proc.pid,
                                                                                       "dir": result_dir}})
    return proc.pid


def run_analysis_job(spec: dict) -> dict:
    """Worker process body: load model + pool (+ field samples), analyse, save the result directory.

    ``spec``: analysis_id, model_path, pool_path, field_path (npz or None), settings, out_dir,
    model_name. Returns the manifest's summary. Raises whatever toco_core raises; the runner records it.
    While it runs, ``{out_dir}/worker.pid`` names the process (see end_stale_worker).
    """
    aid = spec["analysis_id"]
    pid_file = Path(spec["out_dir"]) / _PID_FILE
    pid_file.write_text(str(os.getpid()))
    try:
        return _analyse(spec, aid)
    finally:
        pid_file.unlink(missing_ok=True)


def _analyse(spec: dict, aid: str) -> dict:
    def progress(phase: str, done: int, total: int) -> None:
        if _PROGRESS is not None:
            _PROGRESS.put((aid, phase, done, total))

    return analyse_files(spec, progress)


def analyse_files(spec: dict, progress: Callable[[str, int, int], None],
                  grid_map: GridMap = map) -> dict:
    """Load model + pool (+ field samples) from the spec's paths, analyse, save into ``spec["out_dir"]``.

    The body of both a local worker process and a Dask task (fleet_server.analysis_cluster).
    ``progress(phase, done, total)`` is called as the analysis advances (it may raise to stop it);
    ``grid_map`` measures the calibration grid (toco_core GridMap). Returns the manifest's summary.
    Raises whatever toco_core (or ``progress``) raises.
    """
    from toco_core.analysis.pipeline import analyze
    from toco_core.analysis.pool_split import split_pool
    from toco_core.analysis.settings import AnalysisSettings
    from toco_core.analysis_result import save_result
    from toco_core.onnx_model import load_model

    model = load_model(Path(spec["model_path"]))
    with np.load(spec["pool_path"], allow_pickle=False) as z:
        x, y = from_arrays("x", z), z.get("y")
    if spec.get("field_path"):
        with np.load(spec["field_path"], allow_pickle=False) as z:
            field = from_arrays("x", z)  # already in the model input's dtype (field_samples_array)
        x = concat([x, field])
        y = None  # field samples carry no labels; accuracy columns need one label per pool sample
    progress("load", 1, 1)
    settings = AnalysisSettings(**spec["settings"])
    split = split_pool(x, settings)
    del x  # the analysis holds the halves: keeping the whole pool too would hold it twice for the run
    result = analyze(model, split, y, settings, progress, spec["model_name"], grid_map)
    save_result(result, Path(spec["out_dir"]))
    m = result.manifest
    return {"samples_used": m.samples_used, "pool_size": m.pool_size, "timings": m.timings, "rounds": len(m.rounds)}


def field_samples_array(rows: list[SampleRow], input_shape: list, dtype: np.dtype | type = np.float32) -> np.ndarray:
    """Decode uploaded samples into one batch shaped like the model input, in the input's ``dtype``.

    Samples that do not decode or fit the shape are skipped (logged). A float input takes any
    sample; an integer one (uint8 camera bytes) takes samples whose values it holds exactly:
    casting 0..1 floats to uint8 would re-analyse on zeros.
    """
    tail = [int(d) if isinstance(d, int) else None for d in input_shape[1:]]
    per = int(np.prod([d for d in tail if d])) if tail else 1
    dtype = np.dtype(dtype)
    out = []
    for r in rows:
        try:
            a = np.frombuffer(r.data, dtype=np.dtype(r.dtype).newbyteorder("<")).reshape(r.shape)
        except ValueError:
            log.warning("field sample does not decode", extra={"fields": {"device": r.device_id, "ref": r.ref}})
            continue
        cast = a.astype(dtype)
        if dtype.kind != "f" and not np.array_equal(cast, a):
            log.warning("field sample values do not fit the model input's dtype",
                        extra={"fields": {"device": r.device_id, "ref": r.ref, "dtype": r.dtype, "input": str(dtype)}})
        elif None not in tail and a.size % per == 0:
            out.append(cast.reshape(-1, *tail))
        else:
            log.warning("field sample does not fit the model input",
                        extra={"fields": {"device": r.device_id, "ref": r.ref, "shape": r.shape}})
    if not out:
        return np.zeros((0, *[d or 1 for d in tail]), dtype)
    return np.concatenate(out)


class JobRunner:
    """Queue -> worker processes (or a Dask cluster) -> signed bundle. ``on_done(analysis_id)`` runs after
    an analysis ends (a bundle stored, or failed).

    ``executor``: "local" (a spawn-context process pool of ``concurrency`` workers) or the address of a
    Dask scheduler, tcp://HOST:PORT (fleet_server.analysis_cluster; at most ``concurrency`` analyses
    are submitted at a time, and each spreads its calibration grid over the cluster).
    """

    def __init__(self, db: Database, store: Store, key, events: EventBus, *, concurrency: int = 1,
                 chunk_size: int = 256 * 1024, on_done: Callable[[str], None] | None = None,
                 executor: str = "local") -> None:
        self.db, self.store, self.key, self.events = db, store, key, events
        self.concurrency = concurrency
        self.executor = executor
        self._cluster: ClusterExecutor | None = None
        self._out_dirs: dict[str, str] = {}  # running analysis -> its result folder
        self._cancelled: set[str] = set()  # running analyses whose cancellation was asked for
        self._requeue_broken = False  # a cancellation broke the local pool: the others it ran are re-queued
        self.chunk_size = chunk_size
        self.on_done = on_done
        self._ctx = mp.get_context("spawn")
        self._progress: mp.Queue = self._ctx.Queue()
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[str, Future] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # starting queued analyses vs cancelling one
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Re-queue analyses a previous run left running, then start the dispatcher and progress threads."""
        with self.db.session(write=True) as s:
            for a in s.scalars(select(AnalysisRow).where(AnalysisRow.status == "running")):
                end_stale_worker(a.result_dir)  # never the same analysis in two processes at once
                a.status, a.phase = "queued", "queued"
        if self.executor == "local":
            self._pool = self._new_pool()
        else:
            from fleet_server.analysis_cluster import ClusterExecutor

            # raises ConfigError (one line) when the scheduler does not answer
            self._cluster = ClusterExecutor(self.executor, self._progress.put)
        for target, name in ((self._dispatch_loop, "jobs-dispatch"), (self._progress_loop, "jobs-progress")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.concurrency, mp_context=self._ctx, initializer=_worker_init,
                                   initargs=(self._progress, os.getpid()))

    def kick(self) -> None:
        """Tell the dispatcher that something was queued (it also polls)."""
        self._wake.set()

    def stop(self) -> None:
        """Stop dispatching and end the worker processes (a running analysis is lost and re-queued next start)."""
        self._stop.set()
        self._wake.set()
        if self._cluster is not None:
            # the scheduler forgets tasks no client wants; a running one ends at its next progress step
            for aid, fut in list(self._running.items()):
                self._cluster.cancel(aid, fut)
            self._cluster.close()
        if self._pool is not None:
            # the executor has no public kill; a half-done analysis has no value, so end the workers now,
            # and wait for them: the server must not exit (or restart) while one still runs
            procs = list((getattr(self._pool, "_processes", None) or {}).values())
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.join(5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(2)
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._progress.put(None)
        for t in self._threads:
            t.join(5)

    # --- threads -----------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            self._wake.clear()
            try:
                self._reap()
                if not self._running:
                    self._requeue_broken = False
                self._start_queued()
            except Exception:  # the loop must survive one bad job
                log.exception("job dispatcher step failed")

    def _progress_loop(self) -> None:
        while True:
            item = self._progress.get()
            if item is None or self._stop.is_set():
                return
            aid, phase, done, total = item[:4]
            note = item[4] if len(item) > 4 else None  # a cluster analysis restarted after its worker was lost
            if aid not in self._running:
                # a late report of an analysis that ended (cluster events travel apart from the task's
                # result): it must not turn a done analysis's phase back
                continue
            try:
                view = update_analysis(self.db, analysis_id=aid, phase=phase, done=done, total=total)
                if note:
                    log.warning(note, extra={"fields": {"analysis": aid}})
                    view = {**view, "note": note}
                self.events.publish("analysis", view)
            except Exception:
                log.exception("progress update failed", extra={"fields": {"analysis": aid}})

    def _start_queued(self) -> None:
        with self._lock:
            self._start_queued_locked()

    def _start_queued_locked(self) -> None:
        free = self.concurrency - len(self._running)
        if free <= 0:
            return
        with self.db.session() as s:
            queued = s.scalars(select(AnalysisRow).where(AnalysisRow.status == "queued")
                               .order_by(AnalysisRow.created_at).limit(free)).all()
            specs = [self._spec(s, a) for a in queued]
        for spec in specs:
            view = update_analysis(self.db, analysis_id=spec["analysis_id"], status="running", phase="starting",
                                   started_at=time.time(), result_dir=spec["out_dir"])
            self.events.publish("analysis", view)
            try:
                fut = self._submit(spec)
            except Exception as exc:  # no worker can start: say so instead of staying "running"
                where = "a worker process" if self._cluster is None else f"the Dask cluster at {self.executor}"
                view = update_analysis(self.db, analysis_id=spec["analysis_id"], status="failed",
                                       finished_at=time.time(),
                                       error=f"could not start the analysis on {where}: {exc!r}")
                self.events.publish("analysis", view)
                continue
            self._running[spec["analysis_id"]] = fut
            self._out_dirs[spec["analysis_id"]] = spec["out_dir"]

    def _submit(self, spec: dict) -> Future:
        if self._cluster is not None:
            return self._cluster.submit(spec)
        try:
            assert self._pool is not None, "start() made the pool"
            return self._pool.submit(run_analysis_job, spec)
        except BrokenProcessPool:
            self._pool = self._new_pool()
            return self._pool.submit(run_analysis_job, spec)

    def cancel(self, analysis_id: str) -> dict:
        """Cancel a queued or running analysis; it ends ``failed`` with the error "cancelled".

        Queued: it never starts. Running locally: its worker process is ended (other analyses that
        pool ran are re-queued). Running on a Dask cluster: see ClusterExecutor.cancel (the task stops
        at its next progress step). Returns the Analysis. Raises NotFoundError for an unknown id and
        ConflictError for an analysis that has already ended.
        """
        with self._lock:  # the dispatcher must not start it meanwhile
            fut = self._running.get(analysis_id)
            if fut is None:
                with self.db.session() as s:
                    status = fetch(s, AnalysisRow, analysis_id, "analysis").status
                if status != "queued":
                    raise ConflictError(f"analysis {analysis_id} is {status}; only a queued or running one "
                                        "can be cancelled")
                view = update_analysis(self.db, analysis_id=analysis_id, status="failed", phase="cancelled",
                                       error="cancelled", finished_at=time.time())
                self.events.publish("analysis", view)
                return view
            self._cancelled.add(analysis_id)
        if self._cluster is not None:
            self._cluster.cancel(analysis_id, fut)
        elif not fut.cancel():  # running in a worker process: a half-done analysis has no value, end it
            pid = end_stale_worker(self._out_dirs.get(analysis_id), timeout=5)
            self._requeue_broken = pid is not None
        self._wake.set()
        return update_analysis(self.db, analysis_id=analysis_id, phase="cancelling")

    def _spec(self, s, a: AnalysisRow) -> dict:
        model = s.get(ModelRow, a.model_id)
        out = self.store.analysis_dir(a.id)
        out.mkdir(parents=True, exist_ok=True)
        field_path = None
        if a.field_sample_ids:
            from toco_core.onnx_model import input_specs, load_model

            rows = s.scalars(select(SampleRow).where(SampleRow.id.in_(a.field_sample_ids))).all()
            specs = input_specs(load_model(Path(model.path)))
            arr: Batch | None
            if len(specs) == 1:
                arr = field_samples_array(rows, list(specs[0].shape), specs[0].dtype)
            else:  # one uploaded array per input, joined again
                from fleet_server.field_inputs import field_sample_inputs

                arr = field_sample_inputs(rows, specs)
            if arr is not None and len(arr):
                field_path = str(out / "field.npz")
                np.savez(field_path, **to_arrays("x", arr))  # type: ignore[arg-type]  # numpy: **kwds may name allow_pickle
        return {"analysis_id": a.id, "model_path": model.path, "pool_path": model.pool_path, "field_path": field_path,
                "settings": a.settings, "out_dir": str(out), "model_name": model.name}

    def _reap(self) -> None:
        for aid, fut in list(self._running.items()):
            if not fut.done():
                continue
            del self._running[aid]
            out_dir = self._out_dirs.pop(aid, None)
            cancelled = aid in self._cancelled
            self._cancelled.discard(aid)
            try:
                out = fut.result()
                if self._cluster is not None and out_dir is not None:
                    from fleet_server.analysis_cluster import write_result_files

                    write_result_files(out["files"], Path(out_dir))
                    log.info("cluster analysis done", extra={"fields": {"analysis": aid, "worker": out["worker"]}})
                bundle_id = self.build_bundle(aid)
                view = update_analysis(self.db, analysis_id=aid, status="done", phase="done", bundle_id=bundle_id,
                                       finished_at=time.time())
            except (CancelledError, BrokenProcessPool) as exc:
                if isinstance(exc, BrokenProcessPool) and getattr(self._pool, "_broken", False):
                    self._pool = self._new_pool()
                if cancelled:
                    view = update_analysis(self.db, analysis_id=aid, status="failed", phase="cancelled",
                                           finished_at=time.time(), error="cancelled")
                elif isinstance(exc, BrokenProcessPool) and self._requeue_broken:
                    # another analysis's cancellation ended the pool's workers: this one starts again
                    view = update_analysis(self.db, analysis_id=aid, status="queued", phase="queued")
                    self.events.publish("analysis", view)
                    continue
                elif isinstance(exc, BrokenProcessPool):
                    view = update_analysis(self.db, analysis_id=aid, status="failed", finished_at=time.time(),
                                           error="the analysis worker process died (out of memory?)")
                else:
                    view = update_analysis(self.db, analysis_id=aid, status="failed", finished_at=time.time(),
                                           error="the analysis was cancelled on the Dask cluster")
            except Exception as exc:
                explained = self._cluster.explain(exc) if self._cluster is not None else None
                if cancelled:
                    explained = "cancelled"
                log.warning("analysis failed", extra={"fields": {"analysis": aid, "error": explained or str(exc)}})
                view = update_analysis(self.db, analysis_id=aid, status="failed", finished_at=time.time(),
                                       phase="cancelled" if cancelled else "failed",
                                       error=explained or str(exc) or type(exc).__name__)
            finally:
                if self._cluster is not None:
                    self._cluster.finished(aid)
            self.events.publish("analysis", view)
            self.events.publish("analysis", view)
            if self.on_done is not None:
                try:
                    self.on_done(aid)
                except Exception:
                    log.exception("after-analysis hook failed", extra={"fields": {"analysis": aid}})

    def build_bundle(self, analysis_id: str) -> str:
        """Pack, sign and store the parts bundle of a finished analysis, its bands laid out for the
        enrolled boxes (fleet_server.bundle_layout). Returns its id (sha256).

        Raises AnalysisError for an analysis without a plan table (made before schema 2).
        """
        from toco_core.analysis_result import load_result
        from toco_core.onnx_model import load_model
        from toco_core.parts_bundle import pack_parts

        with self.db.session() as s:
            a = fetch(s, AnalysisRow, analysis_id, "analysis")
            m = fetch(s, ModelRow, a.model_id, "model")
            budget, reason, model_id = a.settings.get("budget", 0.01), a.reason, a.model_id
            model_path, name, sha, prep, out = m.path, m.name, m.sha256, m.preprocessing, a.result_dir
        if out is None:
            raise ConflictError(f"analysis {analysis_id!r} has no result yet: pack its bundle once it is done")
        info = BundleInfo(model_name=name, model_sha256=sha, analysis_id=analysis_id, budget=budget,
                          preprocessing=prep, reason=reason)
        model, result = load_model(Path(model_path)), load_result(Path(out))
        bounds = fleet_band_bounds(self.db, model_id, result, model, Path(model_path).stat().st_size, budget)
        parts = pack_parts(model, result, info, include_base=True, band_bounds=bounds)
        data = pack_bundle(parts)
        manifest = make_manifest(data, self.chunk_size, self.key,
                                 metadata={"model_name": name, "analysis_id": analysis_id, "reason": reason,
                                           "budget": budget},
                                 model_id=bundle_model_id(self.db, model_id),
                                 sequence=next_bundle_sequence(self.db, model_id))
        timings = json.loads((Path(out) / "manifest.json").read_text()).get("timings")
        update_analysis(self.db, analysis_id=analysis_id, timings=timings)
        return store_bundle(self.db, self.store, analysis_id=analysis_id, data=data,
                            manifest=manifest.model_dump(mode="json"))
