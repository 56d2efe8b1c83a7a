"""The Agent: probe, MQTT link, commands, downloads, deployments, inference API, drift, telemetry.

Threads: the link's network and dispatcher threads (handlers stay short), one worker that
runs every model-changing job in order (deploy, recompress, rollback), the drift worker, the
HTTP server, and a housekeeping loop (telemetry, status.json, drift time-outs, picking up a
pointer switched by ``toco-agent rollback``/``recompress`` from a shell).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent import child_tasks
from agent.bundle_download import BundleDownloader
from agent.config import AgentConfig
from agent.deployer import Deployer
from agent.drift_reporter import DriftReporter
from agent.inference import InferenceEngine
from agent.inference_api import ApiSettings, InferenceServer
from agent.model_store import ModelStore, SlotInfo, StoreError
from agent.mqtt_link import MqttLink
from agent.status import AgentStatus, Journal, read_journal, write_journal, write_status
from toco_core import __version__
from toco_core.device import DeviceProfile, with_budgets
from toco_core.errors import ModelError
from toco_core.messages import (ActiveModel, BundleManifest, DeployCommand, FailureReason, Message, MessageKind, Phase,
                                RecompressCommand, RollbackCommand, StatusMessage, TelemetryMessage,
                                UploadSamplesCommand)

log = logging.getLogger("toco.agent")
_STOP = object()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    A deployment leaves megabytes of freed but still resident heap behind (bundle bytes, test
    sessions, validation objects); glibc keeps them unless asked. Called after every job.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _temperature() -> float | None:
    try:
        temps = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    values = [t.current for entries in temps.values() for t in entries if t.current]
    return max(values) if values else None


class Agent:
    """One edge daemon; ``start()`` returns once everything runs, ``stop()`` shuts it down cleanly."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.public_key = config.public_key
        self.key_fingerprint = child_tasks.check_public_key(config.public_key)  # ConfigError now, not at a deploy
        self.profile: DeviceProfile | None = None
        self.store = ModelStore(self.state_dir)
        self.reporter = DriftReporter(self._send, config.device_id, config.drift, config.upload_samples,
                                      config.samples_batch_bytes, config.shadow_min_free_memory, max(config.threads, 1),
                                      shadow_idle_s=config.shadow_idle_seconds, release=release_memory)
        self.engine = InferenceEngine(threads=config.threads, hook=self.reporter.hook,
                                      feedback_hook=self.reporter.feedback, on_trial_failure=self._on_trial_failure)
        self.link: MqttLink | None = None
        self.server: InferenceServer | None = None
        self.downloader: BundleDownloader | None = None
        self.deployer = Deployer(config, self.store, lambda: self.profile, self._report, self.engine, self._attach)
        self._jobs: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._serving_generation: int | None = None
        self._last_status: dict[str, Any] | None = None
        self._busy = threading.Event()
        self._status_lock = threading.Lock()
        self.reporter.on_report = lambda report: self._write_status()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Probe, serve the stored model, open the API, connect, resume interrupted work."""
        c = self.config
        self.profile = with_budgets(child_tasks.probe(self.state_dir, c.probe_benchmark, c.device_id),
                                    memory=c.memory_cap, storage=c.storage_cap, latency_s=c.latency_cap)
        self._serve_stored()
        self.server = InferenceServer(self.engine, ApiSettings(host=c.api_host, port=c.api_port))
        self.server.start()
        self.link = MqttLink(url=c.broker_url, fleet=c.fleet, device_id=c.device_id, state_dir=self.state_dir,
                             username=c.username, password=c.password, ca_file=str(c.ca_file) if c.ca_file else None,
                             agent_version=__version__, birth=self._birth)
        self.downloader = BundleDownloader(self.link, self.state_dir, self.public_key, self._on_bundle,
                                           self._on_download_failed, disk_budget=c.bundle_disk_cap,
                                           mem_budget=c.memory_cap and max(c.memory_cap, 64 << 20))
        self.link.on(self.link.topics.device(MessageKind.CMD, c.device_id), MessageKind.CMD, self._on_command)
        self.link.start()
        for target, name in ((self._work_loop, "agent-worker"), (self._housekeeping, "agent-housekeeping")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._jobs.put(self._resume)
        self._write_status()
        log.info("agent started", extra={"fields": {"device": c.device_id, "api": self.server.url}})

    def stop(self) -> None:
        """Stop taking work, let the current job end, publish offline, close everything."""
        self._stop.set()
        self._jobs.put(_STOP)
        for t in self._threads:
            t.join(30)
        if self.downloader is not None:
            self.downloader.close()
        if self.server is not None:
            self.server.stop()
        self.reporter.close()
        self._write_status(running=False)
        if self.link is not None:
            self.link.stop()
        log.info("agent stopped")

    def run_until(self, stop: threading.Event) -> None:
        """``start()``, block until ``stop`` is set, ``stop()``."""
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()

    # ---------------------------------------------------------------- serving
    def _serve_stored(self) -> None:
        ptr = self.store.pointer()
        try:
            info, data = self.store.load_active_bytes()
        except StoreError:
            log.info("no model stored yet; waiting for a deployment")
            self._serving_generation = ptr.generation if ptr else None
            return
        try:
            self.engine.load(data, info.version, info.meta.preprocessing)
        except ModelError as exc:  # the stored model broke: go back to the previous one, report it
            log.error("stored model does not load", extra={"fields": {"error": str(exc)}})
            try:
                self.store.rollback(f"does not load: {exc}")
                info, data = self.store.load_active_bytes()
                self.engine.load(data, info.version, info.meta.preprocessing)
            except (StoreError, ModelError):
                self.engine.unload()
                return
        self._serving_generation = ptr.generation if ptr else None
        self._attach(info)

    def _attach(self, info: SlotInfo) -> None:
        ptr = self.store.pointer()
        self._serving_generation = ptr.generation if ptr else None
        self.reporter.attach(info.meta.bundle_id, self.deployer.reference_for(info.meta.sha256),
                             self.deployer.base_model(info.meta.bundle_id))
        if self.link is not None:
            self.link.republish_state()
        self._write_status()

    def _birth(self) -> dict:
        active = self.store.active()
        model = None
        if active is not None:
            model = ActiveModel(bundle_id=active.meta.bundle_id if len(active.meta.bundle_id) == 64 else None,
                                model_name=active.meta.plan_summary.get("model_name"), slot=active.slot,
                                plan=active.meta.plan_summary)
        hardware = None
        if self.profile is not None:  # the server reads the device's group from its birth
            hardware = {**self.profile.model_dump(mode="json"), "group": self.config.group}
        return {"hardware": hardware, "active": model}

    # ---------------------------------------------------------------- messages
    def _send(self, message) -> bool:
        if self.link is None:
            return False
        return self.link.send(message)

    def _report(self, phase: Phase, journal: Journal, **fields) -> None:
        msg = StatusMessage(device_id=self.config.device_id, phase=phase, deployment_id=journal.deployment_id,
                            bundle_id=journal.bundle_id, **fields)
        self._send(msg)
        self._last_status = {"deployment_id": journal.deployment_id, "bundle_id": journal.bundle_id,
                             "phase": phase.value, "reason": msg.reason.value if msg.reason else None,
                             "detail": msg.detail, "at": time.time()}
        self._write_status()

    def _on_command(self, topic: str, cmd: Message) -> None:
        """Dispatcher thread: validate and queue; the worker does the work."""
        log.info("command", extra={"fields": {"cmd": type(cmd).__name__, "id": getattr(cmd, "cmd_id", "")}})
        if isinstance(cmd, DeployCommand):
            self._deploy(cmd)
        elif isinstance(cmd, RecompressCommand):
            self._jobs.put(lambda: self._recompress(cmd))
        elif isinstance(cmd, RollbackCommand):
            self._jobs.put(lambda: self._rollback(cmd))
        elif isinstance(cmd, UploadSamplesCommand):
            self.reporter.upload(cmd)

    def _deploy(self, cmd: DeployCommand) -> None:
        policy = {"fidelity_budget": cmd.fidelity_budget} if cmd.fidelity_budget else {}
        journal = Journal(deployment_id=cmd.deployment_id, bundle_id=cmd.bundle_id, policy=policy)
        write_journal(self.state_dir, journal)
        if self.deployer.has_bundle(cmd.bundle_id):
            self._report(Phase.VERIFIED, journal, progress=1.0, detail="bundle already stored here")
            self._jobs.put(lambda: self.deployer.deploy(journal))
        else:
            self.downloader.download(cmd.bundle_id, cmd.deployment_id)

    def _on_bundle(self, manifest: BundleManifest, data: bytes) -> None:
        """Downloader callback (dispatcher thread): keep the verified bytes, queue the deployment."""
        self.deployer.save_bundle(manifest.bundle_id, data)
        journal = read_journal(self.state_dir)
        if journal is None or journal.bundle_id != manifest.bundle_id:
            log.info("bundle stored without a deployment waiting for it")
            return
        journal = journal.model_copy(update={"phase": Phase.VERIFIED.value})
        write_journal(self.state_dir, journal)
        self._jobs.put(lambda: self.deployer.deploy(journal))

    def _on_download_failed(self, bundle_id: str, reason: FailureReason, detail: str) -> None:
        journal = read_journal(self.state_dir)
        if journal is not None and journal.bundle_id == bundle_id:
            write_journal(self.state_dir, None)
        self._last_status = {"bundle_id": bundle_id, "phase": "failed", "reason": reason.value, "detail": detail,
                             "at": time.time()}
        self._write_status()

    def _recompress(self, cmd: RecompressCommand) -> None:
        active = self.store.active()
        overrides = cmd.model_dump(include={"memory_bytes", "storage_bytes", "latency_ms", "fidelity_budget"},
                                   exclude_none=True)
        if active is None or not self.deployer.has_bundle(active.meta.bundle_id):
            j = Journal(deployment_id=cmd.cmd_id, bundle_id=active.meta.bundle_id if active else "none")
            self._report(Phase.FAILED, j, reason=FailureReason.BAD_COMMAND,
                         detail="no active model with a stored bundle to recompress from; deploy a bundle first")
            return
        self.deployer.deploy(Journal(deployment_id=cmd.cmd_id, bundle_id=active.meta.bundle_id, policy=overrides,
                                     kind="recompress"))

    def _rollback(self, cmd: RollbackCommand) -> None:
        active = self.store.active()
        j = Journal(deployment_id=cmd.deployment_id or cmd.cmd_id,
                    bundle_id=active.meta.bundle_id if active else "none")
        try:
            self.store.rollback(cmd.reason or "rollback command")
            info, data = self.store.load_active_bytes()
            self.engine.load(data, info.version, info.meta.preprocessing)
        except (StoreError, ModelError) as exc:
            self._report(Phase.FAILED, j, reason=FailureReason.BAD_COMMAND, detail=str(exc))
            return
        self._attach(info)
        self._report(Phase.ACTIVE, j.model_copy(update={"bundle_id": info.meta.bundle_id}),
                     detail=f"rolled back on request to slot {info.slot}", plan=info.meta.plan_summary)

    def _on_trial_failure(self, journal: Journal | None, version: str, error: str) -> None:
        """Request thread: a newly activated model failed at run time; the worker rolls it back."""
        self._jobs.put(lambda: self._auto_rollback(journal, version, error))

    def _auto_rollback(self, journal: Journal | None, version: str, error: str) -> None:
        """Go back to the previous slot once and report ``rolled_back`` (never re-tried: the
        model served again is not on trial, and the deployment journal is already closed)."""
        if self.engine.model_version != version:
            return  # replaced meanwhile (another deployment or a manual rollback)
        active = self.store.active()
        j = journal or Journal(bundle_id=active.meta.bundle_id if active else "none")
        why = f"run-time error within its first {self.config.trial_runs} runs: {error[:1200]}"
        try:
            self.store.rollback(why[:500])
            info, data = self.store.load_active_bytes()
            self.engine.load(data, info.version, info.meta.preprocessing)
        except (StoreError, ModelError) as exc:
            log.error("automatic rollback failed", extra={"fields": {"error": str(exc)}})
            self._report(Phase.FAILED, j, reason=FailureReason.RUNTIME_ERROR,
                         detail=f"model {version} had a {why}; rolling back was impossible: {exc}")
            return
        log.warning("rolled back a model that failed at run time", extra={"fields": {"version": version,
                                                                                     "slot": info.slot}})
        self._attach(info)
        self._report(Phase.ROLLED_BACK, j, reason=FailureReason.RUNTIME_ERROR,
                     detail=f"model {version} had a {why}; serving slot {info.slot} ({info.version}) again")

    # ---------------------------------------------------------------- loops
    def _resume(self) -> None:
        pending = self.deployer.resume()
        if pending is not None:
            self.downloader.download(pending.bundle_id, pending.deployment_id)
        self.downloader.resume_pending()

    def _work_loop(self) -> None:
        while True:
            job: Callable[[], None] | object = self._jobs.get()
            if job is _STOP:
                return
            self._busy.set()
            try:
                job()  # type: ignore[operator]
            except Exception:  # a bug in one job is logged and reported, the agent keeps serving
                log.exception("agent job failed")
            finally:
                release_memory()
                self._busy.clear()

    def _housekeeping(self) -> None:
        next_telemetry = 0.0
        while not self._stop.wait(0.5):
            try:
                self._follow_pointer()
                self.reporter.tick()
                if time.monotonic() >= next_telemetry:
                    next_telemetry = time.monotonic() + self.config.telemetry_seconds
                    self._telemetry()
                    self._write_status()
            except Exception:
                log.exception("housekeeping step failed")

    def _follow_pointer(self) -> None:
        """A shell's ``toco-agent rollback`` or ``recompress`` switched the pointer: serve what it points to."""
        if self._busy.is_set() or not self._jobs.empty():
            return
        ptr = self.store.pointer()
        generation = ptr.generation if ptr else None
        if generation != self._serving_generation:
            log.info("active pointer changed outside the daemon; reloading")
            self._jobs.put(self._serve_stored)
            self._serving_generation = generation

    def _telemetry(self) -> None:
        stats = self.engine.stats.snapshot()
        finite = lambda v: v if v is not None and v != float("inf") else None  # noqa: E731
        self._send(TelemetryMessage(device_id=self.config.device_id, mem_available=psutil.virtual_memory().available,
                                    disk_free=shutil.disk_usage(self.state_dir).free,
                                    cpu_load=psutil.cpu_percent(None) / 100.0, temperature_c=_temperature(),
                                    inferences=stats["samples"], latency_ms_p50=finite(stats["p50_ms"]),
                                    latency_ms_p99=finite(stats["p99_ms"])))

    def _write_status(self, running: bool = True) -> None:
        active = self.store.active()
        last = self.reporter.last_report
        status = AgentStatus(
            device_id=self.config.device_id, fleet=self.config.fleet, running=running,
            connected=bool(self.link and self.link.connected and running), broker=self.config.broker_url.split("@")[-1],
            api_url=self.server.url if self.server else None,
            active=None if active is None else {"bundle_id": active.meta.bundle_id, "slot": active.slot,
                                                "version": active.version, "plan": active.meta.plan_summary,
                                                "fallback": active.fallback_reason},
            deployment=self._last_status,
            last_drift=None if last is None else {"window": last.window_index, "closed_at": last.closed_at,
                                                  "n_samples": last.n_samples, "alert": last.alert,
                                                  "out_of_band": last.out_of_band,
                                                  "measured_agreement": last.measured_agreement},
            outbox=self.link.outbox_size() if self.link else 0, inferences=self.engine.stats.samples)
        try:
            with self._status_lock:
                write_status(self.state_dir, status)
        except OSError as exc:
            log.warning("cannot write status.json", extra={"fields": {"error": str(exc)}})
