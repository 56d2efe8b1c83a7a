"""Overview API latency at 10,000 devices: GET /api/devices paged and filtered, on SQLite and PostgreSQL.

The devices are written straight into the server's database (tests/support/fleet_seed.py); the server
runs with its HTTP API on loopback, in this process (the client shares its interpreter, so the figures
include a little client time). Each scenario is N sequential requests; printed: p50, p99 and max in ms.

    first page      limit=50 with the facets (what the dashboard asks first)
    filtered        limit=50 with facets, cycling state / alert kind / group / version / id search filters
    deep cursor     limit=50 with facets, a cursor 9,800 devices in
    next pages      limit=50 without facets, walking the cursors (page navigation)
    every device    the unpaged array (no query string; older callers), fewer requests
    group versions  GET /api/groups/versions, which the overview also loads
    +ingest         first page and filtered again, while a publisher (bench/_overview_ingest.py) sends
                    --ingest messages a second (telemetry, every 7th a drift window) of the seeded devices,
                    which the server's ingest thread writes in the API's process (0: skipped)

``--against REV`` measures git revision REV's fleet_server and toco_core first (extracted to a temp dir,
with this tree's tests/ and benches), in a child each, so a before/after comes from one run.

Run: ``.venv/bin/python bench/overview.py`` (a few minutes; ``--no-postgres`` for SQLite only,
``--devices``/``--requests`` to change the sizes, ``--ingest 600``: a replica's share of 10,000 devices'
traffic with two replicas, ``--against main``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TREES = ["fleet_server", "toco_core"]  # REV's code (--against); the seeding helpers and this bench are this tree's
WARM_UP_S = 5  # the publisher's first seconds: the server's ingest reaches its steady batches

FILTERS = [{"state": "alert"}, {"alert": "data"}, {"group": "line-03"}, {"version": "m-seed-v1"},
           {"version": "none"}, {"q": "dev-0424"}, {"group": "line-07", "alert": "any"}]


def _timed(api: httpx.Client, params_of, n: int) -> list[float]:
    out = []
    for i in range(n):
        params = params_of(i)
        t = time.perf_counter()
        r = api.get(params.pop("_path", "/api/devices"), params=params)
        out.append(1000 * (time.perf_counter() - t))
        r.raise_for_status()
    return out


def _next_pages(api: httpx.Client, n: int) -> list[float]:
    out, cursor = [], None
    for _ in range(n):
        t = time.perf_counter()
        r = api.get("/api/devices", params={"limit": 50, "facets": "false", **({"cursor": cursor} if cursor else {})})
        out.append(1000 * (time.perf_counter() - t))
        cursor = r.raise_for_status().json()["next_cursor"]
    return out


def measure(backend: str, db_url: str | None, devices: int, requests: int, broker, ingest: float) -> list[tuple]:
    """Seed ``devices`` devices into a new server's database, then time every scenario (those with ingest
    if ``ingest`` messages a second > 0); returns table rows (backend, scenario, requests, p50, p99, max ms)."""
    from bench._overview_ingest import IngestLoad
    from fleet_server.api import create_app
    from fleet_server.auth import create_token
    from fleet_server.config import FleetSettings
    from fleet_server.device_listing import page_cursor
    from fleet_server.server import FleetServer, HttpThread
    from tests.support.fleet_seed import device_id, seed_fleet

    fleet = "bench-overview"
    # the server's housekeeping thread can outlive server.stop() by a retention pass over 10,000 devices and
    # reopen the SQLite file while the directory is removed (a shutdown matter of the server, seen at load 13):
    # what it leaves is removed with the bench's temp dir tree, not reported as the bench's failure
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        settings = FleetSettings(data_dir=Path(tmp), broker=broker.url, http_port=0, fleet=fleet)
        if db_url:
            settings = settings.model_copy(update={"db_url": db_url})
        server = FleetServer(settings).start()
        http = HttpThread(create_app(server), "127.0.0.1", 0).start()
        try:
            t = time.perf_counter()
            seed_fleet(server.db, devices)
            print(f"{backend}: seeded {devices:,} devices in {time.perf_counter() - t:.1f} s", file=sys.stderr,
                  flush=True)
            token, _ = create_token(server.db, role="viewer", name="bench")
            deep = page_cursor(device_id(max(0, devices - 200)))
            few = max(5, requests // 10)
            with httpx.Client(base_url=http.url, timeout=60, headers={"Authorization": f"Bearer {token}"}) as api:
                _timed(api, lambda i: {"limit": 50}, 5)  # warm the connection pools and caches
                scenarios = [
                    ("first page", _timed(api, lambda i: {"limit": 50}, requests)),
                    ("filtered", _timed(api, lambda i: {"limit": 50, **FILTERS[i % len(FILTERS)]}, requests)),
                    ("deep cursor", _timed(api, lambda i: {"limit": 50, "cursor": deep}, requests)),
                    ("next pages", _next_pages(api, min(requests, devices // 50))),
                    ("every device", _timed(api, lambda i: {}, few)),
                    ("group versions", _timed(api, lambda i: {"_path": "/api/groups/versions"}, few)),
                ]
                if ingest > 0:
                    with IngestLoad(broker.port, fleet, devices, ingest) as load:
                        time.sleep(WARM_UP_S)
                        scenarios += [
                            ("first page +ingest", _timed(api, lambda i: {"limit": 50}, requests)),
                            ("filtered +ingest", _timed(api, lambda i: {"limit": 50, **FILTERS[i % len(FILTERS)]},
                                                        requests)),
                        ]
                    stored = server.ingest.stats.get("stored", 0)
                    print(f"{backend}: ingest sent {load.sent:,} messages ({load.sent / load.seconds:.0f}/s),"
                          f" the server stored {stored:,} by the end of the timing", file=sys.stderr, flush=True)
        finally:
            http.stop()
            server.stop()
    return [(backend, name, len(ms), statistics.median(ms), float(np.percentile(ms, 99)), max(ms))
            for name, ms in scenarios]


def child(args) -> None:
    """Measure SQLite then (unless --no-postgres) PostgreSQL with the code on sys.path; one JSON row a line."""
    from tests.support.broker import Broker

    with ExitStack() as stack:
        broker = Broker()
        broker.start()
        stack.callback(broker.cleanup)
        rows = measure("sqlite", None, args.devices, args.requests, broker, args.ingest)
        if not args.no_postgres:
            from tests.fleet.postgres import postgres_cluster

            cluster = stack.enter_context(postgres_cluster())
            rows += measure("postgresql", cluster.create_database("overview"), args.devices, args.requests, broker,
                            args.ingest)
    for row in rows:
        print(json.dumps(row), flush=True)


def run_child(code: Path, label: str, args) -> list[tuple]:
    """This bench in a child interpreter importing fleet_server and toco_core from ``code``; its rows, labelled."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--devices", str(args.devices), "--requests",
            str(args.requests), "--ingest", str(args.ingest), *["--no-postgres"] * args.no_postgres]
    print(f"=== {label}: uptime {os.getloadavg()[0]:.2f} (1-min load) at the start", flush=True)
    out = subprocess.run(argv, cwd=code, env={**os.environ, "PYTHONPATH": f"{code}:{REPO}"}, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return [(label, *json.loads(line)) for line in out.splitlines() if line.startswith("[")]


def main() -> None:
    """Parse the options; measure REV's code (--against) then this tree's, each in a child; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--ingest", type=float, default=0.0, help="messages a second during the +ingest scenarios")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--against", metavar="REV", help="measure git revision REV's code first (before/after)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="toco-overview-") as tmp:
        if args.against:
            rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout.strip()
            archive = subprocess.run(["git", "archive", rev, *TREES], cwd=REPO, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            rows += run_child(Path(tmp), rev, args)
        rows += run_child(REPO, "this tree", args)
    print(f"\nGET /api/devices at {args.devices:,} devices (ms; +ingest: {args.ingest:.0f} messages/s)")
    print(f"{'code':<10} {'backend':<11} {'scenario':<19} {'n':>4} {'p50':>8} {'p99':>8} {'max':>8}")
    for code, backend, name, n, p50, p99, worst in rows:
        print(f"{code:<10} {backend:<11} {name:<19} {n:>4} {p50:>8.1f} {p99:>8.1f} {worst:>8.1f}")


if __name__ == "__main__":
    main()
