"""Keyword-only service functions over the registry: what the API routes, the CLI and the jobs call.

Every function takes the Database (and the Store when files are involved) and returns the
API's JSON objects (fleet_server.views). Unknown ids raise NotFoundError naming the id;
bad uploads raise the toco_core error that says what is wrong (ModelError, PoolError, ...).
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import numpy as np
import onnx
import orjson
from pydantic import ValidationError
from sqlalchemy import Text, cast, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from fleet_server.db import (
    AnalysisRow,
    BundleRow,
    Database,
    DeviceRow,
    DriftRow,
    EventRow,
    ModelRow,
    SampleRow,
    TelemetryRow,
    new_id,
)
from fleet_server.views import analysis_view, device_view, model_view
from toco_core.analysis.settings import AnalysisSettings
from toco_core.atomic_files import atomic_write
from toco_core.errors import ConfigError, PoolError, TocoError
from toco_core.model_inputs import Batch, ModelInputs, to_arrays
from toco_core.onnx_model import compressible_weights, input_specs, load_model, model_hash
from toco_core.pool import fit_to_input
from toco_core.preprocessing import Preprocessing


class NotFoundError(TocoError):
    """Raised when an id names nothing in the registry (HTTP 404)."""


class ConflictError(TocoError):
    """Raised when a request is valid but the registry's state forbids it now (HTTP 409)."""


@dataclass(frozen=True)
class Store:
    """The data directory layout: models/{id}/, analyses/{id}/, bundles/{sha}.bundle."""

    root: Path

    def model_dir(self, model_id: str) -> Path:
        return self.root / "models" / model_id

    def analysis_dir(self, analysis_id: str) -> Path:
        return self.root / "analyses" / analysis_id

    def bundle_path(self, bundle_id: str) -> Path:
        return self.root / "bundles" / f"{bundle_id}.bundle"


RowT = TypeVar("RowT")


def fetch(s: Session, row_type: type[RowT], key: str, what: str) -> RowT:
    """The row with primary key ``key`` or NotFoundError('{what} {key!r} does not exist')."""
    row = s.get(row_type, key)
    if row is None:
        raise NotFoundError(f"{what} {key!r} does not exist", f"list them with GET /api/{what.replace(' ', '')}s")
    return row


def log_event(s: Session, kind: str, data: dict[str, Any]) -> None:
    """Append to the event log inside the caller's write session."""
    s.add(EventRow(t=time.time(), kind=kind, data=data))


# --- models ----------------------------------------------------------------------------------------

