"""The simulated devices of bench/fleet.py: protocol-speaking MQTT clients, not agents.

Every device is an MQTT connection of its own (client id, username and password, will, command
subscription), driven by asyncio: thousands of devices share one event loop in a child process,
with no thread per device. The client is aiomqtt, chosen because it is the maintained asyncio
wrapper around the paho-mqtt 2.x the agents and the server already speak, so the packets on the
wire come from the same MQTT implementation; paho's own network loop is replaced by the event
loop's epoll readers (no select(), so no 1,024-descriptor ceiling per process). gmqtt (the other
well-kept asyncio client) is not installable from this box's package index.

A device sends its birth at the start, then telemetry every ``telemetry_s`` and a drift window
every ``drift_s``, each at a phase of its own (device i of n at i/n of the period), as a fleet
of boxes started at different times does, instead of all devices at the same instant.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AsyncExitStack, suppress
from dataclasses import dataclass, field

import aiomqtt

from bench._fleet_sim_fetch import SimFetch
from toco_core.messages import (
    MAX_RANGES_PER_REQUEST,
    BundleManifest,
    DeployCommand,
    DriftMessage,
    FailureReason,
    HardwareInfo,
    Message,
    MessageKind,
    PartRange,
    PartRequest,
    StateMessage,
    StatusMessage,
    TelemetryMessage,
    encode,
    parse_message,
)
from toco_core.progress_reports import ProgressReports
from toco_core.topics import DELIVERY, Topics

FLEET = "bench"
HW = {"total_memory": 512 << 20, "available_memory": 300 << 20, "free_storage": 1 << 30, "physical_cores": 1,
      "logical_cores": 1, "cpu_model": "sim", "ort_version": "1.0"}
# one event loop carries this many devices; 10,000 devices are 4 processes on this 2-core box
DEVICES_PER_PROCESS = 2500
# concurrent connection handshakes per process: a burst of 2,500 SYNs at once overflows mosquitto's
# listen backlog, and a refused device would have to wait out a retry
CONNECTS_AT_ONCE = 64
# a QoS 1 publish not acknowledged by the broker within this long is counted as failed
PUBACK_TIMEOUT_S = 120.0


def bench_password(user: str) -> str:
    """The bench password of MQTT user ``user`` (a simulated device, a server, the monitor): the bench's broker
    has a password file of them."""
    return f"sim-{user}-pw"


@dataclass
class Stats:
    """What the devices of one process did: messages handed to the client, acknowledged by the broker
    (QoS 1) or written to the socket (QoS 0), and failed, per message kind; connections and drops."""

    sent: Counter[str] = field(default_factory=Counter)
    acked: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    connected: int = 0
    disconnects: int = 0
    part_bytes: int = 0
    part_rerequests: int = 0  # ranges asked for again after a silence (bench._fleet_sim_fetch)
    part_stalls: int = 0  # fetches given up as transfer_stalled

    def as_dict(self) -> dict:
        """Plain dict for the pipe to the parent."""
        return {"sent": dict(self.sent), "acked": dict(self.acked), "failed": dict(self.failed),
                "connected": self.connected, "disconnects": self.disconnects, "part_bytes": self.part_bytes,
                "part_rerequests": self.part_rerequests, "part_stalls": self.part_stalls}


class SimDevice:
    """One simulated device: its connection task, its traffic task and the deployments it receives."""

    def __init__(self, port: int, device_id: str, group: str, stats: Stats, gate: asyncio.Semaphore) -> None:
        self.port, self.id, self.group, self.stats, self.gate = port, device_id, group, stats, gate
        self.t = Topics(FLEET)
        self.seq = 0
        self.client: aiomqtt.Client | None = None
        self.up = asyncio.Event()
        self.pending: set[asyncio.Task] = set()
        self.manifest: BundleManifest | None = None
        self.got_manifest = asyncio.Event()
        self.fetch: SimFetch | None = None  # the parts fetch of the deployment under way
        self.got_parts = asyncio.Event()

    async def connection(self) -> None:
        """Connect (again after a drop, one second later) and hand incoming messages to ``_on_message``
        until cancelled; a drop is counted."""
        offline = StateMessage(device_id=self.id, state="offline", birth=1)
        will = aiomqtt.Will(self.t.device(MessageKind.STATE, self.id), encode(offline), qos=1, retain=True)
        while True:
            client = aiomqtt.Client("127.0.0.1", self.port, identifier=self.id, username=self.id,
                                    password=bench_password(self.id), will=will, keepalive=60, timeout=60)
            try:
                async with AsyncExitStack() as stack:
                    async with self.gate:
                        await stack.enter_async_context(client)
                        await client.subscribe(self.t.device(MessageKind.CMD, self.id), qos=1, timeout=60)
                    self.client = client
                    if not self.up.is_set():
                        self.stats.connected += 1
                        self.up.set()
                    elif self.fetch is not None:
                        self.fetch.reconnected(asyncio.get_running_loop().time())
                    async for msg in client.messages:
                        self._on_message(str(msg.topic), bytes(msg.payload))
            except aiomqtt.MqttError:
                self.client = None
                self.stats.disconnects += 1
                await asyncio.sleep(1)

    def send(self, kind: MessageKind, msg: Message) -> None:
        """Publish ``msg`` with the protocol's QoS and retain flag; counted as sent, then acknowledged or failed."""
        self.seq += 1
        self.stats.sent[kind.value] += 1
        task = asyncio.get_running_loop().create_task(self._publish(kind, msg.model_copy(update={"seq": self.seq})))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _publish(self, kind: MessageKind, msg: Message) -> None:
        rule = DELIVERY[kind]
        try:
            if self.client is None:
                raise aiomqtt.MqttError("not connected")
            await self.client.publish(self.t.device(kind, self.id), encode(msg), qos=rule.qos, retain=rule.retain,
                                      timeout=PUBACK_TIMEOUT_S)
        except aiomqtt.MqttError:
            self.stats.failed[kind.value] += 1
        else:
            self.stats.acked[kind.value] += 1

    async def traffic(self, phase: float, telemetry_s: float, drift_s: float) -> None:
        """Birth now, then telemetry every ``telemetry_s`` and drift every ``drift_s``, both shifted by
        ``phase`` (0..1) of their period; runs until cancelled."""
        self.send(MessageKind.STATE, StateMessage(device_id=self.id, state="online", birth=1, agent_version="sim",
                                                  hardware=HardwareInfo(**HW, device_id=self.id), group=self.group))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        next_tel, next_drift, window = t0 + phase * telemetry_s, t0 + (1 + phase) * drift_s, 0
        while True:
            await asyncio.sleep(max(0.0, min(next_tel, next_drift) - loop.time()))
            if loop.time() >= next_tel:
                self.send(MessageKind.TELEMETRY, TelemetryMessage(
                    device_id=self.id, mem_available=300 << 20, disk_free=1 << 30, cpu_load=0.3, inferences=100,
                    latency_ms_p50=2.0))
                next_tel += telemetry_s
            if loop.time() >= next_drift:
                now = time.time()
                self.send(MessageKind.DRIFT, DriftMessage(
                    device_id=self.id, window_index=window, opened_at=now - drift_s, closed_at=now, n_samples=256,
                    n_shadowed=26, measured_agreement=0.99, predicted_agreement=0.99, mean_confidence=0.9,
                    mean_entropy=0.3, input_mean=0.1, input_std=0.3))
                window, next_drift = window + 1, next_drift + drift_s

    def _on_message(self, topic: str, payload: bytes) -> None:
        where = self.t.parse(topic)
        if where.kind is MessageKind.CMD:
            cmd = parse_message(MessageKind.CMD, payload)
            if isinstance(cmd, DeployCommand):
                task = asyncio.get_running_loop().create_task(self._deploy(cmd))
                self.pending.add(task)
                task.add_done_callback(self.pending.discard)
        elif where.kind is MessageKind.MANIFEST and payload:
            self.manifest = parse_message(MessageKind.MANIFEST, payload)
            self.got_manifest.set()
        elif where.kind is MessageKind.PART and self.fetch is not None:
            head, _, data = payload.partition(b"\n")
            self.fetch.frame(_range_key(head), len(data), asyncio.get_running_loop().time())
            if self.fetch.done:
                self.got_parts.set()

    def _ask(self, bundle_id: str) -> Callable[[list[PartRange]], None]:
        """The fetch's request function: one PartRequest (at most MAX_RANGES_PER_REQUEST ranges) published in a
        task of its own, as the agent's link sends it without waiting; a request made while disconnected is lost,
        as the agent's would be (its reconnect asks again)."""
        def ask(ranges: list[PartRange]) -> None:
            req = PartRequest(device_id=self.id, bundle_id=bundle_id, ranges=ranges[:MAX_RANGES_PER_REQUEST])
            task = asyncio.get_running_loop().create_task(self._publish_get(bundle_id, req))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
        return ask

    async def _publish_get(self, bundle_id: str, req: PartRequest) -> None:
        with suppress(aiomqtt.MqttError):
            if self.client is not None:
                await self.client.publish(self.t.get(bundle_id, self.id), encode(req),
                                          qos=DELIVERY[MessageKind.GET].qos, timeout=60)

    def _status(self, cmd: DeployCommand, phase: str, **fields: object) -> None:
        self.send(MessageKind.STATUS, StatusMessage(device_id=self.id, phase=phase, deployment_id=cmd.deployment_id,
                                                    bundle_id=cmd.bundle_id, **fields))

    async def _deploy(self, cmd: DeployCommand) -> None:
        """As an agent fetching a whole parts bundle but its optional fp32 part: ranges of its own on its part
        topic, subscribed at QoS 0 as the agent does, with the agent's window and re-request rule
        (bench._fleet_sim_fetch) and its downloading statuses at the agent's cadence (toco_core.progress_reports);
        then received -> downloading -> verified -> self_test -> active, or failed (transfer_stalled) as the agent
        reports a fetch that got no frame through all its re-requests."""
        self._status(cmd, "received")
        if self.client is None:
            return
        with suppress(aiomqtt.MqttError, TimeoutError):
            await self.client.subscribe([(self.t.manifest(cmd.bundle_id), DELIVERY[MessageKind.MANIFEST].qos),
                                         (self.t.part(cmd.bundle_id, self.id), 0)], timeout=60)
            await asyncio.wait_for(self.got_manifest.wait(), 120)
            assert self.manifest is not None  # set with got_manifest
            self._status(cmd, "downloading")
            loop = asyncio.get_running_loop()
            self.got_parts.clear()
            fetch = self.fetch = SimFetch(self.manifest, self._ask(cmd.bundle_id), loop.time())
            fetch.pump()
            reports = ProgressReports(loop.time())
            while not fetch.done and not fetch.stalled:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self.got_parts.wait(), 1.0)  # the agent's watch period
                fetch.tick(loop.time())
                share = fetch.received / fetch.want
                if reports.due(share, loop.time()):  # as agent.deployer reports its fetch
                    self._status(cmd, "downloading", progress=share)
            self.stats.part_rerequests += fetch.rerequested
            self.stats.part_bytes += fetch.received
            if fetch.stalled:
                self.stats.part_stalls += 1
                self._status(cmd, "failed", reason=FailureReason.TRANSFER_STALLED,
                             detail=f"no part frame arrived through {fetch.timer.attempts} re-requests")
                return
            for phase in ("verified", "self_test", "active"):
                self._status(cmd, phase)


