"""Where the dashboard's paged overview spends its time at 10,000 devices on PostgreSQL, without and with ingest.

A server (its own ingest thread and API, this process) on a throw-away PostgreSQL with 10,000 seeded devices
(tests/support/fleet_seed.py). For each phase, idle then with --ingest messages a second from the publisher
of bench/_overview_ingest.py:

    EXPLAIN (ANALYZE, BUFFERS) of every statement the listing ran per facet before (the filter's total and a
    GROUP BY per state, alert kind, group and bundle), of the page query and of the one-scan GROUP BY of
    fleet_server.device_facets: execution ms and shared buffers (8 KB pages) read or hit;
    device_page() called in this process (no HTTP): p50 / p99 of the whole call, of the time inside the
    database driver (the API thread's statements only) and their count, and of the JSON serialisation;
    GET /api/devices?limit=50&facets=true over HTTP: p50 / p99.

Run: ``.venv/bin/python bench/overview_explain.py [--devices 10000] [--ingest 600] [--calls 100]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from sqlalchemy import event, func, select, text

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench._overview_ingest import IngestLoad  # noqa: E402
from fleet_server.api import create_app  # noqa: E402
from fleet_server.auth import create_token  # noqa: E402
from fleet_server.config import FleetSettings  # noqa: E402
from fleet_server.db import Database, DeviceRow  # noqa: E402
from fleet_server.device_facets import state_expression  # noqa: E402
from fleet_server.device_listing import DeviceQuery, device_page  # noqa: E402
from fleet_server.server import FleetServer, HttpThread  # noqa: E402
from tests.support.broker import Broker  # noqa: E402
from tests.support.fleet_seed import seed_fleet  # noqa: E402

FLEET = "bench-explain"


def statements() -> dict[str, object]:
    """The statements of an unfiltered dashboard page: those of the per-facet counting, and the one scan."""
    d, state = DeviceRow, state_expression()
    combo = (state, d.alert, d.drift_kind, d.group, d.active_bundle)
    return {"total (count)": select(func.count()).select_from(d),
            "state GROUP BY": select(state, func.count()).group_by(state),
            "alert kind GROUP BY": select(d.drift_kind, func.count()).group_by(d.drift_kind),
            "group GROUP BY": select(d.group, func.count()).group_by(d.group),
            "bundle GROUP BY": select(d.active_bundle, func.count()).group_by(d.active_bundle),
            "page (51 rows by id)": select(d).order_by(d.id).limit(51),
            "one scan (device_facets)": select(*combo, func.count()).group_by(*combo)}


def explain(db: Database, repeats: int = 7) -> list[tuple[str, float, int]]:
    """(statement, median execution ms, shared buffers) of EXPLAIN (ANALYZE, BUFFERS) of each of statements(),
    ``repeats`` rounds over all of them (one run on a busy box is noise)."""
    runs: dict[str, list[tuple[float, int]]] = {}
    with db.engine.connect() as conn:
        for _ in range(repeats):
            for name, stmt in statements().items():
                sql = str(stmt.compile(db.engine, compile_kwargs={"literal_binds": True}))  # type: ignore[attr-defined]
                plan = [row[0] for row in conn.execute(text("EXPLAIN (ANALYZE, BUFFERS) " + sql))]
                ms = float(next(p for p in plan if "Execution Time" in p).split(":")[1].split()[0])
                buffers = next((p for p in plan if "Buffers:" in p), "")
                pages = sum(int(part.split("=")[1]) for part in buffers.split() if "=" in part)
                runs.setdefault(name, []).append((ms, pages))
    return [(name, statistics.median(ms for ms, _ in r), r[-1][1]) for name, r in runs.items()]


def in_process(db: Database, calls: int) -> dict[str, list[float]]:
    """ms of ``calls`` device_page() calls: whole call, inside the driver (this thread's statements), statements
    per call, and the page's model_dump_json."""
    me, started, sql = threading.get_ident(), [0.0], [0.0, 0]

    def before(*_args) -> None:
        if threading.get_ident() == me:
            started[0] = time.perf_counter()

    def after(*_args) -> None:
        if threading.get_ident() == me:
            sql[0] += time.perf_counter() - started[0]
            sql[1] += 1

    event.listen(db.engine, "before_cursor_execute", before)
    event.listen(db.engine, "after_cursor_execute", after)
    out: dict[str, list[float]] = {"call": [], "sql": [], "statements": [], "json": []}
    try:
        for _ in range(calls):
            sql[0], sql[1] = 0.0, 0
            t = time.perf_counter()
            page = device_page(db, DeviceQuery(limit=50, facets=True))
            t_json = time.perf_counter()
            page.model_dump_json()
            out["json"].append(1000 * (time.perf_counter() - t_json))
            out["call"].append(1000 * (time.perf_counter() - t))
            out["sql"].append(1000 * sql[0])
            out["statements"].append(float(sql[1]))
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
        event.remove(db.engine, "after_cursor_execute", after)
    return out


def over_http(url: str, token: str, calls: int) -> list[float]:
    """ms of ``calls`` GET /api/devices?limit=50&facets=true, 50 ms apart."""
    out = []
    with httpx.Client(base_url=url, timeout=30, headers={"Authorization": f"Bearer {token}"}) as api:
        api.get("/api/devices", params={"limit": 50}).raise_for_status()
        for _ in range(calls):
            t = time.perf_counter()
            api.get("/api/devices", params={"limit": 50, "facets": "true"}).raise_for_status()
            out.append(1000 * (time.perf_counter() - t))
            time.sleep(0.05)
    return out


def report(phase: str, db: Database, url: str, token: str, calls: int) -> None:
    """Print the three measurements of one phase."""
    p50, p99 = statistics.median, lambda v: float(np.percentile(v, 99))
    print(f"\n{phase}\n| statement | EXPLAIN ANALYZE ms (median of 7) | shared buffers |\n|---|---|---|")
    for name, ms, pages in explain(db):
        print(f"| {name} | {ms:.1f} | {pages:,} |")
    t = in_process(db, calls)
    print(f"device_page() in process, {calls} calls: p50 / p99 {p50(t['call']):.1f} / {p99(t['call']):.1f} ms; "
          f"in the driver {p50(t['sql']):.1f} / {p99(t['sql']):.1f} ms in {p50(t['statements']):.0f} statements; "
          f"model_dump_json {p50(t['json']):.2f} / {p99(t['json']):.2f} ms")
    http = over_http(url, token, calls)
    print(f"GET /api/devices?limit=50&facets=true, {calls} requests: p50 / p99 {p50(http):.1f} / {p99(http):.1f} ms, "
          f"max {max(http):.1f} ms", flush=True)


def main() -> None:
    """Parse the options; seed; report idle, then under ingest."""
    from tests.fleet.postgres import postgres_cluster

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    ap.add_argument("--ingest", type=float, default=600.0, help="messages a second in the second phase")
    ap.add_argument("--calls", type=int, default=100)
    args = ap.parse_args()
    broker = Broker()
    broker.start()
    try:
        with postgres_cluster() as cluster, tempfile.TemporaryDirectory() as tmp:
            settings = FleetSettings(data_dir=Path(tmp), broker=broker.url, http_port=0, fleet=FLEET,
                                     db_url=cluster.create_database("explain"))
            server = FleetServer(settings).start()
            http = HttpThread(create_app(server), "127.0.0.1", 0).start()
            try:
                seed_fleet(server.db, args.devices)
                with server.db.engine.connect() as conn:  # statistics for the planner, as autovacuum would
                    conn.execute(text("ANALYZE devices"))
                    conn.commit()
                token, _ = create_token(server.db, role="viewer", name="bench")
                print(f"{args.devices:,} devices on PostgreSQL; 1-min load at {time.strftime('%H:%M:%S')}: "
                      f"{os.getloadavg()[0]:.2f}")
                report("idle", server.db, http.url, token, args.calls)
                with IngestLoad(broker.port, FLEET, args.devices, args.ingest) as load:
                    time.sleep(5)
                    report(f"with ingest ({args.ingest:.0f} messages/s asked)", server.db, http.url, token,
                           args.calls)
                print(f"ingest: {load.sent:,} messages sent at {load.sent / load.seconds:.0f}/s, "
                      f"{server.ingest.stats.get('stored', 0):,} stored; 1-min load at the end "
                      f"{os.getloadavg()[0]:.2f}")
            finally:
                http.stop()
                server.stop()
    finally:
        broker.cleanup()


if __name__ == "__main__":
    main()
