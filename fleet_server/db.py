"""The registry's tables (SQLAlchemy 2, declarative). SQLite by default; a PostgreSQL URL works the same.

Flexible, message-shaped parts (hardware facts, manifests, plans, bands) are JSON columns;
everything the server filters or joins on is a real column. Ids are short prefixed strings
that are also safe MQTT topic levels and command ids.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import orjson
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker, validates

from fleet_server.migrate import upgrade_database

# 64-bit integers on every backend: byte counts (6 GiB free on a box), counters and the ids of the tables that grow
# by a row per message (10,000 devices' telemetry passes 2**31 rows in weeks) overflow PostgreSQL's 32-bit INTEGER.
# SQLite's INTEGER is already 64-bit, and only an INTEGER primary key is its auto-numbered rowid, so it keeps INTEGER.
BigInt = BigInteger().with_variant(Integer(), "sqlite")


def new_id(prefix: str) -> str:
    """``{prefix}-{12 hex}``: unique enough for one fleet, and a valid topic level."""
    return f"{prefix}-{secrets.token_hex(6)}"


class Base(DeclarativeBase):
    """Declarative base of every table."""


class ModelRow(Base):
    """One version of a model: versions of one name form a lineage (v1 <- v2 <- ...; fleet_server.model_versions)."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    weights: Mapped[int] = mapped_column(BigInt)
    size_bytes: Mapped[int] = mapped_column(BigInt)
    pool_size: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(Text)
    pool_path: Mapped[str] = mapped_column(Text)
    preprocessing: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    parent_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # the previous version; None for v1
    # v1's id, shared by every version: the model id bundles' anti-rollback sequences count under
    lineage_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    __table_args__ = (Index("ux_models_name_version", "name", "version", unique=True),)


class AnalysisRow(Base):
    __tablename__ = "analyses"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    phase: Mapped[str] = mapped_column(String(32), default="queued")
    done: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str] = mapped_column(Text, default="initial")
    settings: Mapped[dict] = mapped_column(JSON)
    field_sample_ids: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    result_dir: Mapped[str | None] = mapped_column(Text, nullable=True)
    timings: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class BundleRow(Base):
    __tablename__ = "bundles"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the packed bytes
    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"), index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInt)
    manifest: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)


