"""What the agent tells about itself: deployment status messages, telemetry, its MQTT birth, ``status.json``.

The link, the API server and the device profile exist only once ``Agent.start()`` ran, so they are
reached through getters that may return None; everything here copes with that.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil

from agent.config import AgentConfig
from agent.drift_reporter import DriftReporter
from agent.inference import InferenceEngine
from agent.inference_api import InferenceServer
from agent.model_store import ModelStore
from agent.mqtt_link import MqttLink
from agent.parts_store import PartsStore, dir_bytes
from agent.status import AgentStatus, Journal, write_status
from agent.trust_store import TrustStore
from toco_core.device import DeviceProfile
from toco_core.messages import (
    ActiveModel,
    AgentMessage,
    HardwareInfo,
    Phase,
    PlanSummary,
    StatusMessage,
    TelemetryMessage,
)

log = logging.getLogger("toco.agent")


def temperature() -> float | None:
    """The hottest sensor reading in degrees Celsius, or None where psutil has no sensors (or none reads)."""
    try:
        temps = psutil.sensors_temperatures()
    except (AttributeError, OSError):
        return None
    values = [t.current for entries in temps.values() for t in entries if t.current]
    return max(values) if values else None


def _finite(v: float | None) -> float | None:
    return v if v is not None and v != float("inf") else None


def _plan_json(plan: PlanSummary | None) -> dict[str, Any] | None:
    return None if plan is None else plan.model_dump(mode="json", exclude_none=True)


class StatusReport:
    """Builds and sends the agent's status and telemetry messages and keeps ``status.json`` current.

    Takes the agent's parts it reports on, ``send`` (hands a message to the link; False when it
    cannot) and getters for the parts made later in ``start()``. Thread-safe: the worker, the
    housekeeping loop, the drift worker and the dispatcher all write status.
    """

    def __init__(self, config: AgentConfig, store: ModelStore, engine: InferenceEngine, reporter: DriftReporter,
                 send: Callable[[AgentMessage], bool], link: Callable[[], MqttLink | None],
                 server: Callable[[], InferenceServer | None], profile: Callable[[], DeviceProfile | None]) -> None:
        self.config, self.store, self.engine, self.reporter = config, store, engine, reporter
        self._send, self._link, self._server, self._profile = send, link, server, profile
        self.last_deployment: dict[str, Any] | None = None
        self.trust: TrustStore | None = None  # set by the daemon: refusal counts and trusted keys for status
        self._lock = threading.Lock()

    def report(self, phase: Phase, journal: Journal, **fields: Any) -> None:
        """Send a deployment's ``phase`` (with StatusMessage ``fields``) and remember it for status.json.

        Raises pydantic's ValidationError for fields a StatusMessage does not take.
        """
        msg = StatusMessage(device_id=self.config.device_id, phase=phase, deployment_id=journal.deployment_id,
                            bundle_id=journal.bundle_id, **fields)
        self._send(msg)
        self.set_deployment({"deployment_id": journal.deployment_id, "bundle_id": journal.bundle_id,
                             "phase": phase.value, "reason": msg.reason.value if msg.reason else None,
                             "detail": msg.detail, "at": time.time()})

    def set_deployment(self, step: dict[str, Any]) -> None:
        """Remember ``step`` as the last deployment step and rewrite status.json with it; returns nothing."""
        self.last_deployment = step
        self.write()

    def birth(self) -> dict[str, Any]:
        """The link's birth payload: StateMessage fields ``hardware`` (HardwareInfo or None), ``group``
        (the configured one; the server decides) and ``active`` (ActiveModel or None)."""
        active = self.store.active()
        model = None
        if active is not None:
            plan = active.meta.plan
            model = ActiveModel(bundle_id=active.meta.bundle_id if len(active.meta.bundle_id) == 64 else None,
                                model_name=plan.model_name if plan else None, slot=active.slot, plan=plan)
        profile = self._profile()
        hardware = HardwareInfo.from_profile(profile) if profile is not None else None
        return {"hardware": hardware, "group": self.config.group, "active": model}

    def telemetry(self) -> None:
        """Send one TelemetryMessage: free memory and disk, CPU load, temperature, inference counts and latency."""
        stats = self.engine.stats.snapshot()
        self._send(TelemetryMessage(device_id=self.config.device_id, mem_available=psutil.virtual_memory().available,
                                    disk_free=shutil.disk_usage(self.config.state_dir).free,
                                    cpu_load=psutil.cpu_percent(None) / 100.0, temperature_c=temperature(),
                                    inferences=stats["samples"], latency_ms_p50=_finite(stats["p50_ms"]),
                                    latency_ms_p99=_finite(stats["p99_ms"]),
                                    refused_commands=dict(self.trust.state.refused) if self.trust else {}))

    def storage(self, bundle_id: str | None) -> dict[str, Any]:
        """The state dir's bytes, the parts received for ``bundle_id`` and the drift shadow's mode."""
        parts = PartsStore(self.config.state_dir)
        shadow = self.reporter.shadow_mode if bundle_id else None
        return {"state_dir_bytes": dir_bytes(self.config.state_dir),
                "download_bytes": parts.received(bundle_id) if bundle_id and parts.has(bundle_id) else None,
                "shadow": shadow}

    def write(self, running: bool = True) -> None:
        """Rewrite status.json (``running=False`` on shutdown); an unwritable file is logged, never raised."""
        active = self.store.active()
        last = self.reporter.last_report
        link, server = self._link(), self._server()
        status = AgentStatus(
            device_id=self.config.device_id, fleet=self.config.fleet, running=running,
            connected=bool(link and link.connected and running), broker=self.config.broker_url.split("@")[-1],
            api_url=server.url if server else None,
            active=None if active is None else {"bundle_id": active.meta.bundle_id, "slot": active.slot,
                                                "version": active.version, "plan": _plan_json(active.meta.plan),
                                                "fallback": active.fallback_reason},
            deployment=self.last_deployment,
            last_drift=None if last is None else {"window": last.window_index, "closed_at": last.closed_at,
                                                  "n_samples": last.n_samples, "alert": last.alert,
                                                  "out_of_band": last.out_of_band,
                                                  "measured_agreement": last.measured_agreement},
            outbox=link.outbox_size() if link else 0, inferences=self.engine.stats.samples,
            storage=self.storage(active.meta.bundle_id if active else None),
            refused_commands=dict(self.trust.state.refused) if self.trust else {},
            trusted_keys=self.trust.fingerprints() if self.trust else [])
        try:
            with self._lock:
                write_status(self.config.state_dir, status)
        except OSError as exc:
            log.warning("cannot write status.json", extra={"fields": {"error": str(exc)}})