def _read_pool(pool_bytes: bytes, model: onnx.ModelProto) -> tuple[Batch, np.ndarray | None]:
    """The uploaded pool fitted to the model inputs: ``x`` (one input) or one array per input name."""
    specs = input_specs(model)
    try:
        with np.load(io.BytesIO(pool_bytes), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as exc:  # numpy raises ValueError / BadZipFile / OSError for garbage
        raise PoolError(f"the pool is not a readable .npz file: {exc}",
                        "upload np.savez(f, x=inputs[, y=labels])") from None
    y = arrays.get("y")
    if len(specs) > 1:
        missing = [s.name for s in specs if s.name not in arrays]
        if missing:
            raise PoolError(f"the pool .npz holds {sorted(arrays)}, not the model inputs {missing}",
                            "save one array per input name: np.savez(f, **{name: inputs}, y=labels)")
        x: Batch = ModelInputs({s.name: fit_to_input(arrays[s.name], s, f"pool input {s.name!r}") for s in specs})
        return x, y
    if "x" not in arrays:
        raise PoolError(f"the pool .npz holds {sorted(arrays)}, not an array 'x'",
                        "save it with np.savez(f, x=..., y=...)")
    x = fit_to_input(arrays["x"], specs[0], "the uploaded pool")
    if y is not None and len(y) != len(x):
        raise PoolError(f"the pool has {len(x)} inputs but {len(y)} labels", "give one label per input or none")
    return x, y


def add_model(db: Database, store: Store, *, name: str, onnx_bytes: bytes, pool_bytes: bytes,
              preprocessing: str | dict | None = None) -> dict[str, Any]:
    """Register an ONNX model with its analysis pool. Returns the Model.

    A name already registered gets a new version of that model (v2, v3, ...; the newest version
    before it is its parent, fleet_server.model_versions); a new name starts at v1.

    Raises ModelError for an unreadable/unsupported ONNX file, PoolError for a pool that does
    not fit the model input, ConfigError for a bad name or preprocessing JSON.
    """
    if not name or len(name) > 200:
        raise ConfigError("the model name must be 1-200 characters", "give name=...")
    model = load_model(onnx_bytes)
    infos = compressible_weights(model)
    x, y = _read_pool(pool_bytes, model)
    prep = None
    if preprocessing:
        try:
            raw = json.loads(preprocessing) if isinstance(preprocessing, str) else preprocessing
            prep = Preprocessing.model_validate(raw).model_dump(mode="json")
        except (ValueError, ValidationError) as exc:
            raise ConfigError(f"preprocessing is not valid: {str(exc).splitlines()[0]}",
                              "give the JSON of toco_core.preprocessing.Preprocessing") from None
    model_id = new_id("m")
    folder = store.model_dir(model_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_bytes)
    arrays = to_arrays("x", x) if y is None else {**to_arrays("x", x), "y": y}
    np.savez(folder / "pool.npz", **arrays)  # type: ignore[arg-type]  # numpy: **kwds may name allow_pickle
    from fleet_server.model_versions import next_version  # model_versions imports registry

    row = ModelRow(id=model_id, name=name, sha256=model_hash(model), weights=sum(i.size for i in infos),
                   size_bytes=len(onnx_bytes), pool_size=len(x), path=str(folder / "model.onnx"),
                   pool_path=str(folder / "pool.npz"), preprocessing=prep, created_at=time.time())
    try:
        with db.session(write=True) as s:  # numbered under the writer lock: two uploads of one name get two versions
            row.version, row.parent_id, lineage = next_version(s, name)
            row.lineage_id = lineage or model_id
            s.add(row)
            log_event(s, "model", {"model_id": model_id, "name": name, "version": row.version,
                                   "parent_id": row.parent_id})
    except IntegrityError:  # PostgreSQL has no writer lock here: a concurrent upload of the name took the number
        raise ConflictError(f"another upload of model {name!r} took version v{row.version} at the same moment",
                            "upload it again: it becomes the next version") from None
    return model_view(row)


def list_models(db: Database) -> list[dict[str, Any]]:
    """Every registered model version, newest first."""
    with db.session() as s:
        return [model_view(m) for m in s.scalars(select(ModelRow).order_by(ModelRow.created_at.desc()))]


def get_model(db: Database, *, model_id: str) -> dict[str, Any]:
    """One Model. Raises NotFoundError."""
    with db.session() as s:
        return model_view(fetch(s, ModelRow, model_id, "model"))


# --- analyses --------------------------------------------------------------------------------------

def add_analysis_row(s: Session, *, model_id: str, settings: AnalysisSettings, reason: str = "initial",
                     field_sample_ids: list[int] | None = None) -> AnalysisRow:
    """Insert a queued analysis inside the caller's write session. Raises NotFoundError for the model."""
    fetch(s, ModelRow, model_id, "model")
    row = AnalysisRow(id=new_id("a"), model_id=model_id, status="queued", phase="queued", reason=reason,
                      settings=settings.model_dump(), field_sample_ids=list(field_sample_ids or []),
                      done=0, total=0, created_at=time.time())
    s.add(row)
    log_event(s, "analysis", {"analysis_id": row.id, "status": "queued", "reason": reason})
    return row


def create_analysis(db: Database, *, model_id: str, settings: AnalysisSettings, reason: str = "initial",
                    field_sample_ids: list[int] | None = None) -> dict[str, Any]:
    """Queue an analysis of a model (the job runner picks it up). Raises NotFoundError for the model."""
    with db.session(write=True) as s:
        row = add_analysis_row(s, model_id=model_id, settings=settings, reason=reason,
                               field_sample_ids=field_sample_ids)
        return analysis_view(row)


def list_analyses(db: Database) -> list[dict[str, Any]]:
    """Every analysis, newest first."""
    with db.session() as s:
        return [analysis_view(a) for a in s.scalars(select(AnalysisRow).order_by(AnalysisRow.created_at.desc()))]


def get_analysis(db: Database, *, analysis_id: str) -> dict[str, Any]:
    """One Analysis. Raises NotFoundError."""
    with db.session() as s:
        return analysis_view(fetch(s, AnalysisRow, analysis_id, "analysis"))


def analysis_detail(db: Database, *, analysis_id: str) -> dict[str, Any]:
    """Analysis + its manifest (rounds, timings, tensors, samples used) and calibration curves once done."""
    view = get_analysis(db, analysis_id=analysis_id)
    with db.session() as s:
        folder = fetch(s, AnalysisRow, analysis_id, "analysis").result_dir
    view["manifest"], view["curves"] = None, None
    if folder and (Path(folder) / "manifest.json").is_file():
        view["manifest"] = json.loads((Path(folder) / "manifest.json").read_text())
        view["curves"] = json.loads((Path(folder) / "calibration.json").read_text())
    return view


def update_analysis(db: Database, *, analysis_id: str, **fields: Any) -> dict[str, Any]:
    """Set columns of an analysis (status, phase, done, total, error, ...). Returns the Analysis."""
    with db.session(write=True) as s:
        row = fetch(s, AnalysisRow, analysis_id, "analysis")
        for k, v in fields.items():
            setattr(row, k, v)
        if "status" in fields:
            log_event(s, "analysis", {"analysis_id": analysis_id, "status": fields["status"], "error": row.error})
        return analysis_view(row)


def store_bundle(db: Database, store: Store, *, analysis_id: str, data: bytes, manifest: dict) -> str:
    """Write packed bundle bytes content-addressed and record them. Returns the bundle id (sha256)."""
    bundle_id = manifest["bundle_id"]
    path = store.bundle_path(bundle_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    atomic_write(path.with_suffix(".manifest.json"), json.dumps(manifest).encode())
    with db.session(write=True) as s:
        a = fetch(s, AnalysisRow, analysis_id, "analysis")
        if s.get(BundleRow, bundle_id) is None:
            s.add(BundleRow(id=bundle_id, analysis_id=analysis_id, model_id=a.model_id, path=str(path), size=len(data),
                            manifest=manifest, created_at=time.time()))
    return bundle_id


# --- devices and drift ----------------------------------------------------------------------------

def devices_json(db: Database) -> bytes:
    """Every known device (the fleet overview) as the JSON array of Device objects (see device_view).

    The overview of 1,000 devices is the API's hot path: plain rows instead of ORM objects, and
    the JSON columns passed through verbatim (orjson.Fragment) are never parsed and re-encoded;
    only ``active`` is, because its view is derived from it. ``model_version`` (the ModelVersion
    the device runs, derived from its active bundle; fleet_server.model_versions) costs one query
    for the whole fleet: a fleet runs a handful of bundles.
    """
    from fleet_server.model_versions import bundle_versions  # model_versions imports registry

    t = DeviceRow.__table__
    raw = [cast(t.c.hardware, Text).label("hardware_json"), cast(t.c.last_drift, Text).label("last_drift_json")]
    cols = [c for c in t.c if c.name not in ("hardware", "last_drift")] + raw
    with db.session() as s:
        rows = s.execute(select(*cols).order_by(t.c.id)).all()
        versions = bundle_versions(s, {(r._mapping["active"] or {}).get("bundle_id") for r in rows} - {None})
    views = []
    for r in rows:
        m = r._mapping
        row = SimpleNamespace(**m, hardware=orjson.Fragment(m["hardware_json"] or "{}"),
                              last_drift=orjson.Fragment(m["last_drift_json"] or "null"))
        bundle_id = (m["active"] or {}).get("bundle_id")
        views.append({**device_view(row),  # type: ignore[arg-type]  # row: a DeviceRow's columns
                      "model_version": versions.get(bundle_id) if bundle_id else None})
    return orjson.dumps(views, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)


def get_device(db: Database, *, device_id: str, points: int = 200) -> dict[str, Any]:
    """DeviceDetail: Device (with the ``model_version`` it runs) + telemetry, drift points and deployment
    history. Raises NotFoundError."""
    from fleet_server.deployment_queries import device_history  # deployment_queries imports registry
    from fleet_server.model_versions import running_version

    with db.session() as s:
        row = fetch(s, DeviceRow, device_id, "device")
        view = {**device_view(row), "model_version": running_version(s, row)}
        tel = s.scalars(select(TelemetryRow).where(TelemetryRow.device_id == device_id)
                        .order_by(TelemetryRow.t.desc()).limit(points)).all()
        view["telemetry"] = [{"t": r.t, "cpu_percent": r.cpu_percent, "available_memory": r.available_memory,
                              "inferences": r.inferences, "p50_ms": r.p50_ms} for r in reversed(tel)]
    view["drift"] = drift_points(db, device_id=device_id, limit=points)
    view["deployments"] = device_history(db, device_id=device_id)
    return view


def drift_points(db: Database, *, device_id: str | None = None, model_id: str | None = None,
                 limit: int = 500) -> list[dict[str, Any]]:
    """DriftPoints, oldest first (one device, or the newest of all), each with the ``model_id`` of the
    version whose bundle it was measured on (None for a bundle the server does not know).

    ``model_id``: only windows measured on bundles of that model version (drift history per version:
    a window names its bundle, the bundle its version). Raises NotFoundError for an unknown device or model.
    """
    with db.session() as s:
        q = (select(DriftRow, BundleRow.model_id).outerjoin(BundleRow, BundleRow.id == DriftRow.bundle_id)
             .order_by(DriftRow.t.desc()).limit(limit))
        if device_id is not None:
            fetch(s, DeviceRow, device_id, "device")
            q = q.where(DriftRow.device_id == device_id)
        if model_id is not None:
            fetch(s, ModelRow, model_id, "model")
            q = q.where(BundleRow.model_id == model_id)
        return [{**r.point, "model_id": m} for r, m in reversed(s.execute(q).all())]
        return [r.point for r in reversed(s.scalars(q).all())]


def analysis_paths(db: Database, *, analysis_id: str) -> dict[str, str]:
    """Result directory and model file of a finished analysis. Raises NotFoundError / ConflictError."""
    with db.session() as s:
        a = fetch(s, AnalysisRow, analysis_id, "analysis")
        if a.status != "done" or not a.result_dir:
            raise ConflictError(f"analysis {analysis_id!r} is {a.status}; the what-if needs a finished analysis",
                                "wait until it is done")
        return {"result_dir": a.result_dir, "model_path": fetch(s, ModelRow, a.model_id, "model").path}


def field_sample_ids_for_model(db: Database, *, model_id: str, limit: int = 2000) -> list[int]:
    """Ids of field samples uploaded by devices that reported drift on a bundle of this model (newest first)."""
    with db.session() as s:
        fetch(s, ModelRow, model_id, "model")
        bundles = select(BundleRow.id).where(BundleRow.model_id == model_id)
        devices = select(DriftRow.device_id).where(DriftRow.bundle_id.in_(bundles)).distinct()
        return list(s.scalars(select(SampleRow.id).where(SampleRow.device_id.in_(devices))
                              .order_by(SampleRow.id.desc()).limit(limit)))
