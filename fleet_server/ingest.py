"""MQTT ingest: state, telemetry, status, drift and samples from the devices into the registry.

Every payload is validated with ``toco_core.messages.parse_message``; a bad one (bad JSON, a
schema mismatch, a device id that disagrees with its topic) is counted, logged with the
device id, and dropped. Messages are queued by the network thread and written by one ingest
thread in batches (one transaction per batch, a savepoint per message, so one bad message or
handler bug never loses the rest of the batch). Events and commands go out after the commit.

Each message comes with its acknowledgement (fleet_server.mqtt_client), called once its batch is
committed: a server killed with messages queued or in an uncommitted batch never acknowledged
them, and the broker delivers them again to the restarted server. A batch that cannot be committed
after its retries is acknowledged all the same (and counted in ``errors``): holding it would stall
the broker's in-flight window to this server until the next reconnect, and a message that breaks
the batch would come back after every reconnect. A message may so arrive twice (killed after the
commit, before the acknowledgement): a drift report is recognised by device, window and close
time, a field sample by device, ref and window, a telemetry point the broker flags as sent before
(DUP) by device and send time, and stored once; state and status messages are
idempotent (a repeated birth or deployment phase changes nothing but a timeline line).

Who sent it matters (fleet_server.enrollment): a revoked device is ignored; a device never
enrolled is recorded as quarantined and its status, drift and samples reach no hook; an
enrolled device keeps its enrolled group whatever its state message claims.
"""

from __future__ import annotations

import base64
import binascii
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from fleet_server.db import Database, DeviceRow, DriftRow, SampleRow, TelemetryRow
from fleet_server.deployment_rules import lock_deployments
from fleet_server.enrollment import ENROLLED, QUARANTINED, REVOKED, note_claimed_group
from fleet_server.events import EventBus
from fleet_server.replicas import DRIFT_POLICY, transaction_lock
from fleet_server.views import device_view
from toco_core.messages import (
    AgentMessage,
    DriftMessage,
    Message,
    MessageError,
    MessageKind,
    SamplesMessage,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    parse_message,
)

log = logging.getLogger("toco.fleet.ingest")
After = list[Callable[[], None]]  # work to do once the batch is committed (events, commands)
Ack = Callable[[], None]  # tells the broker one message is safely stored (fleet_server.mqtt_client)
DEFAULT_GROUP = "default"  # the group of a device before it is enrolled (it is quarantined then)
BATCH_ATTEMPTS = 4  # a batch aborted by a lock conflict is written again this many times in all
RETRYABLE_SQLSTATES = {"40001", "40P01", "55P03"}  # serialization failure, deadlock, lock not available
BAND_NAMES = {"agreement": "agreement", "confidence": "confidence", "entropy_psi": "entropy",
              "output_psi": "output_psi", "input_shift": "input_shift"}


def drift_point(msg: DriftMessage) -> dict[str, Any]:
    """The API's DriftPoint of a report: values, alert, and each check's band [low, high].

    ``entropy`` is the entropy PSI check's value when the agent judged it (its band is on PSI),
    else the window's mean entropy. A model without classes (``task_kind`` regression, score,
    embedding) has no confidence or entropy (None): ``output_mean`` / ``output_std`` describe its
    output summary and ``output_psi`` is its distribution check's value.
    """
    checks = {c.name: c for c in msg.checks}
    bands = {BAND_NAMES[n]: [c.low, c.high] for n, c in checks.items() if n in BAND_NAMES}
    psi = checks.get("entropy_psi")
    shift = checks.get("input_shift")
    out_psi = checks.get("output_psi")
    return {"t": msg.closed_at, "device_id": msg.device_id, "window": msg.window_index, "bundle_id": msg.bundle_id,
            "agreement": msg.measured_agreement, "predicted_agreement": msg.predicted_agreement,
            "confidence": msg.mean_confidence,
            "entropy": psi.value if psi is not None and psi.value is not None else msg.mean_entropy,
            "mean_entropy": msg.mean_entropy, "task_kind": None if msg.task_kind is None else msg.task_kind.value,
            "output_mean": msg.output_mean, "output_std": msg.output_std,
            "output_psi": None if out_psi is None else out_psi.value,
            "input_shift": shift.value if shift is not None and shift.value is not None else 0.0,
            "accuracy": msg.accuracy, "alert": msg.alert, "out_of_band": list(msg.out_of_band),
            "consecutive_out_of_band": msg.consecutive_out_of_band, "n_samples": msg.n_samples,
            "n_shadowed": msg.n_shadowed, "bands": bands}


