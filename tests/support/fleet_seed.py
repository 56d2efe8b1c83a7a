"""A large fleet written straight into a server's database through its own SQLAlchemy models.

10,000 MQTT births would measure the broker and the ingest (bench/fleet.py does); the overview
tests and bench/overview.py need the rows only. Every device's standing follows from its number,
so a test knows what each filter must return: ``seeded_devices`` gives the rows, the database
holds the same ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import insert

from fleet_server.db import AnalysisRow, BundleRow, Database, DeviceRow, ModelRow
from toco_core.bundle import make_manifest, pack_bundle
from toco_core.messages import PlanSummary

GROUPS = 20
KINDS = ("fidelity", "data", "unclassified")
# two versions of one model with a bundle each, and a bundle the server never built (a wiped database, say)
MODELS = {"m-seed-v1": 1, "m-seed-v2": 2}
BUNDLES = {"m-seed-v1": "b1" * 32, "m-seed-v2": "b2" * 32}
UNKNOWN_BUNDLE = "ff" * 32
HARDWARE = {"total_memory": 512 << 20, "available_memory": 300 << 20, "free_storage": 1 << 30, "physical_cores": 2,
            "logical_cores": 2, "cpu_model": "Cortex-A53", "ort_version": "1.32.0", "formats": ["fp32", "qdq_int8"]}
PLAN = PlanSummary(label="prune 50% / fp32", model_name="lenet5", runtime="fp32", prune_scale=0.5,
                   predicted_disagreement=0.01, storage_bytes=60_000, base_file_bytes=248_433,
                   measured_disagreement=0.015).model_dump(mode="json")


def device_id(i: int) -> str:
    """The id of seeded device ``i``: zero-padded, so id order is number order."""
    return f"dev-{i:05d}"


def _bundle(i: int) -> str | None:
    if i % 250 == 3:
        return UNKNOWN_BUNDLE
    return (None, BUNDLES["m-seed-v2"], BUNDLES["m-seed-v2"], BUNDLES["m-seed-v1"])[i % 4]


def seeded_device(i: int, now: float) -> dict[str, Any]:
    """The devices row of device ``i``: mostly online; offline, deploying, failed, alerting (three kinds),
    quarantined and revoked ones at fixed strides; 20 groups; v2, v1, an unknown bundle or no model."""
    kind = KINDS[(i // 13) % 3] if i % 13 == 5 else None
    enrollment = "revoked" if i % 1000 == 999 else "quarantined" if i % 500 == 499 else "enrolled"
    deploy_state = "deploying" if i % 50 == 7 else "failed" if i % 97 == 11 else None
    bundle = _bundle(i)
    active = None if bundle is None else {"bundle_id": bundle, "model_name": "lenet5", "slot": "a", "plan": PLAN}
    return {"id": device_id(i), "group": f"line-{i % GROUPS:02d}", "online": i % 7 != 3, "birth": 1,
            "last_seen": now - i % 600, "agent_version": "sim-1", "hardware": {**HARDWARE, "device_id": device_id(i)},
            "active": active, "active_bundle": bundle, "alert": kind is not None, "drift_kind": kind,
            "deploy_state": deploy_state,
            "last_drift": {"window": 11, "t": now - 60, "agreement": 0.99, "input_shift": 0.05, "alert": bool(kind)},
            "bad_messages": 0, "enrollment": enrollment, "enrolled_at": None if enrollment == "quarantined" else now,
            "allowed_models": None}


def seeded_devices(n: int, now: float | None = None) -> list[dict[str, Any]]:
    """The rows of devices 0..n-1 (what seed_fleet writes)."""
    now = time.time() if now is None else now
    return [seeded_device(i, now) for i in range(n)]


def seed_fleet(db: Database, n: int) -> list[dict[str, Any]]:
    """Write two model versions, their bundles and ``n`` devices into ``db`` in one transaction (a bulk
    INSERT of the server's own tables). Returns the device rows written."""
    now = time.time()
    rows = seeded_devices(n, now)
    with db.session(write=True) as s:
        # one flush per table: the tables declare no relationships, so only this order satisfies
        # PostgreSQL's foreign keys (an analysis names its model, a bundle both)
        s.add_all(ModelRow(id=model_id, name="lenet5", version=version, sha256="0" * 64, weights=1, size_bytes=1,
                           pool_size=1, path="-", pool_path="-", created_at=now, lineage_id="m-seed-v1",
                           parent_id=None if version == 1 else "m-seed-v1") for model_id, version in MODELS.items())
        s.flush()
        s.add_all(AnalysisRow(id=f"a-{model_id}", model_id=model_id, status="done", settings={}, created_at=now)
                  for model_id in MODELS)
        s.flush()
        for model_id, bundle in BUNDLES.items():
            s.add(BundleRow(id=bundle, analysis_id=f"a-{model_id}", model_id=model_id, path="-", size=1, manifest={},
                            created_at=now))
        s.execute(insert(DeviceRow), rows)
    return rows


def seed_deployable(db: Database, bundle_dir: Path, n: int, *, key: Ed25519PrivateKey | None = None,
                    group: str = "deploy") -> str:
    """What a deployment to ``n`` devices needs, written straight into ``db``: a model, its finished analysis
    (no result directory, so the advisory feasibility check is skipped), its bundle (a small packed file in
    ``bundle_dir``, its manifest signed by ``key`` when given) and devices 0..n-1 (seeded_device's rows, but all
    enrolled, online, not deploying and in ``group``). Returns the analysis id, ``a-deploy``."""
    now = time.time()
    data = pack_bundle({"model.onnx": b"\0" * 70_000})
    manifest = make_manifest(data, 64 * 1024, key)
    path = Path(bundle_dir) / f"{manifest.bundle_id}.bundle"
    path.write_bytes(data)
    devices = [{**seeded_device(i, now), "group": group, "online": True, "enrollment": "enrolled",
                "enrolled_at": now, "deploy_state": None} for i in range(n)]
    with db.session(write=True) as s:
        s.add(ModelRow(id="m-deploy", name="lenet5", version=1, sha256="0" * 64, weights=1, size_bytes=1,
                       pool_size=1, path="-", pool_path="-", created_at=now, lineage_id="m-deploy"))
        s.flush()  # PostgreSQL's foreign keys: the model, then its analysis, then the bundle
        s.add(AnalysisRow(id="a-deploy", model_id="m-deploy", status="done", settings={"budget": 0.05},
                          created_at=now, bundle_id=manifest.bundle_id))
        s.flush()
        s.add(BundleRow(id=manifest.bundle_id, analysis_id="a-deploy", model_id="m-deploy", path=str(path),
                        size=len(data), manifest=manifest.model_dump(mode="json"), created_at=now))
        if devices:
            s.execute(insert(DeviceRow), devices)
    return "a-deploy"
