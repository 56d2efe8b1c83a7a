"""Fleet server load benchmark: simulated devices (protocol-speaking MQTT clients, not agents)
against a real mosquitto + the fleet server (its own process, SQLite), or ``--replicas N`` serve
processes on a throw-away PostgreSQL (``--db postgres`` for one such process), all on loopback.

1. N devices (default 1,000) send births, telemetry every 10 s and drift reports every 60 s (each
   device at its own phase of the period) for --duration s; measured: messages sent, stored when
   the traffic stopped, how long the database took to drain what was still on its way, and lost
   (never stored); mosquitto's dropped count; CPU and RSS per server, the simulator and the broker;
   p50/p99 latency of GET /api/devices (the overview) polled meanwhile. ``--kill-leader``: the
   replica leading the singleton duties is SIGKILLed halfway; measured: seconds until another one
   leads, and what its death lost. The broker keeps a killed replica's unacknowledged messages (and
   its share of later ones) for its session until it comes back: ``--restart-killed S`` restarts it
   S seconds after the kill, as its supervisor would (docs/ops.md).
2. A bundle deployment to 200 of them at once: each requests its part ranges, waits for them and
   reports received -> downloading -> verified -> active; measured: time to all-complete.
   The traffic table is printed before this phase starts; a deployment phase that fails (an HTTP
   error or timeout, a failed analysis) is a row saying what failed, and the bench exits with 1.

Every device has an MQTT connection of its own (client id, username and password in the broker's
password file, will, subscriptions), so the broker and the server see 1,000 sessions; the devices
share an asyncio event loop per 2,500 (bench/_fleet_sim.py). The deployed devices fetch the parts
bundle (all but its optional fp32 part) by ranges on their own part topics, as agents do.
Run: ``.venv/bin/python bench/fleet.py`` (about 3 min) or ``--quick`` (200 devices, 30 s);
``--replicas 2 --kill-leader`` for two replicas and the leader's death; ``--duration 3600
--sample-seconds 60`` for the server soak (RSS, descriptors, threads, DB size every minute).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import multiprocessing.process
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._fleet_broker import DropMonitor, server_broker_url, start_broker  # noqa: E402
from bench._fleet_deploy import deploy_phase  # noqa: E402
from bench._fleet_loss import TRAFFIC_KINDS, Drain, drain  # noqa: E402
from bench._fleet_servers import (  # noqa: E402
    Servers,
    kill_leader,
    restart_killed,
    start_replicas,
    start_single,
    wait_for,
)
from bench._fleet_sim import Devices  # noqa: E402
from bench._fleet_watch import PAGED, UNPAGED, Usage, poll_api, print_soak, processes, soak_sample  # noqa: E402
from tests.support.broker import Broker  # noqa: E402


def _ms(v: float) -> str:
    """A latency for the table; an unanswered request (inf) as what it is."""
    return "> 30,000 (unanswered)" if math.isinf(v) else f"{v:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--duration", type=float, default=130.0, help="seconds of steady traffic")
    ap.add_argument("--telemetry-s", type=float, default=10.0)
    ap.add_argument("--drift-s", type=float, default=60.0)
    ap.add_argument("--deploy-devices", type=int, default=200)
    ap.add_argument("--deploy-wait", type=float, default=180.0, metavar="S",
                    help="follow the deployment for at most S seconds (its table says how far it got)")
    ap.add_argument("--replicas", type=int, default=1, help="N > 1: N serve --replicas processes on PostgreSQL")
    ap.add_argument("--db", choices=("sqlite", "postgres"), default=None,
                    help="the servers' database: sqlite (one process, the default with one replica) or postgres "
                         "(a throw-away cluster, serve --replicas; the default and the only choice with N > 1)")
    ap.add_argument("--kill-leader", action="store_true", help="with --replicas: SIGKILL the leader halfway")
    ap.add_argument("--restart-killed", type=float, default=None, metavar="S",
                    help="with --kill-leader: start the killed replica again S seconds after the kill")
    ap.add_argument("--kill-leader-in-deploy", action="store_true",
                    help="with --replicas: SIGKILL the leader once half the deployment's devices succeeded")
    ap.add_argument("--quick", action="store_true", help="200 devices, 30 s, drift every 15 s")
    ap.add_argument("--sample-seconds", type=float, default=0.0,
                    help="soak: sample server RSS, descriptors, threads and DB size this often (0: off)")
    args = ap.parse_args()
    db = args.db or ("postgres" if args.replicas > 1 else "sqlite")
    if db == "sqlite" and args.replicas > 1:
        ap.error("replicas share one PostgreSQL database: leave --db out or pass --db postgres")
    if args.replicas < 2 and (args.kill_leader or args.kill_leader_in_deploy):
        ap.error("killing the leader needs another replica to take over: pass --replicas 2 or more")
    if args.quick:
        args.devices, args.duration, args.drift_s, args.deploy_devices = 200, 30.0, 15.0, 100
    with ExitStack() as stack:
        ids = [f"dev{i:04d}" for i in range(args.devices)]
        broker = start_broker(ids, args.replicas)
        stack.callback(broker.cleanup)
        tmp = tempfile.mkdtemp(prefix="toco-bench-")
        # every (devices / deploy-devices)-th device is in group "deploy": spread over the simulator's
        # processes, so the part bytes are not all parsed by one of them
        stride = max(1, args.devices // max(1, args.deploy_devices))
        deployed = set(range(0, args.devices, stride)[:args.deploy_devices])
        groups = {d: "deploy" if i in deployed else "bench" for i, d in enumerate(ids)}
        urls = [server_broker_url(broker, k) for k in range(args.replicas)]
        servers = (start_replicas(urls, tmp, groups, stack) if db == "postgres"
                   else start_single(tmp, urls[0], groups))
        stack.callback(servers.stop)
        wait_for(lambda: servers.health(0).get("broker") == "connected", 60, "the server did not start")
        ok = run(args, broker, servers, ids, groups, stack)
    if not ok:
        sys.exit(1)  # after the cleanup: the table said what failed


def print_table(title: str, rows: list[tuple[str, object]]) -> None:
    """A two-column markdown table of (metric, value) under ``title``."""
    print(f"\n{title}\n| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
    sys.stdout.flush()


@dataclass
class Traffic:
    """What the traffic phase measured."""

    elapsed: float
    sent: dict[str, int]
    usage: Usage
    lat: dict[str, list[float]]  # "paged" (the dashboard's request) and "unpaged" (every device) in ms
    soak: list[dict]
    load_max: float
    killed: dict | None = None
    restarted: float | None = None


def traffic_phase(args, broker: Broker, servers: Servers, devices: Devices, url: str) -> Traffic:
    """Start the devices' traffic and the API poller, sample CPU/RSS (and the soak), kill and restart
    the leader if asked; stops the traffic after --duration s and returns what it measured."""
    ctx = mp.get_context("spawn")
    stop, lat_q = ctx.Event(), ctx.Queue()
    poller = ctx.Process(target=poll_api, args=(url, servers.token, stop, lat_q), daemon=True)
    sim, mosq = processes(devices.pids()), processes([broker.proc.pid] if broker.proc else [])

    def groups() -> dict[str, list[psutil.Process]]:
        return {**{f"r{k + 1}": p for k, p in enumerate(servers.by_server())}, "simulator": sim, "broker": mosq}

    usage = Usage()
    usage.sample(groups())
    t_start = time.monotonic()
    devices.ask("start", (args.telemetry_s, args.drift_s))
    poller.start()
    # the first soak sample after a minute: births, first telemetry and the import-time heap are warm-up
    soak: list[dict] = []
    next_sample = t_start + 60 if args.sample_seconds else float("inf")
    killed: dict | None = None
    restarted: float | None = None
    load_max = 0.0
    while time.monotonic() - t_start < args.duration:
        now = time.monotonic()
        if now >= next_sample:
            soak.append(soak_sample(servers, now - t_start))
            print(f"soak minute {soak[-1]['minute']:.0f}: RSS {soak[-1]['rss_mb']:.1f} MB, "
                  f"DB {soak[-1]['db_mb']:.1f} MB", flush=True)
            next_sample += args.sample_seconds
        if args.kill_leader and killed is None and now - t_start > args.duration / 2:
            killed = kill_leader(servers)
        if (killed and restarted is None and args.restart_killed is not None
                and now - killed["at"] >= args.restart_killed):
            restarted = restart_killed(servers, killed)
        usage.sample(groups())
        load_max = max(load_max, os.getloadavg()[0])
        time.sleep(0.5)
    usage.sample(groups())
    sent = devices.stats("stop")["sent"]
    elapsed = time.monotonic() - t_start
    stop.set()
    lat: dict[str, list[float]] = lat_q.get(timeout=60)
    poller.join(5)
    return Traffic(elapsed, dict(sent), usage, lat, soak, load_max, killed, restarted)


def _by_kind(counts: dict[str, int]) -> str:
    return f"{sum(counts.get(k, 0) for k in TRAFFIC_KINDS):,} (" + ", ".join(
        f"{k} {counts.get(k, 0):,}" for k in TRAFFIC_KINDS) + ")"


def _latency_rows(what: str, lat: list[float]) -> list[tuple[str, object]]:
    """p50 / p99 ms, samples and unanswered requests of one polled request."""
    if not lat:
        return [(f"{what} p50 / p99 ms", "-")]
    p50, p99 = _ms(statistics.median(lat)), _ms(float(np.percentile(lat, 99, method="higher")))
    return [(f"{what} p50 / p99 ms", f"{p50} / {p99}"),
            (f"{what} samples / unanswered within 30 s", f"{len(lat)} / {sum(math.isinf(v) for v in lat)}")]


def traffic_rows(args, n_procs: int, connect_s: float, t: Traffic, d: Drain, sim: dict, dropped: str,
                 invalid: int, n_servers: int) -> list[tuple[str, object]]:
    """The traffic table's rows: connections, messages sent / stored at the end / drained / lost, broker
    drops, CPU and RSS per replica, simulator and broker, load, the overview's latency, the leader's death."""
    lost = d.lost(t.sent)
    drained = (f"all stored {d.seconds:.1f} s after the traffic" if d.complete else
               f"last growth {d.seconds:.1f} s after the traffic; " +
               ("still growing at the 120 s timeout" if d.timed_out else "then unchanged for 10 s"))
    rows: list[tuple[str, object]] = [
        ("devices", args.devices),
        ("MQTT connections (one per device: own client id, user, password, will)", f"{args.devices:,}"),
        ("connect time s", f"{connect_s:.1f}"), ("simulator processes (asyncio, aiomqtt)", n_procs),
        ("server processes", n_servers), ("duration s", f"{t.elapsed:.0f}"),
        ("messages sent", _by_kind(t.sent)),
        ("publishes the broker did not acknowledge (QoS 1) or take (QoS 0)", sum(sim["failed"].values())),
        ("stored at end of traffic", _by_kind(d.at_end)),
        ("drained", drained),
        ("messages lost (sent, never stored)", _by_kind(lost)),
        ("broker dropped (queue/in-flight limits, $SYS)", dropped),
        ("messages dropped by the servers (invalid)", invalid),
        ("simulator device disconnects", sim["disconnects"])]
    for k in range(n_servers):
        name = f"r{k + 1}"
        rows.append((f"server {name} CPU % of one core / peak RSS MB (incl. workers)",
                     f"{t.usage.cpu_pct(name, t.elapsed):.0f} / {t.usage.peak_rss.get(name, 0) / 1e6:.0f}"))
    rows += [("simulator CPU % of one core (all its processes) / peak RSS MB",
              f"{t.usage.cpu_pct('simulator', t.elapsed):.0f} / {t.usage.peak_rss.get('simulator', 0) / 1e6:.0f}"),
             ("mosquitto CPU % of one core / peak RSS MB",
              f"{t.usage.cpu_pct('broker', t.elapsed):.0f} / {t.usage.peak_rss.get('broker', 0) / 1e6:.0f}"),
             ("box load average (1 min): highest during traffic", f"{t.load_max:.1f}"),
             *_latency_rows(f"GET {PAGED} (the dashboard's overview page)", t.lat["paged"]),
             *_latency_rows(f"GET {UNPAGED} (unpaged array of every device)", t.lat["unpaged"])]
    if t.killed:
        rows += [("leader killed (SIGKILL) at", f"{args.duration / 2:.0f} s"),
                 ("another replica led after s", f"{t.killed['takeover_s']:.1f}"),
                 ("killed replica restarted", "no" if t.restarted is None else
                  f"{args.restart_killed:.0f} s after the kill, connected {t.restarted:.1f} s later")]
    return rows


def run(args, broker: Broker, servers: Servers, ids: list[str], groups: dict[str, str], stack: ExitStack) -> bool:
    """Traffic, optionally the leader's death, the drain, then the deployment. Prints the traffic table
    before the deployment starts and the deployment's after it; returns False when the deployment phase
    failed (its row says what failed)."""
    url = servers.urls[-1]  # the API the bench uses: with replicas, the one that is never killed
    api = httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {servers.token}"})
    t_conn = time.monotonic()
    devices = Devices(broker.port, ids, groups)
    stack.callback(devices.close)
    connected = sum(devices.ask("connect", 120.0))
    if connected < len(ids):
        raise SystemExit(f"only {connected} of {len(ids)} devices connected in 120 s")
    connect_s = time.monotonic() - t_conn
    print(f"{len(ids)} devices connected, one MQTT connection each ({len(devices.procs)} processes), "
          f"in {connect_s:.1f} s", flush=True)
    monitor = DropMonitor(broker)
    stack.callback(monitor.close)
    t = traffic_phase(args, broker, servers, devices, url)
    print(f"traffic stopped after {t.elapsed:.0f} s; waiting for the database to drain", flush=True)
    d = drain(servers.db_url, t.sent)
    sim = devices.stats()
    time.sleep(2.5)  # one more sys_interval: the count as of the end of the drain
    dropped = monitor.dropped()
    invalid = sum(servers.health(k).get("messages", {}).get("dropped", 0) for k in range(len(servers.urls)))
    if len(t.soak) > 1:  # before the deployment, so its failure cannot lose an hour's table
        print_soak(t.soak)
    # printed before the deployment phase, so a deployment that fails cannot lose it
    print_table(f"traffic phase ({t.elapsed:.0f} s)",
                traffic_rows(args, len(devices.procs), connect_s, t, d, sim, dropped, invalid, len(servers.urls)))
    print(json.dumps({"sent": t.sent, "stored_at_end": d.at_end, "stored": d.final, "lost": d.lost(t.sent),
                      "failed_publishes": dict(sim["failed"])}), flush=True)
    killed_in_deploy: dict = {}

    def watch(view: dict) -> None:
        # the leader's death halfway through the deployment: the API moves to a replica that lives on; with
        # --restart-killed the dead one comes back that many seconds later
        if (killed_in_deploy and args.restart_killed is not None and "restarted" not in killed_in_deploy
                and time.monotonic() - killed_in_deploy["at"] >= args.restart_killed):
            killed_in_deploy["restarted"] = restart_killed(servers, killed_in_deploy)
        if (args.kill_leader_in_deploy and not killed_in_deploy
                and view["counts"].get("succeeded", 0) >= sum(view["counts"].values()) / 2):
            killed_in_deploy.update(kill_leader(servers))
            if killed_in_deploy["index"] == servers.urls.index(str(api.base_url).rstrip("/")):
                api.base_url = httpx.URL(next(u for k, u in enumerate(servers.urls) if k != killed_in_deploy["index"]))
            killed_in_deploy["succeeded"] = view["counts"].get("succeeded", 0)

    ok, rows = deploy_phase(args, api, devices, watch)
    if killed_in_deploy:
        rows.append(("leader killed (SIGKILL) during the deployment", f"{killed_in_deploy['killed']} at "
                     f"{killed_in_deploy['succeeded']:,} succeeded; another replica led after "
                     f"{killed_in_deploy['takeover_s']:.1f} s; restarted: " +
                     ("no" if "restarted" not in killed_in_deploy else
                      f"{args.restart_killed:.0f} s after the kill, connected "
                      f"{killed_in_deploy['restarted']:.1f} s later")))
    publishing = [servers.health(k).get("publishing", {}) for k in range(len(servers.urls))]
    for key, what in (("refused", "publishes the server's MQTT client refused"),
                      ("dropped_disconnected", "QoS 0 publishes dropped while disconnected"),
                      ("chunks_served", "chunks served"), ("part_ranges_served", "part ranges served"),
                      ("part_ranges_coalesced", "part ranges asked for again and not served twice (coalesced)"),
                      ("part_requests", "part requests answered"),
                      ("part_requests_late", "part requests served > 10 s after the device sent them"),
                      ("part_request_age_max_ms", "oldest part request when served, ms"),
                      ("part_serve_ms", "ms spent serving part requests")):
        rows.append((f"{what} (per live server, /api/health)", " / ".join(str(p.get(key, "-")) for p in publishing)))
    print_table("deployment phase", rows)
    return ok


if __name__ == "__main__":
    main()
