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

Run: ``.venv/bin/python bench/overview.py`` (about a minute; ``--no-postgres`` for SQLite only,
``--devices``/``--requests`` to change the sizes).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fleet_server.api import create_app  # noqa: E402
from fleet_server.auth import create_token  # noqa: E402
from fleet_server.config import FleetSettings  # noqa: E402
from fleet_server.device_listing import page_cursor  # noqa: E402
from fleet_server.server import FleetServer, HttpThread  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.fleet_seed import device_id, seed_fleet  # noqa: E402

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


def measure(backend: str, db_url: str | None, devices: int, requests: int, broker_url: str) -> list[tuple]:
    """Seed ``devices`` devices into a new server's database, then time every scenario; returns table rows
    (backend, scenario, requests, p50 ms, p99 ms, max ms)."""
    with tempfile.TemporaryDirectory() as tmp:
        settings = FleetSettings(data_dir=Path(tmp), broker=broker_url, http_port=0, fleet="bench-overview")
        if db_url:
            settings = settings.model_copy(update={"db_url": db_url})
        server = FleetServer(settings).start()
        http = HttpThread(create_app(server), "127.0.0.1", 0).start()
        try:
            t = time.perf_counter()
            seed_fleet(server.db, devices)
            print(f"{backend}: seeded {devices:,} devices in {time.perf_counter() - t:.1f} s", flush=True)
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
        finally:
            http.stop()
            server.stop()
    return [(backend, name, len(ms), statistics.median(ms), float(np.percentile(ms, 99)), max(ms))
            for name, ms in scenarios]


def main() -> None:
    """Parse the options, run SQLite then (unless --no-postgres) PostgreSQL, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = ap.parse_args()
    rows = []
    with ExitStack() as stack:
        broker = Broker()
        broker.start()
        stack.callback(broker.cleanup)
        rows += measure("sqlite", None, args.devices, args.requests, broker.url)
        if not args.no_postgres:
            from tests.fleet.postgres import postgres_cluster

            cluster = stack.enter_context(postgres_cluster())
            rows += measure("postgresql", cluster.create_database("overview"), args.devices, args.requests, broker.url)
    print(f"\nGET /api/devices at {args.devices:,} devices (ms)")
    print(f"{'backend':<11} {'scenario':<15} {'n':>4} {'p50':>8} {'p99':>8} {'max':>8}")
    for backend, name, n, p50, p99, worst in rows:
        print(f"{backend:<11} {name:<15} {n:>4} {p50:>8.1f} {p99:>8.1f} {worst:>8.1f}")


if __name__ == "__main__":
    main()
