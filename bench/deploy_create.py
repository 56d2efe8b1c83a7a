"""Deployment creation at fleet scale: ``Deployments.create`` to a group of N enrolled, online devices.

bench/fleet.py's deployment to 2,000 devices on PostgreSQL timed out its 60 s HTTP request; this
times the call itself. A real fleet server (mosquitto, its signer and MQTT client, so every
command is signed and published) runs in this process on SQLite and on a throw-away PostgreSQL
(tests/fleet/postgres.py); the devices, a finished analysis and its signed bundle are written
straight into its database. The analysis has no result directory, so the advisory feasibility
check (planned once per distinct hardware profile, and every device here has the same) is left out.

Printed per backend and size: seconds for ``create`` (whole group in one wave, as bench/fleet.py
deploys), SQL statements it executed (an executemany counts once), commands published, and with
``--statuses`` the seconds to ingest one ``active`` status from every device (batches of 32, the
broker's in-flight window to a server, each batch one transaction as the ingest writes it).

``--against REV`` runs the same measurement on the code of git revision REV first (its fleet_server and
toco_core extracted to a temp dir, with this tree's tests/ for the seeding), so a before/after comes from one run.

Run: ``.venv/bin/python bench/deploy_create.py`` (``--devices 500,2000``, ``--no-postgres``,
``--against main``, ``--statuses``, ``--progress K``: K ``downloading`` statuses per device first, as an agent
reports its fetch).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TREES = ["fleet_server", "toco_core"]  # REV's code; the seeding helpers (tests/) are this tree's


def _statuses(server, deployment_id: str, bundle_id: str, device_ids: list[str], progress: int) -> float:
    """Seconds to ingest ``progress`` ``downloading`` statuses and then an ``active`` one from every device, 32
    to a transaction, as the ingest does (each round of statuses goes through every device before the next)."""
    from sqlalchemy import select

    from fleet_server.db import DeviceRow
    from fleet_server.deployment_rules import lock_deployments
    from toco_core.messages import StatusMessage

    phases = [("downloading", (k + 1) / (progress + 1)) for k in range(progress)] + [("active", None)]
    t = time.perf_counter()
    for phase, share in phases:
        for i in range(0, len(device_ids), 32):
            after: list = []
            with server.db.session(write=True) as s:
                lock_deployments(s, [deployment_id])
                batch = s.scalars(select(DeviceRow).where(DeviceRow.id.in_(device_ids[i:i + 32]))
                                  .order_by(DeviceRow.id)).all()
                for d in batch:
                    with s.begin_nested():
                        server.deployments.on_status(s, d, StatusMessage(device_id=d.id, phase=phase, progress=share,
                                                                         deployment_id=deployment_id,
                                                                         bundle_id=bundle_id), after)
            for fn in after:
                fn()
    return time.perf_counter() - t


def measure(backend: str, db_url: str | None, n: int, broker_url: str, statuses: bool, progress: int = 0) -> dict:
    """One fresh server with ``n`` devices; times ``create`` (and the statuses). Returns the table row's fields."""
    from sqlalchemy import event

    from fleet_server.config import FleetSettings
    from fleet_server.server import FleetServer

    with tempfile.TemporaryDirectory() as tmp:
        # a long tick: the housekeeping loop's own deployment tick stays out of the timing
        settings = FleetSettings(data_dir=Path(tmp), broker=broker_url, http_port=0, fleet="bench-deploy",
                                 tick_s=60, deploy_timeout_s=3600)
        if db_url:
            settings = settings.model_copy(update={"db_url": db_url})
        server = FleetServer(settings).start()
        try:
            from tests.support.fleet_seed import seed_deployable

            analysis_id = seed_deployable(server.db, server.settings.data_dir, n, key=server.key)
            sent = [0]
            send = server.deployments.send_command

            def counted(device_id, command):
                sent[0] += 1
                send(device_id, command)

            server.deployments.send_command = counted
            statements = [0]

            def count(*args) -> None:
                statements[0] += 1

            event.listen(server.db.engine, "before_cursor_execute", count)
            t = time.perf_counter()
            dep = server.deployments.create(analysis_id=analysis_id, target={"group": "deploy"}, canary_share=1.0,
                                            failure_threshold=0.5)
            create_s = time.perf_counter() - t
            event.remove(server.db.engine, "before_cursor_execute", count)
            assert sum(dep["counts"].values()) == n, dep["counts"]
            row = {"backend": backend, "devices": n, "create_s": create_s, "statements": statements[0],
                   "commands": sent[0], "in_progress": dep["counts"]["in_progress"], "statuses_s": None}
            if statuses:
                row["statuses_s"] = _statuses(server, dep["deployment_id"], dep["bundle_id"],
                                              [d["device_id"] for d in dep["devices"]], progress)
                final = server.deployments.get(deployment_id=dep["deployment_id"])
                assert final["counts"]["succeeded"] == n and final["stage"] == "done", final["counts"]
            return row
        finally:
            server.stop()


