"""Part serving benchmark: N devices ask for a deployment's parts at once; frames served at QoS 1 vs QoS 0.

Why: bench/fleet.py's 2,000-device deployment stalled while the server published part frames at
QoS 1. Each QoS 1 publish holds one of paho's 65,535 packet ids until the broker's PUBACK; thousands
of devices asking at once take them all, and paho refuses the rest (the server's FleetMqtt now raises
PublishRefused for a refused QoS 1 publish; before, they vanished). Devices subscribe to their part
topic at QoS 0 and ask again for what does not arrive, so the frames now go out at QoS 0.

Measured, per QoS, in one run on one real mosquitto (the shipped config's queue limits), with the
server's own FleetMqtt and BundlePublisher: part frames asked for, handed to paho, refused by paho,
arrived at the devices, and seconds from the first request to the last frame (or to the end of
the wait). The QoS 1 leg publishes the part frames at QoS 1 as the server did before the fix and,
as it did, goes on past a refused frame. Every device asks once for every range of the bundle but
its optional fp32 part (as bench/fleet.py's devices do), without asking again.

The bundle: the demo LeNet-5 analysed with bench/fleet.py's small analysis settings and packed as
the fleet server packs it (toco_core.parts_bundle, no fleet band layout). Devices: asyncio MQTT
clients (aiomqtt), one connection each, DEVICES_PER_PROCESS per process.

    .venv/bin/python bench/part_serving.py [--devices 2000] [--wait 60]

Heavy at 2,000 devices: run it under ``flock /tmp/heavy-bench.lock``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiomqtt  # noqa: E402

from bench._fleet_broker import BROKER_LIMITS  # noqa: E402
from fleet_server.bundle_publisher import BundlePublisher  # noqa: E402
from fleet_server.mqtt_client import FleetMqtt, PublishRefused  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from toco_core.bundle import BundleManifest, generate_private_key, make_manifest, pack_bundle  # noqa: E402
from toco_core.messages import MAX_RANGE_LENGTH, MAX_RANGES_PER_REQUEST, PartRange, PartRequest, encode  # noqa: E402
from toco_core.topics import Topics  # noqa: E402

FLEET = "partbench"
T = Topics(FLEET)
DEVICES_PER_PROCESS = 1000
CONNECTS_AT_ONCE = 64  # concurrent handshakes per process (mosquitto's listen backlog)


def demo_bundle() -> tuple[BundleManifest, bytes]:
    """The demo LeNet-5's parts bundle (fp32 base included, as the server packs it), signed."""
    import numpy as np

    from bench._fleet_servers import FAST
    from toco_core.analysis.pipeline import analyze
    from toco_core.analysis.settings import AnalysisSettings
    from toco_core.demo.data import mnist_splits
    from toco_core.demo.train import demo_model
    from toco_core.model_bundle import BundleInfo
    from toco_core.onnx_model import load_model
    from toco_core.parts_bundle import pack_parts

    path = Path(demo_model("lenet5"))
    model = load_model(path)
    d = mnist_splits()
    result = analyze(model, np.asarray(d.x_pool[:120]), np.asarray(d.y_pool[:120]), AnalysisSettings(**FAST),
                     model_name="lenet5")
    info = BundleInfo(model_name="lenet5", model_sha256="0" * 64, analysis_id="a-bench", budget=0.05)
    data = pack_bundle(pack_parts(model, result, info, include_base=True))
    return make_manifest(data, private_key=generate_private_key()), data


def ranges_of(manifest: BundleManifest) -> list[PartRange]:
    """Every range of every part but the optional fp32 base, at most MAX_RANGE_LENGTH each."""
    return [PartRange(part=f.name, offset=o, length=min(MAX_RANGE_LENGTH, f.size - o))
            for f in manifest.files if f.name != "base" for o in range(0, f.size, MAX_RANGE_LENGTH)]


async def _device(port: int, device_id: str, manifest: BundleManifest, gate: asyncio.Semaphore,
                  up: asyncio.Event, go: asyncio.Event, got: Counter, last: list[float]) -> None:
    """One device: connect, subscribe to its part topic at QoS 0 (as agents do), ask for every range once
    ``go`` is set, and count the frames that arrive until cancelled."""
    client = aiomqtt.Client("127.0.0.1", port, identifier=device_id, keepalive=60, timeout=60)
    async with AsyncExitStack() as stack:
        async with gate:
            await stack.enter_async_context(client)
            await client.subscribe(T.part(manifest.bundle_id, device_id), qos=0, timeout=60)
        up.set()
        await go.wait()
        ranges = ranges_of(manifest)

        async def ask() -> None:
            for i in range(0, len(ranges), MAX_RANGES_PER_REQUEST):
                req = PartRequest(device_id=device_id, bundle_id=manifest.bundle_id,
                                  ranges=ranges[i:i + MAX_RANGES_PER_REQUEST])
                await client.publish(T.get(manifest.bundle_id, device_id), encode(req), qos=1, timeout=120)

        asker = asyncio.get_running_loop().create_task(ask())
        async for _ in client.messages:
            got["frames"] += 1
            last[0] = time.time()
        await asker