class DeviceRow(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group: Mapped[str] = mapped_column(String(64), default="default", index=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    birth: Mapped[int] = mapped_column(Integer, default=0)
    last_seen: Mapped[float] = mapped_column(Float, default=time.time)
    agent_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hardware: Mapped[dict] = mapped_column(JSON, default=dict)
    active: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    last_drift: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    alert: Mapped[bool] = mapped_column(Boolean, default=False)
    deploy_state: Mapped[str | None] = mapped_column(String(16), nullable=True)  # deploying | failed | None
    bad_messages: Mapped[int] = mapped_column(Integer, default=0)
    # who the device is to the server (fleet_server.enrollment): enrolled | quarantined | revoked. Only an
    # enrolled device is deployed to or can trigger anything; ``group`` is the enrolled one, never the claimed one
    enrollment: Mapped[str] = mapped_column(String(16), default="quarantined", server_default="quarantined", index=True)
    enrolled_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    allowed_models: Mapped[list | None] = mapped_column(JSON, nullable=True)  # model ids; None = any model
    drift_kind: Mapped[str | None] = mapped_column(String(16), nullable=True)  # fidelity | data | unclassified
    # active["bundle_id"] kept in a column of its own (set with ``active``): the version filter and counts of
    # the device listing read it instead of parsing every device's JSON (migration 0009)
    active_bundle: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    # the device listing's counts read this index, never the JSON-laden rows
    __table_args__ = (Index("ix_devices_overview", "group", "enrollment", "online", "deploy_state", "alert",
                            "drift_kind", "id"),)

    @validates("active")
    def _keep_active_bundle(self, _key: str, active: dict | None) -> dict | None:
        self.active_bundle = (active or {}).get("bundle_id")
        return active


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    t: Mapped[float] = mapped_column(Float)
    cpu_percent: Mapped[float] = mapped_column(Float)
    available_memory: Mapped[int] = mapped_column(BigInt)
    inferences: Mapped[int] = mapped_column(BigInt)
    p50_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (Index("ix_telemetry_device_t", "device_id", "t"),)


class DeploymentRow(Base):
    __tablename__ = "deployments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    analysis_id: Mapped[str] = mapped_column(ForeignKey("analyses.id"))
    bundle_id: Mapped[str] = mapped_column(String(64))
    target: Mapped[dict] = mapped_column(JSON)
    stage: Mapped[str] = mapped_column(String(16), default="canary", index=True)
    canary_share: Mapped[float] = mapped_column(Float)
    failure_threshold: Mapped[float] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # deploy | rollback: a rollback deployment sends signed rollback commands naming its (older) bundle
    command: Mapped[str] = mapped_column(String(16), default="deploy", server_default="deploy")


class DeploymentDeviceRow(Base):
    """One device of a deployment: its wave, current phase and when it last spoke."""

    __tablename__ = "deployment_devices"
    deployment_id: Mapped[str] = mapped_column(ForeignKey("deployments.id"), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), primary_key=True, index=True)
    wave: Mapped[str] = mapped_column(String(8))  # canary | rest
    phase: Mapped[str] = mapped_column(String(16), default="pending")
    outcome: Mapped[str] = mapped_column(String(16), default="pending")  # pending|in_progress|succeeded|failed
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    # why the server expected this box to find no plan within budget (advisory, set at creation)
    expected_infeasible: Mapped[str | None] = mapped_column(Text, nullable=True)
    sent_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class TimelineRow(Base):
    """Every phase a device went through in a deployment (the per-device status timeline)."""

    __tablename__ = "deployment_timeline"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    deployment_id: Mapped[str] = mapped_column(String(40), index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    t: Mapped[float] = mapped_column(Float, default=time.time)


class DriftRow(Base):
    __tablename__ = "drift_reports"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    window: Mapped[int] = mapped_column(Integer)
    t: Mapped[float] = mapped_column(Float)
    alert: Mapped[bool] = mapped_column(Boolean)
    point: Mapped[dict] = mapped_column(JSON)  # the API's DriftPoint
    disputed: Mapped[list] = mapped_column(JSON, default=list)
    __table_args__ = (Index("ix_drift_device_t", "device_id", "t"),)


class SampleRow(Base):
    """One uploaded field input (raw bytes as the agent sent them)."""

    __tablename__ = "field_samples"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    ref: Mapped[str] = mapped_column(String(128))
    window: Mapped[int | None] = mapped_column(Integer, nullable=True)
    dtype: Mapped[str] = mapped_column(String(16))
    shape: Mapped[list] = mapped_column(JSON)
    data: Mapped[bytes] = mapped_column(LargeBinary)
    reason: Mapped[str] = mapped_column(String(32))
    t: Mapped[float] = mapped_column(Float, default=time.time)


class ReanalysisRow(Base):
    __tablename__ = "reanalyses"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(40))
    parent_analysis_id: Mapped[str] = mapped_column(String(40))
    group: Mapped[str] = mapped_column(String(64))
    trigger_devices: Mapped[list] = mapped_column(JSON)
    trigger_bundles: Mapped[dict] = mapped_column(JSON, default=dict)  # device -> bundle it drifted on
    why: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), index=True)
    analysis_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    deployment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    approved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    # ``deployment_id`` is the canary (the trigger devices); the group follows on a quorum or approval
    group_deployment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    group_approved_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    rebased: Mapped[list | None] = mapped_column(JSON, nullable=True)  # devices sent the convergence rebase


