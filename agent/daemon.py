"""The Agent: the edge daemon's shell, which builds its parts, wires them together and runs its loops.

Parts: the model store, the inference engine and its HTTP API, the MQTT link, the bundle
downloader, the deployer, the drift reporter, the model-changing commands (``agent.model_commands``)
and what the agent reports about itself (``agent.status_report``).

Threads: the link's network and dispatcher threads (handlers stay short), one worker that
runs every model-changing job in order (deploy, recompress, rollback), the drift worker, the
HTTP server, and a housekeeping loop (telemetry, status.json, drift time-outs, picking up a
pointer switched by ``toco-agent rollback``/``recompress`` from a shell).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import threading
import time
from collections.abc import Callable

from agent import child_tasks
from agent.bundle_download import BundleDownloader
from agent.command_guard import CommandGuard
from agent.config import AgentConfig, read_api_token
from agent.deployer import Deployer
from agent.drift_reporter import DriftReporter
from agent.inference import InferenceEngine
from agent.inference_api import ApiSettings, InferenceServer
from agent.model_commands import ModelCommands
from agent.model_store import ModelStore, SlotInfo, StoreError
from agent.mqtt_link import MqttLink
from agent.parts_fetch import PartsFetcher
from agent.status_report import StatusReport
from agent.trust_store import TrustStore
from toco_core import __version__
from toco_core.device import DeviceProfile, with_budgets
from toco_core.errors import ModelError
from toco_core.messages import AgentMessage, MessageKind

log = logging.getLogger("toco.agent")
_STOP = object()


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``; no-op elsewhere).

    A deployment leaves megabytes of freed but still resident heap behind (bundle bytes, test
    sessions, validation objects); glibc keeps them unless asked. Called after every job.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Agent:
    """One edge daemon; ``start()`` returns once everything runs, ``stop()`` shuts it down cleanly."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        provisioned = child_tasks.check_public_key(config.public_key)  # ConfigError now, not at a deploy
        self.key_fingerprint = provisioned.fingerprint
        # the key set (seeded from the provisioned key, rotated by trust-keys commands), the replay and
        # downgrade high-water marks; bundle manifests are checked against the same set
        self.trust = TrustStore(self.state_dir, provisioned)
        self.public_key = self.trust.path
        self.guard = CommandGuard(config.device_id, self.trust,
                                  lambda cmd: child_tasks.verify_command(self.trust.path,
                                                                         cmd.model_dump_json().encode()))
        self.profile: DeviceProfile | None = None
        self.store = ModelStore(self.state_dir)
        self.reporter = DriftReporter(self._send, config.device_id, config.drift, config.upload_samples,
                                      config.samples_batch_bytes, config.shadow_min_free_memory, max(config.threads, 1),
                                      shadow_idle_s=config.shadow_idle_seconds, release=release_memory)
        self.engine = InferenceEngine(threads=config.threads, hook=self.reporter.hook,
                                      feedback_hook=self.reporter.feedback)
        self.link: MqttLink | None = None
        self.server: InferenceServer | None = None
        self.downloader: BundleDownloader | None = None
        self.fetcher: PartsFetcher | None = None
        self.status = StatusReport(config, self.store, self.engine, self.reporter, self._send, lambda: self.link,
                                   lambda: self.server, lambda: self.profile)
        self.status.trust = self.trust
        self.deployer = Deployer(config, self.store, self._probed_profile, self.status.report, self.engine,
                                 self._attach)
        self._jobs: queue.Queue[object] = queue.Queue()  # jobs (callables) and _STOP
        self.commands = ModelCommands(config, self.store, self.engine, self.deployer, self.reporter, self.status,
                                      self._jobs.put, self._attach, lambda: self.downloader, self.guard)
        # Set here, not in the engine's constructor: the commands need the engine first.
        self.engine.on_trial_failure = self.commands.on_trial_failure
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._serving_generation: int | None = None
        self._busy = threading.Event()
        self.reporter.on_report = lambda report: self.status.write()

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Probe, serve the stored model, open the API, connect, resume interrupted work."""
        c = self.config
        self.profile = with_budgets(child_tasks.probe(self.state_dir, c.probe_benchmark, c.device_id),
                                    memory=c.memory_cap, storage=c.storage_cap, latency_s=c.latency_cap)
        self._serve_stored()
        self.server = InferenceServer(self.engine, ApiSettings(host=c.api_host, port=c.api_port,
                                                               token=read_api_token(c.api_token_file)))
        self.server.start()
        self.link = MqttLink(url=c.broker_url, fleet=c.fleet, device_id=c.device_id, state_dir=self.state_dir,
                             username=c.username, password=c.password, ca_file=str(c.ca_file) if c.ca_file else None,
                             agent_version=__version__, birth=self.status.birth)
        self.downloader = BundleDownloader(self.link, self.state_dir, self.public_key, self.commands.on_bundle,
                                           self.commands.on_download_failed, disk_budget=c.bundle_disk_cap,
                                           mem_budget=c.memory_cap and max(c.memory_cap, 64 << 20),
                                           on_parts=self.commands.on_parts, admit=self.trust.admit_manifest)
        self.fetcher = PartsFetcher(self.link, self.deployer.parts)
        self.deployer.fetcher = self.fetcher
        self.link.on(self.link.topics.device(MessageKind.CMD, c.device_id), MessageKind.CMD, self.commands.on_command)
        self.link.start()
        for target, name in ((self._work_loop, "agent-worker"), (self._housekeeping, "agent-housekeeping")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        self._jobs.put(self._resume)
        self.status.write()
        log.info("agent started", extra={"fields": {"device": c.device_id, "api": self.server.url}})

    def stop(self) -> None:
        """Stop taking work, let the current job end, publish offline, close everything."""
        self._stop.set()
        self._jobs.put(_STOP)
        if self.fetcher is not None:  # a deployment waiting for parts ends now and resumes at the next start
            self.fetcher.close()
        for t in self._threads:
            t.join(30)
        if self.downloader is not None:
            self.downloader.close()
        if self.server is not None:
            self.server.stop()
        self.reporter.close()
        self.status.write(running=False)
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
                             self.deployer.base_model(info.meta.bundle_id),
                             self.deployer.shadow_mode(info.meta.bundle_id))
        if self.link is not None:
            self.link.republish_state()
        self.status.write()

    # ---------------------------------------------------------------- messages
    def _send(self, message: AgentMessage) -> bool:
        if self.link is None:
            return False
        return self.link.send(message)

    # ---------------------------------------------------------------- loops
    def _probed_profile(self) -> DeviceProfile:
        assert self.profile is not None, "start() probes the device before any deployment"
        return self.profile

    def _resume(self) -> None:
        assert self.downloader is not None, "start() made the downloader"
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
                    self.status.telemetry()
                    self.status.write()
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
