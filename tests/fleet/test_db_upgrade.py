"""The fleet database's schema through Alembic, on real SQLite files.

A database made by the last release before Alembic (commit 5092848, its CREATE statements in
fixtures/schema_5092848.sql) is adopted and upgraded with its rows; so is one from before
deployment_devices.expected_infeasible; a fresh database is exactly the declared tables; a newer
release's database is refused untouched.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import MetaData, create_engine

from fleet_server.db import (
    AnalysisRow,
    Base,
    Database,
    DeploymentDeviceRow,
    DeviceRow,
    EventRow,
    ModelRow,
    SampleRow,
    TelemetryRow,
)
from fleet_server.migrate import BASELINE, alembic_config, head_revision, schema_state
from toco_core.errors import DatabaseError

SCHEMA_5092848 = Path(__file__).parent / "fixtures" / "schema_5092848.sql"
ROWS = """
INSERT INTO models VALUES ('m-1', 'lenet5', 'ab12', 61706, 250000, 120, '/d/m.onnx', '/d/p.npz', NULL, 1.0);
INSERT INTO analyses (id, model_id, status, phase, done, total, reason, settings, field_sample_ids, created_at)
  VALUES ('a-1', 'm-1', 'done', 'done', 4, 4, 'initial', '{"budget": 0.01}', '[]', 2.0);
INSERT INTO devices VALUES ('cam-1', 'line', 1, 3, 5.0, 'agent-1', '{"total_memory": 268435456}', NULL, NULL, 0, NULL,
  0);
INSERT INTO deployments VALUES ('d-1', 'a-1', 'b1', '{"group": "line"}', 'done', 0.1, 0.2, NULL, 6.0, 7.0);
INSERT INTO telemetry (device_id, t, cpu_percent, available_memory, inferences, p50_ms)
  VALUES ('cam-1', 5.0, 12.5, 100000000, 40, 0.8), ('cam-1', 6.0, 11.0, 100000000, 80, NULL);
INSERT INTO field_samples (device_id, ref, "window", dtype, shape, data, reason, t)
  VALUES ('cam-1', 'cam-1-3-0', 3, 'float32', '[1, 28, 28]', X'00010203', 'drift', 8.0);
INSERT INTO events (t, kind, data) VALUES (9.0, 'deploy', '{"deployment_id": "d-1"}');
"""


def old_database(path: Path, before_expected_infeasible: bool = False) -> str:
    """A SQLite file as 5092848 left it, with rows; optionally as a release before 1cd1114 left it. Returns its URL."""
    with sqlite3.connect(path) as conn:
        conn.executescript(SCHEMA_5092848.read_text())
        conn.executescript(ROWS)
        if before_expected_infeasible:
            conn.execute("ALTER TABLE deployment_devices DROP COLUMN expected_infeasible")
            conn.execute("INSERT INTO deployment_devices (deployment_id, device_id, wave, phase, outcome, updated_at) "
                         "VALUES ('d-1', 'cam-1', 'canary', 'active', 'succeeded', 7.0)")
        else:
            conn.execute("INSERT INTO deployment_devices VALUES ('d-1', 'cam-1', 'canary', 'active', 'succeeded', "
                         "NULL, 'storage 2 KB < 60 KB', 6.5, 7.0)")
    conn.close()
    return f"sqlite:///{path}"


def differences(url: str) -> list:
    """Alembic's autogenerate comparison of the database at ``url`` with the declared tables (empty: identical)."""
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return compare_metadata(MigrationContext.configure(conn), Base.metadata)
    finally:
        engine.dispose()


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    return names


def version(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        rows = [r[0] for r in conn.execute("SELECT version_num FROM alembic_version")]
    conn.close()
    return rows


def test_a_database_made_by_5092848_is_adopted_upgraded_and_keeps_its_rows(tmp_path):
    path = tmp_path / "fleet.db"
    url = old_database(path)
    engine = create_engine(url)
    assert schema_state(engine).legacy  # reading the state changed nothing
    engine.dispose()
    assert "alembic_version" not in tables(path)
    db = Database(url)
    try:
        assert db.schema.adopted and db.schema.before == BASELINE and db.schema.after == head_revision()
        with db.session() as s:
            assert s.get(ModelRow, "m-1").name == "lenet5"
            assert s.get(AnalysisRow, "a-1").settings == {"budget": 0.01}
            assert s.get(DeviceRow, "cam-1").hardware == {"total_memory": 268435456}
            assert s.get(DeploymentDeviceRow, ("d-1", "cam-1")).expected_infeasible == "storage 2 KB < 60 KB"
            assert s.query(TelemetryRow).count() == 2
            assert s.query(SampleRow).one().data == b"\x00\x01\x02\x03"
            assert s.query(EventRow).one().data == {"deployment_id": "d-1"}
        with db.session(write=True) as s:  # and the upgraded database takes new rows
            s.add(EventRow(kind="note", data={"after": "upgrade"}))
    finally:
        db.close()
    assert version(path) == [head_revision()]
    assert differences(url) == []
    again = Database(url)
    again.close()
    assert not again.schema.adopted and again.schema.before == again.schema.after == head_revision()


def test_a_database_from_before_expected_infeasible_gains_the_column_and_keeps_its_rows(tmp_path):
    url = old_database(tmp_path / "fleet.db", before_expected_infeasible=True)
    db = Database(url)
    try:
        assert db.schema.adopted
        with db.session() as s:
            row = s.get(DeploymentDeviceRow, ("d-1", "cam-1"))
            assert row.outcome == "succeeded" and row.expected_infeasible is None
    finally:
        db.close()
    assert differences(url) == []


def test_a_fresh_database_migrated_to_head_is_exactly_the_declared_tables(tmp_path):
    path = tmp_path / "fleet.db"
    db = Database(f"sqlite:///{path}")
    db.close()
    assert db.schema.before is None and not db.schema.adopted and db.schema.after == head_revision()
    assert version(path) == [head_revision()]
    assert differences(f"sqlite:///{path}") == []


def test_the_baseline_revision_builds_exactly_the_5092848_schema(tmp_path):
    # adoption stamps old databases at the baseline without running it: both must be the same schema
    old = create_engine(f"sqlite:///{tmp_path / 'old.db'}")
    with old.begin() as conn:
        conn.connection.executescript(SCHEMA_5092848.read_text())
    new = create_engine(f"sqlite:///{tmp_path / 'baseline.db'}")
    with new.begin() as conn:
        command.upgrade(alembic_config(connection=conn), BASELINE)
    built = MetaData()
    built.reflect(new)
    built.remove(built.tables["alembic_version"])
    try:
        with old.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), built) == []
    finally:
        old.dispose()
        new.dispose()


def test_a_database_from_a_newer_release_is_refused_untouched(tmp_path):
    path = tmp_path / "fleet.db"
    Database(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0042_from_the_future'")
    conn.close()
    with pytest.raises(DatabaseError) as err:
        Database(f"sqlite:///{path}")
    message = str(err.value)
    assert "'0042_from_the_future'" in message and "newer toco-fleet" in message and "\n" not in message
    assert version(path) == ["0042_from_the_future"]


def test_an_unversioned_database_with_only_some_fleet_tables_is_refused(tmp_path):
    path = tmp_path / "fleet.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE models (id VARCHAR(40) PRIMARY KEY)")
    conn.close()
    with pytest.raises(DatabaseError, match="only some fleet tables .*missing: analyses"):
        Database(f"sqlite:///{path}")