def child(args) -> None:
    """Measure every size on SQLite and (unless --no-postgres) PostgreSQL; one JSON row a line on stdout."""
    from tests.support.broker import Broker

    with ExitStack() as stack:
        broker = Broker()
        broker.start()
        stack.callback(broker.cleanup)
        backends: list[tuple[str, str | None]] = [("sqlite", None)]
        if not args.no_postgres:
            from tests.fleet.postgres import postgres_cluster

            cluster = stack.enter_context(postgres_cluster())
            backends.append(("postgresql", None))
        for backend, _ in backends:
            for k, n in enumerate(args.devices):
                url = cluster.create_database(f"deploy{k}") if backend == "postgresql" else None
                row = measure(backend, url, n, broker.url, args.statuses, args.progress)
                print(json.dumps(row), flush=True)


def run_child(code: Path, label: str, args) -> list[dict]:
    """Run the measurement in a child interpreter importing the project from ``code``; its rows, labelled."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--devices", ",".join(map(str, args.devices))]
    argv += ["--no-postgres"] * args.no_postgres + ["--statuses"] * args.statuses
    argv += ["--progress", str(args.progress)] if args.progress else []
    out = subprocess.run(argv, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return [{"code": label, **json.loads(line)} for line in out.splitlines() if line.startswith("{")]


def main() -> None:
    """Parse the options; measure REV's code (--against) then this tree's, each in a child; print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=lambda v: [int(x) for x in v.split(",")], default=[2000],
                    help="comma-separated group sizes (default 2000)")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    ap.add_argument("--statuses", action="store_true", help="also time an active status from every device")
    ap.add_argument("--progress", type=int, default=0, metavar="K",
                    help="with --statuses: K downloading statuses from every device before its active one")
    ap.add_argument("--against", metavar="REV", help="measure git revision REV's code first (before/after)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, str(Path.cwd()))
        child(args)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="toco-deploy-create-") as tmp:
        if args.against:
            rev = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, check=True,
                                 capture_output=True, text=True).stdout.strip()
            archive = subprocess.run(["git", "archive", rev, *TREES], cwd=REPO, check=True, capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
            shutil.copytree(REPO / "tests", Path(tmp) / "tests", ignore=shutil.ignore_patterns("__pycache__"))
            rows += run_child(Path(tmp), rev, args)
        rows += run_child(REPO, "this tree", args)
    print(f"\nDeployments.create to a group of enrolled online devices (one wave), on {Path(sys.executable).name}")
    print(f"{'code':<10} {'backend':<11} {'devices':>7} {'create s':>9} {'SQL stmts':>9} {'commands':>8} "
          f"{'statuses s':>10}")
    for r in rows:
        st = "-" if r["statuses_s"] is None else f"{r['statuses_s']:.1f}"
        print(f"{r['code']:<10} {r['backend']:<11} {r['devices']:>7} {r['create_s']:>9.2f} {r['statements']:>9} "
              f"{r['commands']:>8} {st:>10}")


if __name__ == "__main__":
    main()