def retryable(exc: OperationalError) -> bool:
    """True when the database aborted the transaction over a lock conflict that a retry resolves.

    PostgreSQL says so with a SQLSTATE (serialization failure, deadlock, lock not available); SQLite
    with "database is locked". Takes the SQLAlchemy error. Returns the verdict. Raises nothing.
    """
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None)
    return state in RETRYABLE_SQLSTATES or "database is locked" in str(exc.orig)


class Ingest:
    """Validates and stores device messages. ``stats`` counts received/dropped per kind."""

    def __init__(self, db: Database, events: EventBus, *, on_status=None, on_drift=None, batch: int = 500) -> None:
        """``on_status(s, device, msg, after)`` and ``on_drift(s, device, msg, after)`` are the
        deployment and drift hooks."""
        self.db, self.events = db, events
        self.on_status, self.on_drift = on_status, on_drift
        self.batch = batch
        self.stats: Counter[str] = Counter()
        self._tally: Counter[str] = Counter()
        self._q: queue.Queue = queue.Queue()
        self._stored: set[tuple] = set()  # the batch's keys already in the database (_already_stored)
        self._thread: threading.Thread | None = None
        self._deadline: float | None = None  # stop(): no new batch is begun after this (monotonic seconds)
        self.idle = threading.Event()

    def start(self) -> None:
        """Start the ingest thread."""
        self._thread = threading.Thread(target=self._loop, name="ingest", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 3.0) -> None:
        """Process what is queued for up to ``timeout`` seconds, then end the thread (a batch being written is
        finished). What is left was never acknowledged: a broker-held session delivers it again after the restart.
        Returns None; raises nothing."""
        self._deadline = time.monotonic() + timeout
        self._q.put(None)
        if self._thread is not None:
            self._thread.join(timeout + 2)
            if self._thread.is_alive():
                log.warning("ingest did not finish its batch in time; its messages stay unacknowledged",
                            extra={"fields": {"queued": self._q.qsize()}})

    def submit(self, kind: MessageKind, device_id: str, payload: bytes, ack: Ack | None = None,
               redelivered: bool = False) -> None:
        """Queue one message from the network thread (never blocks); ``ack()`` runs once it is committed.
        ``redelivered``: the broker sent it before (MQTT's DUP flag), so it may be stored already."""
        self.stats[f"received.{kind.value}"] += 1
        self.idle.clear()
        self._q.put((kind, device_id, payload, ack, redelivered))

    def pending(self) -> int:
        """Messages waiting to be written."""
        return self._q.qsize()

    def _loop(self) -> None:
        while True:
            if self._q.empty():
                self.idle.set()
            first = self._q.get()
            if first is None:
                return
            if self._deadline is not None and time.monotonic() > self._deadline:  # stopping, out of time
                log.info("ingest stopped with messages queued; unacknowledged, the broker delivers them again",
                         extra={"fields": {"queued": self._q.qsize() + 1}})
                return
            items = [first]
            while len(items) < self.batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._commit(items)
                    return
                items.append(nxt)
            self._commit(items)

    def _commit(self, items: list[tuple[MessageKind, str, bytes, Ack | None, bool]]) -> None:
        """Write one batch, then acknowledge its messages (never before: see the module's docstring)."""
        self._process([(kind, device_id, payload, redelivered) for kind, device_id, payload, _, redelivered in items])
        for _, _, _, ack, _ in items:
            if ack is not None:
                try:
                    ack()
                except Exception:  # the broker delivers it again after a reconnect; ingest knows it then
                    log.exception("acknowledging a stored message failed")

    def _process(self, items: list[tuple[MessageKind, str, bytes, bool]]) -> None:
        """Parse and store one batch of (kind, device id, payload, redelivered)."""
        parsed: list[tuple[MessageKind, str, Message | None]] = []
        redelivered: list[Message] = []
        msg: Message | None
        for kind, device_id, payload, again in items:
            try:
                msg = parse_message(kind, payload)
                if not isinstance(msg, AgentMessage):
                    raise MessageError(f"{kind.value} is not a device message", "devices publish device messages")
                if msg.device_id != device_id:
                    raise MessageError(f"payload names device {msg.device_id!r} on the topic of {device_id!r}",
                                       "a device publishes only on its own topics")
                parsed.append((kind, device_id, msg))
                if again:
                    redelivered.append(msg)
            except MessageError as exc:
                self.stats[f"dropped.{kind.value}"] += 1
                self.stats["dropped"] += 1
                log.warning("dropped a bad message", extra={"fields": {"device": device_id, "kind": kind.value,
                                                                       "error": str(exc)[:300]}})
                parsed.append((kind, device_id, None))
        for attempt in range(1, BATCH_ATTEMPTS + 1):
            after: After = []
            self._tally = Counter()  # what the handlers count, kept only if the batch commits
            try:
                self._write(parsed, redelivered, after)
                break
            except OperationalError as exc:
                # two replicas' batches (or a batch and the deployment controller) touching the same rows
                # in different orders: PostgreSQL aborts one (deadlock, serialization failure); the batch
                # is whole in memory, so write it again rather than lose its rows
                if attempt == BATCH_ATTEMPTS or not retryable(exc):
                    self.stats["errors"] += 1
                    log.exception("ingest batch failed to commit", extra={"fields": {"messages": len(items)}})
                    return
                self.stats["retried"] += 1
                log.info("ingest batch retried", extra={"fields": {"attempt": attempt, "error": str(exc.orig)[:200]}})
                time.sleep(0.05 * attempt)
            except Exception:
                self.stats["errors"] += 1
                log.exception("ingest batch failed to commit", extra={"fields": {"messages": len(items)}})
                return
        self.stats.update(self._tally)
        for fn in after:
            try:
                fn()
            except Exception:
                log.exception("post-commit action failed")
        self.stats["stored"] += sum(1 for p in parsed if p[2] is not None)

    def _write(self, parsed: list[tuple[MessageKind, str, Message | None]], redelivered: list[Message],
               after: After) -> None:
        """Write one batch in one transaction (a savepoint per message but telemetry); raises what commit raises."""
        with self.db.session(write=True) as s:
            if any(kind is MessageKind.DRIFT and msg is not None for kind, _, msg in parsed):
                # the drift policy (cooldowns, caps, quorums) runs here on any replica: one batch at a
                # time, and before any deployment row lock, so lock orders never cross
                transaction_lock(s, DRIFT_POLICY)
            # and the deployments its status messages move, all now and in id order, never one by one
            lock_deployments(s, [msg.deployment_id for kind, _, msg in parsed
                                 if kind is MessageKind.STATUS and isinstance(msg, StatusMessage)
                                 and msg.deployment_id])
            # one query for the batch's devices, their rows locked in id order (PostgreSQL), so two replicas'
            # batches wait for each other instead of deadlocking; the handlers' lookups then hit the identity
            # map (which holds objects weakly: ``known`` keeps them alive for the batch)
            ids = sorted({device_id for _, device_id, _ in parsed})
            known = s.scalars(select(DeviceRow).where(DeviceRow.id.in_(ids)).order_by(DeviceRow.id)  # noqa: F841
                              .with_for_update()).all()
            self._stored = self._already_stored(s, parsed, redelivered)
            for kind, device_id, msg in parsed:
                if kind is MessageKind.TELEMETRY and msg is not None:
                    # the bulk of the traffic, and it only adds a row: no savepoint (a flush per
                    # message would halve ingest throughput); its rows are inserted in one flush
                    self._handle(s, kind, device_id, msg, after)
                    continue
                try:
                    with s.begin_nested():
                        self._handle(s, kind, device_id, msg, after)
                except OperationalError:
                    raise  # the transaction is aborted: the whole batch is retried
                except Exception:
                    self._tally["errors"] += 1
                    log.exception("ingest handler failed", extra={"fields": {"device": device_id, "kind": kind.value}})

    def _already_stored(self, s, parsed: list[tuple[MessageKind, str, Message | None]],
                        redelivered: list[Message]) -> set[tuple]:
        """Keys of the batch's messages the database already holds (the broker delivered them again):
        ``("drift", device, window, closed_at)``, ``("sample", device, ref, window)`` and, for telemetry the
        broker flagged as sent before (``redelivered``; the bulk of the traffic is not looked up),
        ``("telemetry", device, sent_at)``. One query per kind present, on the rows' device indexes."""
        drift = [m for k, _, m in parsed if k is MessageKind.DRIFT and isinstance(m, DriftMessage)]
        samples = [m for k, _, m in parsed if k is MessageKind.SAMPLES and isinstance(m, SamplesMessage)]
        found: set[tuple] = set()
        if drift:
            rows = s.execute(select(DriftRow.device_id, DriftRow.window, DriftRow.t).where(
                DriftRow.device_id.in_({m.device_id for m in drift}), DriftRow.t.in_({m.closed_at for m in drift})))
            found.update(("drift", *row) for row in rows)
        if samples:
            rows = s.execute(select(SampleRow.device_id, SampleRow.ref, SampleRow.window).where(
                SampleRow.device_id.in_({m.device_id for m in samples}),
                SampleRow.ref.in_({smp.ref for m in samples for smp in m.samples})))
            found.update(("sample", *row) for row in rows)
        points = [m for m in redelivered if isinstance(m, TelemetryMessage)]
        if points:
            rows = s.execute(select(TelemetryRow.device_id, TelemetryRow.t).where(
                TelemetryRow.device_id.in_({m.device_id for m in points}),
                TelemetryRow.t.in_({m.sent_at for m in points})))
            found.update(("telemetry", *row) for row in rows)
        return found

    def _device(self, s, device_id: str) -> DeviceRow:
        d = s.get(DeviceRow, device_id)
        if d is None:
            # never enrolled: shown (so it can be enrolled) but trusted with nothing
            d = DeviceRow(id=device_id, group=DEFAULT_GROUP, online=True, birth=0, last_seen=time.time(), hardware={},
                          alert=False, bad_messages=0, enrollment=QUARANTINED)
            s.add(d)
            self._tally["quarantined"] += 1
            log.warning("unknown device quarantined; enroll it with `toco-fleet devices enroll`",
                        extra={"fields": {"device": device_id}})
        return d

    def _handle(self, s, kind: MessageKind, device_id: str, msg, after: After) -> None:
        if msg is None:
            known = s.get(DeviceRow, device_id)
            if known is not None:
                known.bad_messages += 1
            return
        d = self._device(s, device_id)
        if d.enrollment == REVOKED:
            self._tally["ignored.revoked"] += 1
            return
        trusted = d.enrollment == ENROLLED  # a quarantined device is recorded, but its reports trigger nothing
        if kind is MessageKind.STATE:
            self._state(d, msg, after)
        elif kind is MessageKind.TELEMETRY:
            self._telemetry(s, d, msg, after)
        elif kind is MessageKind.STATUS:
            d.last_seen = max(d.last_seen, time.time())
            if self.on_status is not None and trusted:
                self.on_status(s, d, msg, after)
        elif kind is MessageKind.DRIFT:
            self._drift(s, d, msg, after, trusted)
        elif kind is MessageKind.SAMPLES:
            if trusted:  # field samples feed re-analyses: only from devices the server enrolled
                self._samples(s, d, msg)
            else:
                self._tally["ignored.quarantined_samples"] += 1

    def _state(self, d: DeviceRow, msg: StateMessage, after: After) -> None:
        if msg.state == "offline" and msg.birth < d.birth:
            return  # the will of an older connection, arriving after a newer birth
        d.birth = max(d.birth, msg.birth)
        d.online = msg.state == "online"
        d.last_seen = time.time()
        if msg.state == "online":
            d.agent_version = msg.agent_version
            if msg.hardware is not None:
                d.hardware = msg.hardware.model_dump(mode="json")
            if note_claimed_group(d, msg.group):
                self._tally["group_mismatch"] += 1
            if msg.active is not None:
                d.active = {**(d.active or {}), **msg.active.model_dump(mode="json")} if msg.active.bundle_id else None
        view = device_view(d)
        after.append(lambda: self.events.publish("device", view))

    def _telemetry(self, s, d: DeviceRow, msg: TelemetryMessage, after: After) -> None:
        key = ("telemetry", d.id, msg.sent_at)
        if key in self._stored:  # delivered again: stored the first time
            self._tally["duplicates"] += 1
            return
        self._stored.add(key)  # two copies in one batch (a redelivery right behind its original)
        now = time.time()
        d.last_seen, d.online = now, True
        if d.hardware is not None and d.hardware.get("available_memory") != msg.mem_available:
            d.hardware = {**d.hardware, "available_memory": msg.mem_available}
        point = {"t": msg.sent_at, "cpu_percent": 100.0 * msg.cpu_load, "available_memory": msg.mem_available,
                 "inferences": msg.inferences, "p50_ms": msg.latency_ms_p50}
        s.add(TelemetryRow(device_id=d.id, **point))
        after.append(lambda: self.events.publish("telemetry", {"device_id": d.id, **point}))

    def _drift(self, s, d: DeviceRow, msg: DriftMessage, after: After, trusted: bool) -> None:
        key = ("drift", d.id, msg.window_index, msg.closed_at)
        if key in self._stored:  # delivered again: stored, and acted on, the first time
            self._tally["duplicates"] += 1
            return
        self._stored.add(key)
        point = drift_point(msg)
        s.add(DriftRow(device_id=d.id, bundle_id=msg.bundle_id, window=msg.window_index, t=msg.closed_at,
                       alert=msg.alert, point=point, disputed=[r.model_dump(mode="json") for r in msg.disputed]))
        d.last_drift, d.alert, d.last_seen = point, msg.alert, time.time()
        after.append(lambda: self.events.publish("drift", point))
        if self.on_drift is not None and trusted:
            self.on_drift(s, d, msg, after)

    def _samples(self, s, d: DeviceRow, msg: SamplesMessage) -> None:
        if msg.samples and all(("sample", d.id, smp.ref, msg.window) in self._stored for smp in msg.samples):
            self._tally["duplicates"] += 1  # delivered again
            return
        for smp in msg.samples:
            try:
                data = base64.b64decode(smp.data_b64, validate=True)
            except (binascii.Error, ValueError):
                self._tally["dropped.sample"] += 1
                log.warning("field sample is not base64", extra={"fields": {"device": d.id, "ref": smp.ref}})
                continue
            s.add(SampleRow(device_id=d.id, ref=smp.ref, window=msg.window, dtype=smp.dtype, shape=list(smp.shape),
                            data=data, reason=smp.reason, t=time.time()))
        self._tally["samples"] += len(msg.samples)