class DriftAlertRow(Base):
    """One drift alert of a device on a bundle: its kind, evidence, and what the server did and why."""

    __tablename__ = "drift_alerts"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    model_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    group: Mapped[str] = mapped_column(String(64))
    bundle_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    kind: Mapped[str] = mapped_column(String(16))  # fidelity | data | unclassified
    # open | classifying | reanalysing | held | escalated | accepted | acknowledged | resolved
    status: Mapped[str] = mapped_column(String(20), index=True)
    why: Mapped[str] = mapped_column(Text)
    decision: Mapped[str] = mapped_column(Text, default="", server_default="")
    evidence: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    reanalysis_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    updated_at: Mapped[float] = mapped_column(Float, default=time.time)


class EventRow(Base):
    """The event log: what happened, for people (telemetry is not logged here)."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    t: Mapped[float] = mapped_column(Float, default=time.time)
    # 32: "reanalysis_skipped" (18) outgrew the 16 of 5092848; PostgreSQL refuses a longer value, SQLite never did
    kind: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict] = mapped_column(JSON)


class ApiTokenRow(Base):
    """An API token: only its SHA-256 is stored (fleet_server.auth), with its role and whether it is revoked."""

    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # the token's public prefix, for lookup
    name: Mapped[str] = mapped_column(String(100))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    last_used_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ReplicaRow(Base):
    """A replica's MQTT session, registered at start: what another replica needs to drain it once that replica is
    dead (fleet_server.session_drain). Liveness is not stored: it is the ``mqtt-identity`` advisory lock."""

    __tablename__ = "replicas"
    client_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    replica_id: Mapped[str] = mapped_column(String(100))
    identity: Mapped[str] = mapped_column(String(128))  # the name of the advisory lock its live process holds
    mqtt_user: Mapped[str | None] = mapped_column(String(128), nullable=True)
    session_expiry_s: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[float] = mapped_column(Float, default=time.time)


class UnsentCommandRow(Base):
    """A drift-policy command the MQTT client refused to publish (fleet_server.command_outbox): kept unsigned,
    signed afresh and sent by the leader's tick once publishing works, then deleted."""

    __tablename__ = "unsent_commands"
    id: Mapped[int] = mapped_column(BigInt, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64))
    command: Mapped[bytes] = mapped_column(LargeBinary)  # the unsigned command's wire JSON (toco_core.messages)
    created_at: Mapped[float] = mapped_column(Float, default=time.time)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    last_error: Mapped[str | None] = mapped_column(String(300), nullable=True)


class Database:
    """Engine + session factory. SQLite gets WAL and a busy timeout so threads can share the file."""

    def __init__(self, url: str) -> None:
        """Open ``url`` and bring its schema to this release's Alembic head (``self.schema``: what was done).

        Raises DatabaseError, with the engine released and the database untouched, if a newer
        release wrote it or its tables cannot be placed in the migration history.
        """
        sqlite = url.startswith("sqlite")
        args = {"check_same_thread": False, "timeout": 30} if sqlite else {}
        # JSON columns are read on every overview (3 per device): orjson parses them ~5x faster
        self.engine = create_engine(url, connect_args=args, pool_pre_ping=not sqlite, json_deserializer=orjson.loads)
        if sqlite:
            @event.listens_for(self.engine, "connect")
            def _pragmas(conn, _record):  # one connection at a time writes; readers never block it
                cur = conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        # SQLite allows one writer; serialising writers here avoids "database is locked" retries
        self.write_lock = threading.RLock() if sqlite else _NullLock()
        self._factory = sessionmaker(self.engine, expire_on_commit=False)
        try:  # a database outlives releases: tables come from the migrations, never from create_all
            self.schema = upgrade_database(self.engine)
        except BaseException:
            self.engine.dispose()
            raise

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session committed on success and rolled back on error; ``write`` takes the writer lock."""
        lock = self.write_lock if write else _NullLock()
        with lock, self._factory() as s:
            try:
                yield s
                if write:
                    s.commit()
            except BaseException:
                s.rollback()
                raise

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()


class _NullLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