def _range_key(head: bytes) -> tuple[str, int]:
    """(part, offset) from a part frame's JSON header line."""
    meta = json.loads(head)
    return str(meta["part"]), int(meta["offset"])


async def _run_process(port: int, ids: list[str], groups: dict[str, str], first: int, total: int, conn) -> None:
    """The event loop of one device process: its devices, driven by the parent's commands over ``conn``."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    gate = asyncio.Semaphore(CONNECTS_AT_ONCE)
    devices = [SimDevice(port, d, groups[d], stats, gate) for d in ids]
    links = [loop.create_task(d.connection()) for d in devices]
    traffic: list[asyncio.Task] = []
    while True:
        cmd, arg = await loop.run_in_executor(None, conn.recv)
        answer: object = None
        if cmd == "connect":  # arg: seconds to wait; answers how many are connected
            with suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(d.up.wait() for d in devices)), arg)
            answer = stats.connected
        elif cmd == "start":  # arg: (telemetry_s, drift_s)
            traffic = [loop.create_task(d.traffic((first + i) / total, *arg)) for i, d in enumerate(devices)]
        elif cmd == "stop":  # answers the stats; publishes under way go on and are counted when they end
            for task in traffic:
                task.cancel()
            answer = stats.as_dict()
        elif cmd == "stats":
            answer = stats.as_dict()
        elif cmd == "close":
            for task in [*traffic, *links]:
                task.cancel()
            await asyncio.gather(*links, return_exceptions=True)
        conn.send(answer)
        if cmd == "close":
            return


def device_process(port: int, ids: list[str], groups: dict[str, str], first: int, total: int, conn) -> None:
    """Child process: the devices ``ids`` (fleet-wide indices ``first``.. of ``total``, which set their
    phases) on one asyncio event loop, driven by (command, arg) over ``conn``: "connect" (answers how many
    connected within ``arg`` s), "start" (traffic with the periods ``arg``), "stop" (ends the traffic,
    answers the stats), "stats" and "close". Every command is
    answered, so the parent keeps the pace."""
    asyncio.run(_run_process(port, ids, groups, first, total, conn))


class Devices:
    """The simulated devices, DEVICES_PER_PROCESS per child process."""

    def __init__(self, port: int, ids: list[str], groups: dict[str, str]) -> None:
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for i in range(0, len(ids), DEVICES_PER_PROCESS):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=device_process, args=(port, ids[i:i + DEVICES_PER_PROCESS], groups, i, len(ids),
                                                            child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)

    def ask(self, cmd: str, arg=None) -> list:
        """Send ``cmd`` to every device process; their answers."""
        for c in self.conns:
            c.send((cmd, arg))
        return [c.recv() for c in self.conns]

    def stats(self, cmd: str = "stats", arg=None) -> dict:
        """The summed stats of every process (``cmd`` "stop" ends the traffic first)."""
        out: dict = {"sent": Counter(), "acked": Counter(), "failed": Counter(), "connected": 0, "disconnects": 0,
                     "part_bytes": 0, "part_rerequests": 0, "part_stalls": 0}
        for s in self.ask(cmd, arg):
            for k in ("sent", "acked", "failed"):
                out[k].update(s[k])
            for k in ("connected", "disconnects", "part_bytes", "part_rerequests", "part_stalls"):
                out[k] += s[k]
        return out

    def pids(self) -> list[int]:
        """The device processes' ids (for their CPU seconds)."""
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self) -> None:
        """Disconnect every device and end the processes."""
        with suppress(EOFError, OSError):  # a device process that died already
            self.ask("close")
        for p in self.procs:
            p.join(5)
