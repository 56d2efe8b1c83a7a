"""Wiring: config -> DB, signing key, broker (embedded or external), MQTT client, ingest,
deployments, drift policy, analysis jobs, housekeeping loop, and the FastAPI app on uvicorn.

Every process ingests, serves the API and signs commands; the singleton duties (housekeeping loop
steps, analysis job dispatch) run only while ``lease.is_leader`` (fleet_server.replicas).

``FleetServer(settings).start()`` brings everything up (tests and the demo use this);
``fleet_server.serve_process.serve(settings)`` also runs uvicorn in the foreground until SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from fleet_server.broker import EmbeddedBroker
from fleet_server.bundle_publisher import BundlePublisher
from fleet_server.command_outbox import CommandOutbox
from fleet_server.command_signer import CommandSigner
from fleet_server.config import FleetSettings
from fleet_server.db import BundleRow, Database
from fleet_server.deployments import Deployments
from fleet_server.drift_actions import DriftActions
from fleet_server.drift_policy import DriftPolicy
from fleet_server.event_relay import EventRelay
from fleet_server.events import EventBus
from fleet_server.get_queue import GetQueue
from fleet_server.ingest import Ingest
from fleet_server.jobs import JobRunner
from fleet_server.key_distribution import KeyDistributor
from fleet_server.keys import public_key_path
from fleet_server.mqtt_client import FleetMqtt
from fleet_server.reanalysis_gate import gate_settings
from fleet_server.registry import Store, update_analysis
from fleet_server.replicas import LeaderLease, check_replica_setup, make_lease
from fleet_server.retention import BundleRetention, Retention
from fleet_server.sample_scoring import SampleScorer
from fleet_server.session_drain import DeadSessionWatch, register_replica
from toco_core.bundle import BundleManifest
from toco_core.errors import ConfigError
from toco_core.topics import Topics, parse_broker_url

log = logging.getLogger("toco.fleet.server")


def mqtt_session(settings: FleetSettings) -> tuple[str, int | None]:
    """The server's MQTT client id, and the expiry of the broker-held session it resumes (None: a clean one).

    A kept session is what brings a killed server's unacknowledged messages back, and only a
    restart that asks for the same client id gets them: the id is ``toco-fleet-{fleet}``, with
    replicas ``toco-fleet-{fleet}-{mqtt user}`` (the identity fleet_server.replicas locks) or, without
    an MQTT user, ``-{replica_id}``. A replica id left at its default (hostname-pid) changes with every
    restart: such a replica gets a clean session, and a warning, because its abandoned session would
    go on being handed its share of the shared subscriptions with nobody to deliver them to. The
    embedded broker dies with the process (nothing to resume) and speaks MQTT 3.1.1 only.
    Takes the settings. Returns (client id, expiry seconds or None). Raises nothing.
    """
    s = settings
    if not s.replicas:
        client_id = f"toco-fleet-{s.fleet}"
    else:
        client_id = f"toco-fleet-{s.fleet}-{s.mqtt_username or s.replica_id}"
    if s.broker == "embedded" or s.mqtt_session_expiry_s == 0:
        return client_id, None
    if s.replicas and not s.mqtt_username and "replica_id" not in s.model_fields_set:
        log.warning("this replica's MQTT client id changes with every restart, so the broker cannot keep its "
                    "unacknowledged messages for it; give it --replica-id (or its own --mqtt-username)",
                    extra={"fields": {"client_id": client_id}})
        return client_id, None
    return client_id, s.mqtt_session_expiry_s


class FleetServer:
    """Every running part of the server; ``start()`` / ``stop()`` in dependency order."""

    def __init__(self, settings: FleetSettings | None = None) -> None:
        self.settings = s = settings or FleetSettings()
        check_replica_setup(s)  # replicas on SQLite or the embedded broker: refused before anything is made
        # first: an embedded broker that may not listen where asked must stop us before anything is made
        self.broker = (EmbeddedBroker(s.broker_host, s.broker_port, s.broker_password_file) if s.broker == "embedded"
                       else None)
        if self.broker is not None and s.broker_password_file is not None and not s.mqtt_username:
            raise ConfigError("the embedded broker has a password file but the server has no MQTT user of its own",
                              "give --mqtt-username and --mqtt-password-file (a user of that file)")
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = Store(s.data_dir)
        self.db = Database(s.database_url)
        self.signer = CommandSigner(s.signing_key_path, ttl_s=s.command_ttl_s)
        self.key = self.signer.active_key
        self.events = EventBus()
        self.topics = Topics(s.fleet)
        self.broker_url = self.broker.url if self.broker else s.broker
        self.ingest = Ingest(self.db, self.events)
        # replicas: each its own client id (a broker with use_username_as_clientid makes it the username, so
        # each replica also needs its own MQTT user); ingest shared among them, events relayed to all
        self.relay: EventRelay | None = None
        client_id, expiry = mqtt_session(s)
        self.mqtt = FleetMqtt(self.broker_url, self.topics, on_device=self.ingest.submit, on_get=self._on_get,
                              on_connect=self._on_connect, username=s.mqtt_username, password=s.broker_password,
                              ca_file=s.mqtt_ca_file, client_id=client_id, session_expiry_s=expiry,
                              shared_group="toco-fleet" if s.replicas else None,
                              on_relay=self._on_relay if s.replicas else None)
        if s.replicas:
            self.relay = EventRelay(self.events, self.topics, s.replica_id, self.mqtt.send)
            self.events.relay = self.relay.forward
        self.publisher = BundlePublisher(self.topics, self.mqtt.send, load=self._stored_bundle)
        # chunk and part requests are answered off paho's network thread, which then keeps reading statuses
        self.get_queue = GetQueue(self.publisher.handle_get, written=self.mqtt.wait_written)
        # every command leaves signed, addressed, sequenced and expiring (fleet_server.command_signer)
        send_command = self.signer.sender(self.mqtt.send_command)
        self.deployments = Deployments(self.db, self.events, publisher=self.publisher,
                                       send_command=send_command, timeout_s=s.deploy_timeout_s)
        # the drift policy's commands, when refused, are kept in the database for the leader's tick
        self.outbox = CommandOutbox(self.db, send_command)
        self.policy = DriftPolicy(self.db, self.events, mode=s.drift_policy, budget=s.budget,
                                  samples_wait_s=s.samples_wait_s, send_command=self.outbox.send,
                                  deployments=self.deployments, canary_share=s.canary_share,
                                  failure_threshold=s.failure_threshold, gate=gate_settings(s),
                                  scorer=SampleScorer(budget=s.budget, margin=0.05, wait_s=3 * s.samples_wait_s))
        self.ingest.on_status = self.deployments.on_status
        self.ingest.on_drift = self.policy.on_drift
        self.drift_actions = DriftActions(self.db, self.events, self.outbox.send, self.policy)
        self.jobs = JobRunner(self.db, self.store, self.key, self.events, concurrency=s.analysis_concurrency,
                              chunk_size=s.chunk_size, on_done=self.policy.on_analysis_done, executor=s.executor)
        self.policy.jobs = self.jobs
        self.deployments.repack = self._repack
        self.key_distributor = KeyDistributor(self.db, self.signer, send_command, on_reload=self._use_key)
        self.retention = Retention(self.db, telemetry_keep=s.telemetry_keep, events_keep_s=s.events_keep_days * 86400,
                                   interval_s=s.retention_interval_s, drift_keep=s.drift_keep,
                                   drift_keep_s=s.drift_keep_days * 86400, cycle_s=s.retention_cycle_s,
                                   bundles=BundleRetention(s.bundles_keep, s.bundle_min_age_days * 86400,
                                                           self.publisher.withdraw))
        self.lease = make_lease(s, self.db.engine.url, on_lost=self._lease_lost)
        self.client_id, self.session_expiry_s = client_id, expiry
        self.drain_watch: DeadSessionWatch | None = None
        self.identity = self.lease.identity if isinstance(self.lease, LeaderLease) else client_id
        if isinstance(self.lease, LeaderLease) and s.replicas:
            # a dead replica's broker-held session keeps its share of the messages: the leader drains it
            self.drain_watch = DeadSessionWatch(
                self.db, self.db.engine.url, replica_id=s.replica_id, own_client_id=client_id,
                broker_url=self.broker_url, topics=self.topics,
                shared_group="toco-fleet", on_device=self.ingest.submit, on_get=self._on_get,
                is_leader=lambda: self.lease.is_leader, password_dir=s.mqtt_peer_password_dir,
                ca_file=s.mqtt_ca_file, check_s=s.lease_check_s, grace_s=s.session_drain_grace_s,
                quiet_s=s.session_drain_quiet_s)
        self.exit_on_lease_loss = False  # serve_process.serve() sets it: the process ends, its supervisor restarts it
        self._stop = threading.Event()
        self._tick_thread: threading.Thread | None = None
        self.started = False

    @property
    def public_key_path(self):
        """The active signing key's public half (PEM): what a newly provisioned device is given."""
        active = self.signer.ring.entry(self.signer.ring.active)
        return public_key_path(self.settings.signing_key_path.with_name(active.file))

    def _use_key(self, key) -> None:
        """A rotation was picked up: new bundles are signed with the new active key too."""
        self.key = self.jobs.key = key

    def _stored_bundle(self, bundle_id: str) -> tuple[BundleManifest, bytes] | None:
        """A stored bundle's manifest and bytes for the publisher (None: not stored, or its file is gone)."""
        with self.db.session() as s:
            row = s.get(BundleRow, bundle_id)
            found = None if row is None else (row.manifest, row.path)
        if found is None:
            return None
        try:
            return BundleManifest.model_validate(found[0]), Path(found[1]).read_bytes()
        except OSError as exc:
            log.error("stored bundle unreadable", extra={"fields": {"bundle": bundle_id[:12], "error": str(exc)}})
            return None

    def _repack(self, analysis_id: str) -> str:
        """Pack an analysis' bundle again (retention deleted it); the analysis points at the new one."""
        bundle_id = self.jobs.build_bundle(analysis_id)
        update_analysis(self.db, analysis_id=analysis_id, bundle_id=bundle_id)
        return bundle_id

    def mqtt_user(self) -> str | None:
        """The MQTT user this server logs in as (the setting, else the broker URL's), None for anonymous."""
        return self.settings.mqtt_username or parse_broker_url(self.broker_url).username or None

    def _on_get(self, topic: str, payload: bytes) -> None:
        self.get_queue.submit(topic, payload)

    def _on_connect(self) -> None:
        log.info("connected to the broker", extra={"fields": {"url": self.broker_url}})

    def _on_relay(self, payload: bytes) -> None:
        if self.relay is not None:
            self.relay.receive(payload)

    def _lease_lost(self, reason: str) -> None:
        """The leader lease's session broke: no duty runs here any more; under serve() the process ends."""
        log.error("replica lease lost; the singleton duties stop here", extra={"fields": {"reason": reason[:200]}})
        if self.exit_on_lease_loss:
            os.kill(os.getpid(), signal.SIGTERM)

    def start(self) -> FleetServer:
        """Take the lease, start broker (if embedded), ingest, MQTT and the housekeeping loop; the leader
        also dispatches analysis jobs. Returns self. Raises ReplicaError when this serve may not run
        (a second one on a SQLite data dir, an MQTT identity another replica holds)."""
        self.lease.acquire(solo=not self.settings.replicas)
        try:
            if self.broker is not None:
                self.broker.start()
            self.ingest.start()
            self.mqtt.start()
            if self.relay is not None:
                self.relay.start()
            # the job runner starts when this process leads: it re-queues analyses a dead leader left
            # running, so it must never start on two replicas at once
            self.lease.start(on_gained=self.jobs.start)
            if self.drain_watch is not None:
                if self.session_expiry_s is not None:  # a clean session leaves nothing behind to drain
                    register_replica(self.db, client_id=self.client_id, replica_id=self.settings.replica_id,
                                     identity=self.identity, mqtt_user=self.mqtt_user(),
                                     session_expiry_s=self.session_expiry_s)
                self.drain_watch.start()
        except BaseException:
            self.lease.stop()
            raise
        self._tick_thread = threading.Thread(target=self._tick_loop, name="housekeeping", daemon=True)
        self._tick_thread.start()
        self.started = True
        return self

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            steps: tuple[Callable[[], object], ...]
            if self.lease.is_leader:
                steps = (self.deployments.tick, self.policy.tick, self.outbox.tick, self.key_distributor.tick,
                         self.retention.tick)
            else:  # a follower still signs commands (ingest, API): it follows key rotations
                steps = (self.key_distributor.reload,)
            for step in steps:
                try:
                    step()
                except Exception:  # housekeeping must keep running
                    log.exception("housekeeping step failed", extra={"fields": {"step": step.__qualname__}})

    def stop(self) -> None:
        """Stop everything started, newest first, each part within a bounded time (a SIGTERM'd serve must end in
        seconds, whatever the broker or the database do: every thread waited for here is a daemon, so a part
        that overstays its join does not hold the process)."""
        self._stop.set()
        if self._tick_thread is not None:
            self._tick_thread.join(3)
        self.jobs.stop()
        if self.drain_watch is not None:
            self.drain_watch.stop()
        # ingest first: what it stores now is acknowledged while the connection is still up; what
        # arrives meanwhile, or waits beyond its time, stays unacknowledged and comes back with the next start
        self.ingest.stop(timeout=2)
        if self.relay is not None:
            self.relay.stop()  # the last batch of events, while the connection is up
        self.mqtt.stop(timeout=2)
        if self.broker is not None:
            self.broker.stop()
        self.lease.stop()
        self.db.close()
        self.started = False

    def health(self) -> dict:
        """``{"status": "ok", "broker": "connected"|"disconnected", "messages": ingest counters, "publishing":
        {"refused", "dropped_disconnected", "queued_disconnected", "chunks_served", "part_ranges_served",
        "part_ranges_coalesced", "part_requests", "part_requests_late", "part_serve_ms", "part_request_age_max_ms",
        "requests_waiting", "requests_dropped"},
        "fleet",
        "broker_url", "replica": {"id", "replicas", "leader"}}`` (leader: this process runs the singleton duties).
        ``refused``: publishes the MQTT client refused (no packet id free); ``dropped_disconnected``: QoS 0
        publishes lost while disconnected; ``queued_disconnected``: QoS 1 ones kept for the reconnect."""
        mqtt_stats, served = self.mqtt.stats, self.publisher.stats
        publishing = {"refused": mqtt_stats["refused"], "dropped_disconnected": mqtt_stats["dropped_disconnected"],
                      "queued_disconnected": mqtt_stats["queued_disconnected"],
                      "chunks_served": served["chunks_sent"], "part_ranges_served": served["ranges_sent"],
                      # duplicates not served again, and the part serving's load: requests, those served more
                      # than 10 s after the box sent them, ms spent serving, the oldest request served
                      "part_ranges_coalesced": served["ranges_coalesced"], "part_requests": served["part_requests"],
                      "part_requests_late": served["part_requests_late"], "part_serve_ms": served["serve_ms"],
                      "part_request_age_max_ms": served["request_age_max_ms"],
                      "requests_waiting": len(self.get_queue), "requests_dropped": self.get_queue.stats["dropped"]}
        return {"status": "ok", "broker": "connected" if self.mqtt.connected.is_set() else "disconnected",
                "messages": dict(self.ingest.stats), "publishing": publishing, "fleet": self.settings.fleet,
                "broker_url": self.broker_url,
                "replica": {"id": self.settings.replica_id, "replicas": self.settings.replicas,
                            "leader": self.lease.is_leader,
                            "drained_sessions": [] if self.drain_watch is None else list(self.drain_watch.drained)}}


class HttpThread:
    """uvicorn serving an app in a background thread (tests, the demo, ``serve``)."""

    def __init__(self, app, host: str, port: int) -> None:
        import uvicorn

        if port == 0:
            with socket.socket() as sock:
                sock.bind((host, 0))
                port = sock.getsockname()[1]
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, name="http", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> HttpThread:
        """Start serving and wait until uvicorn reports started. Raises TimeoutError otherwise."""
        self.thread.start()
        end = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > end or not self.thread.is_alive():
                raise TimeoutError(f"the HTTP server did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Ask uvicorn to exit and join it."""
        self.server.should_exit = True
        self.thread.join(10)
