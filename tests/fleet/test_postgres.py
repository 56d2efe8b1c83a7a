"""The fleet database on PostgreSQL (a throw-away cluster, tests/fleet/postgres.py): the Alembic chain
applies, downgrades to base and applies again; a database with commit 5092848's schema and rows is
adopted and upgraded; the offline commands and a running server do registry work on it."""

from __future__ import annotations

import logging

import sqlalchemy as sa
from alembic import command
from typer.testing import CliRunner

from fleet_server.cli import app
from fleet_server.db import Database
from fleet_server.migrate import BASELINE, alembic_config, head_revision, schema_state
from tests.fleet.conftest import HARDWARE, Fleet, SimDevice, wait_until
from tests.fleet.test_db_upgrade import differences
from toco_core.messages import TelemetryMessage

# commit 5092848's rows (as in test_db_upgrade.ROWS) written the way PostgreSQL takes them: real booleans, bytea
ROWS_5092848 = """
INSERT INTO models VALUES ('m-1', 'lenet5', 'ab12', 61706, 250000, 120, '/d/m.onnx', '/d/p.npz', NULL, 1.0);
INSERT INTO models VALUES ('m-2', 'lenet5', 'cd34', 61706, 250000, 120, '/d/m2.onnx', '/d/p2.npz', NULL, 3.0);
INSERT INTO analyses (id, model_id, status, phase, done, total, reason, settings, field_sample_ids, created_at)
  VALUES ('a-1', 'm-1', 'done', 'done', 4, 4, 'initial', '{"budget": 0.01}', '[]', 2.0);
INSERT INTO devices VALUES ('cam-1', 'line', true, 3, 5.0, 'agent-1', '{"total_memory": 268435456}', NULL, NULL, false,
  NULL, 0);
INSERT INTO deployments VALUES ('d-1', 'a-1', 'b1', '{"group": "line"}', 'done', 0.1, 0.2, NULL, 6.0, 7.0);
INSERT INTO deployment_devices VALUES ('d-1', 'cam-1', 'canary', 'active', 'succeeded', NULL, 'storage 2 KB < 60 KB',
  6.5, 7.0);
INSERT INTO telemetry (device_id, t, cpu_percent, available_memory, inferences, p50_ms)
  VALUES ('cam-1', 5.0, 12.5, 100000000, 40, 0.8), ('cam-1', 6.0, 11.0, 100000000, 80, NULL);
INSERT INTO reanalyses (id, model_id, parent_analysis_id, "group", trigger_devices, trigger_bundles, why, status,
  created_at) VALUES ('r-1', 'm-1', 'a-1', 'line', '["cam-1"]', '{}', 'drift', 'done', 8.0);
INSERT INTO field_samples (device_id, ref, "window", dtype, shape, data, reason, t)
  VALUES ('cam-1', 'cam-1-3-0', 3, 'float32', '[1, 28, 28]', '\\x00010203', 'drift', 8.0);
INSERT INTO events (t, kind, data) VALUES (9.0, 'deploy', '{"deployment_id": "d-1"}');
"""