async def _devices(port: int, ids: list[str], manifest_json: bytes, conn) -> None:
    """One device process: connect ``ids``, answer "up", wait for "go", then answer every "count" with (frames
    arrived, time of the last one) until "close"."""
    manifest = BundleManifest.model_validate_json(manifest_json)
    loop = asyncio.get_running_loop()
    gate, go = asyncio.Semaphore(CONNECTS_AT_ONCE), asyncio.Event()
    ups = [asyncio.Event() for _ in ids]
    got: Counter = Counter()
    last = [0.0]
    tasks = [loop.create_task(_device(port, d, manifest, gate, up, go, got, last)) for d, up in zip(ids, ups,
                                                                                                    strict=True)]
    await asyncio.wait_for(asyncio.gather(*(u.wait() for u in ups)), 300)
    conn.send("up")
    await loop.run_in_executor(None, conn.recv)
    go.set()
    while await loop.run_in_executor(None, conn.recv) == "count":
        conn.send((got["frames"], last[0]))
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def device_process(port: int, ids: list[str], manifest_json: bytes, conn) -> None:
    """Child process entry: the devices ``ids`` on one event loop (see _devices)."""
    asyncio.run(_devices(port, ids, manifest_json, conn))


def run_leg(qos: int, n: int, manifest: BundleManifest, data: bytes, wait_s: float) -> dict:
    """One measurement: a fresh broker, the server's client and publisher, ``n`` devices asking at once."""
    broker = Broker(["allow_anonymous true", *BROKER_LIMITS])
    broker.start()
    stats: Counter = Counter()
    try:
        publisher: BundlePublisher

        def on_get(topic: str, payload: bytes) -> None:
            publisher.handle_get(topic, payload)

        server = FleetMqtt(broker.url, T, on_device=lambda kind, dev, payload, ack, again: ack(), on_get=on_get,
                           client_id="toco-fleet-partbench")

        def send(topic: str, payload: bytes, q: int, retain: bool) -> bool:
            is_part = "/part/" in topic
            try:
                ok = server.send(topic, payload, qos if is_part else q, retain)
            except PublishRefused:
                stats["refused"] += 1
                return False  # as the server did before the fix: the frame is gone, the next one is tried
            if is_part and ok:
                stats["handed"] += 1
            return ok

        publisher = BundlePublisher(T, send)
        server.start()
        publisher.announce(manifest, data)
        ids = [f"d{i:05d}" for i in range(n)]
        ctx = mp.get_context("spawn")
        conns, procs = [], []
        for i in range(0, n, DEVICES_PER_PROCESS):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=device_process, args=(broker.port, ids[i:i + DEVICES_PER_PROCESS],
                                                         manifest.model_dump_json().encode(), child), daemon=True)
            p.start()
            conns.append(parent)
            procs.append(p)
        for c in conns:
            if not c.poll(300):
                raise SystemExit("the devices did not connect within 300 s")
            c.recv()
        t0 = time.time()
        for c in conns:
            c.send("go")
        wanted = n * len(ranges_of(manifest))

        def arrivals() -> tuple[int, float]:
            for c in conns:
                c.send("count")
            answers = [c.recv() for c in conns]
            return sum(a for a, _ in answers), max(t for _, t in answers)

        # until every frame arrived, or for 10 s nothing more was handed to paho, refused or arrived, or wait_s
        seen, still_since = None, time.monotonic()
        arrived, last = 0, 0.0
        while arrived < wanted and time.monotonic() - still_since < 10 and time.time() - t0 < wait_s:
            time.sleep(1)
            arrived, last = arrivals()
            now = (arrived, stats["handed"], stats["refused"])
            if now != seen:
                seen, still_since = now, time.monotonic()
        for c in conns:
            c.send("close")
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        server.stop()
        return {"qos": qos, "devices": n, "wanted": wanted, "handed": int(stats["handed"]),
                "refused": int(stats["refused"]), "arrived": arrived,
                "seconds": (last - t0) if last else float("nan")}
    finally:
        broker.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--wait", type=float, default=90.0, help="give up on a leg after this many seconds")
    args = ap.parse_args()
    t = time.monotonic()
    manifest, data = demo_bundle()
    frames = len(ranges_of(manifest))
    size = sum(r.length for r in ranges_of(manifest))
    print(f"bundle: demo LeNet-5 parts bundle, {len(data):,} bytes; a device asks for {frames} ranges "
          f"({size:,} bytes, all parts but the fp32 base); packed in {time.monotonic() - t:.0f} s", flush=True)
    # the QoS 1 leg is refused by the hundred thousand: the table counts them, one log line each would bury it
    logging.getLogger("toco.fleet.mqtt").setLevel(logging.ERROR)
    rows = [run_leg(q, args.devices, manifest, data, args.wait) for q in (1, 0)]
    print(f"\npart serving, {args.devices:,} devices asking at once (box load {os.getloadavg()[0]:.1f})\n"
          "| part frames at | frames asked for | handed to paho | refused by paho | arrived at the devices "
          "| s from the requests to the last frame |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| QoS {r['qos']} | {r['wanted']:,} | {r['handed']:,} | {r['refused']:,} | {r['arrived']:,} "
              f"| {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()
