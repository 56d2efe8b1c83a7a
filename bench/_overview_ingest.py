"""The ingest load of bench/overview.py: a child process publishing telemetry and drift windows of the seeded
devices to the server's broker at a fixed rate, so the overview is timed while the server's ingest thread (in
the same process as the API) writes device rows, as a replica's does under its devices' traffic."""

from __future__ import annotations

import multiprocessing as mp
import time

# one drift window per six telemetry points: the simulated devices' 60 s and 10 s periods (bench/_fleet_sim.py)
DRIFT_EVERY = 7


def publish(port: int, fleet: str, devices: int, rate: float, ready, stop, out) -> None:
    """Child process: publish to ``fleet``'s device topics on the broker at 127.0.0.1:``port``, ``rate``
    messages a second round-robin over seeded devices 0..devices-1 (telemetry, every DRIFT_EVERY-th a drift
    window, each at the QoS devices send it with: toco_core.topics.DELIVERY) from when it sets ``ready`` until
    ``stop`` is set; puts (messages sent, seconds) on ``out``."""
    import paho.mqtt.client as mqtt

    from tests.support.fleet_seed import device_id
    from toco_core.messages import DriftMessage, MessageKind, TelemetryMessage, encode
    from toco_core.topics import DELIVERY, Topics

    topics = Topics(fleet)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="bench-overview-ingest")
    client.connect("127.0.0.1", port)
    client.loop_start()
    ready.set()
    sent, t0 = 0, time.monotonic()
    while not stop.is_set():
        dev, now = device_id(sent % devices), time.time()
        if sent % DRIFT_EVERY == 0:
            # a new window index per sweep over the devices, so none is a duplicate the server skips
            msg = DriftMessage(device_id=dev, window_index=1000 + sent // devices, opened_at=now - 60, closed_at=now,
                               n_samples=256, n_shadowed=26, measured_agreement=0.99, predicted_agreement=0.99,
                               mean_confidence=0.9, mean_entropy=0.3, input_mean=0.1, input_std=0.3)
            client.publish(topics.device(MessageKind.DRIFT, dev), encode(msg), qos=DELIVERY[MessageKind.DRIFT].qos)
        else:
            client.publish(topics.device(MessageKind.TELEMETRY, dev), encode(TelemetryMessage(
                device_id=dev, mem_available=300 << 20, disk_free=1 << 30, cpu_load=0.3, inferences=100,
                latency_ms_p50=2.0)), qos=DELIVERY[MessageKind.TELEMETRY].qos)
        sent += 1
        ahead = t0 + sent / rate - time.monotonic()  # hold the rate; a late publisher catches up
        if ahead > 0:
            time.sleep(ahead)
    client.loop_stop()
    client.disconnect()
    out.put((sent, time.monotonic() - t0))


class IngestLoad:
    """Start the publisher and wait until it publishes (``with IngestLoad(...) as load:``); after the block,
    ``load.sent`` messages in ``load.seconds``. Raises TimeoutError if it is not publishing within 60 s."""

    def __init__(self, port: int, fleet: str, devices: int, rate: float) -> None:
        ctx = mp.get_context("spawn")
        self.ready, self.stop, self.out = ctx.Event(), ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=publish, args=(port, fleet, devices, rate, self.ready, self.stop, self.out),
                                daemon=True)
        self.sent, self.seconds = 0, 0.0

    def __enter__(self) -> IngestLoad:
        self.proc.start()
        if not self.ready.wait(60):
            self.proc.kill()
            raise TimeoutError("the ingest publisher did not connect to the broker within 60 s")
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.sent, self.seconds = self.out.get(timeout=30)
        self.proc.join(10)