def cli(*args: str) -> tuple[int, str]:
    """``toco-fleet ARGS``; returns (exit code, output stripped)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        out = CliRunner().invoke(app, list(args))
    finally:  # the CLI logs to the runner's stderr, closed afterwards: a server started next would log into it
        root.handlers[:] = handlers
        root.setLevel(level)
    return out.exit_code, out.output.strip()


def test_the_migration_chain_applies_goes_back_to_base_and_applies_again(pg_url):
    code, line = cli("db", "upgrade", "--db-url", pg_url)
    assert code == 0 and line.endswith(f"created the schema at {head_revision()} (head)"), line
    assert "postgresql+psycopg://" in line
    code, line = cli("db", "current", "--db-url", pg_url)
    assert code == 0 and line.endswith(f"at {head_revision()}, the head of this release"), line
    assert differences(pg_url) == []  # the migrated tables are exactly the declared ones, types included
    engine = sa.create_engine(pg_url)
    try:
        with engine.connect() as conn:  # a serial's own sequence is not compared above; 0006 widened it too
            types = dict(conn.execute(sa.text("SELECT sequencename, data_type::text FROM pg_sequences")).all())
        assert types["telemetry_id_seq"] == "bigint" and types["events_id_seq"] == "bigint", types
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), "base")
        assert sa.inspect(engine).get_table_names() == ["alembic_version"]
        assert schema_state(engine).current is None
    finally:
        engine.dispose()
    code, line = cli("db", "upgrade", "--db-url", pg_url)
    assert code == 0 and "created the schema" in line, line
    assert differences(pg_url) == []


def test_a_database_with_the_5092848_schema_is_adopted_and_upgraded_with_its_rows(postgres, pg_url):
    # 5092848 made its tables with create_all; the baseline revision builds exactly them (test_db_upgrade checks
    # it against the frozen DDL), so baseline minus alembic_version is that release's PostgreSQL database
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as conn:
            command.upgrade(alembic_config(connection=conn), BASELINE)
            conn.execute(sa.text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()
    postgres.execute_script(pg_url.rsplit("/", 1)[1], ROWS_5092848)
    code, line = cli("db", "current", "--db-url", pg_url)
    assert code == 0 and "made before schema versioning" in line, line
    code, line = cli("db", "upgrade", "--db-url", pg_url)
    assert code == 0 and line.endswith(f"adopted a database made before schema versioning at {BASELINE}, "
                                       f"now at {head_revision()} (head)"), line
    assert differences(pg_url) == []
    db = Database(pg_url)
    try:
        with db.engine.connect() as conn:
            models = conn.execute(sa.text("SELECT id, version, parent_id, lineage_id FROM models ORDER BY id")).all()
            assert [tuple(m) for m in models] == [("m-1", 1, None, "m-1"), ("m-2", 2, "m-1", "m-1")]
            dev = conn.execute(sa.text("SELECT enrollment, online FROM devices")).one()
            assert tuple(dev) == ("enrolled", True)
            assert conn.execute(sa.text("SELECT rebased FROM reanalyses")).scalar_one() == ["cam-1"]
            assert conn.execute(sa.text("SELECT data FROM field_samples")).scalar_one() == b"\x00\x01\x02\x03"
            assert conn.execute(sa.text("SELECT command FROM deployments")).scalar_one() == "deploy"
    finally:
        db.close()


def test_a_server_on_postgresql_registers_models_tokens_and_devices(pg_url, lenet, tmp_path, monkeypatch):
    monkeypatch.delenv("TOCO_FLEET_DB_URL", raising=False)
    code, line = cli("tokens", "create", "--name", "ops", "--role", "admin", "--db-url", pg_url)
    assert code == 0, line
    code, line = cli("devices", "enroll", "cam-1", "--group", "line", "--db-url", pg_url)
    assert code == 0 and "enrolled cam-1 in group line" in line, line
    fleet = Fleet(tmp_path, "embedded", db_url=pg_url)
    dev = None
    try:
        m = fleet.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"]), "pool": ("p.npz", lenet["pool"])},
                           data={"name": "lenet5"})
        assert m.status_code == 200, m.text
        again = fleet.api.post("/api/models", files={"file": ("m.onnx", lenet["onnx"]),
                                                      "pool": ("p.npz", lenet["pool"])}, data={"name": "lenet5"})
        assert again.status_code == 200, again.text
        models = fleet.api.get("/api/models").json()
        assert sorted(x["version"] for x in models if x["name"] == "lenet5") == [1, 2]
        # a box with more than 2 GiB free: memory figures are 64-bit on every backend
        dev = SimDevice(fleet.port, "test", "cam-1", group="line",
                        hardware={**HARDWARE, "total_memory": 8 << 30, "available_memory": 6 << 30})
        assert wait_until(lambda: any(d["device_id"] == "cam-1" and d["online"]
                                      for d in fleet.api.get("/api/devices").json()), timeout=20)
        dev.send(TelemetryMessage(device_id="cam-1", mem_available=5 << 30, disk_free=1 << 40, cpu_load=0.5,
                                  inferences=3_000_000_000))
        assert wait_until(lambda: fleet.api.get("/api/devices/cam-1").json().get("telemetry"), timeout=20)
        view = fleet.api.get("/api/devices/cam-1").json()
        assert view["telemetry"][-1]["available_memory"] == 5 << 30
        assert view["group"] == "line"
    finally:
        if dev is not None:
            dev.close()
        fleet.stop()


def test_every_event_kind_the_server_logs_fits_its_column_on_postgresql(pg_url):
    # PostgreSQL enforces VARCHAR lengths (SQLite does not): the longest kind logged, by the drift policy
    from fleet_server.registry import log_event

    db = Database(pg_url)
    try:
        with db.session(write=True) as s:
            log_event(s, "reanalysis_skipped", {"alert_id": "al-1", "why": "cooldown"})
        with db.engine.connect() as conn:
            assert conn.execute(sa.text("SELECT kind FROM events")).scalar_one() == "reanalysis_skipped"
    finally:
        db.close()
