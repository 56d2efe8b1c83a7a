"""Revision 0004_model_versions on real SQLite files: a database at 0003 whose model names repeat
becomes one lineage of versions per name (creation order), and the downgrade gives 0003 back."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from sqlalchemy import create_engine, inspect

from fleet_server.db import Database, DeploymentRow, ModelRow
from fleet_server.migrate import alembic_config, head_revision
from tests.fleet.test_db_upgrade import differences

BEFORE = "0003_device_enrollment"
MODELS = [  # id, name, created_at: two lenet5 uploads out of id order, one resnet, a third lenet5
    ("m-b", "lenet5", 2.0), ("m-a", "lenet5", 1.0), ("m-r", "resnet", 1.5), ("m-c", "lenet5", 3.0)]


def database_at_0003(path: Path) -> str:
    """A SQLite file migrated to 0003 holding MODELS and one deployment. Returns its URL."""
    url = f"sqlite:///{path}"
    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(alembic_config(connection=conn), BEFORE)
    engine.dispose()
    with sqlite3.connect(path) as db:
        for model_id, name, t in MODELS:
            db.execute("INSERT INTO models VALUES (?, ?, 'ab', 1, 2, 3, '/m.onnx', '/p.npz', NULL, ?)",
                       (model_id, name, t))
        db.execute("INSERT INTO analyses (id, model_id, status, phase, done, total, reason, settings, "
                   "field_sample_ids, created_at) "
                   "VALUES ('a-1', 'm-a', 'done', 'done', 1, 1, 'initial', '{}', '[]', 1)")
        db.execute("INSERT INTO deployments VALUES ('d-1', 'a-1', 'b1', '{\"group\": \"line\"}', 'done', 0.1, 0.2, "
                   "NULL, 6.0, 7.0)")
    db.close()
    return url


def test_duplicate_names_become_versions_in_creation_order(tmp_path):
    url = database_at_0003(tmp_path / "fleet.db")
    db = Database(url)
    try:
        assert db.schema.before == BEFORE and db.schema.after == head_revision()
        with db.session() as s:
            rows = {m.id: (m.name, m.version, m.parent_id, m.lineage_id) for m in s.query(ModelRow)}
            assert s.get(DeploymentRow, "d-1").command == "deploy"
    finally:
        db.close()
    assert rows == {"m-a": ("lenet5", 1, None, "m-a"), "m-b": ("lenet5", 2, "m-a", "m-a"),
                    "m-c": ("lenet5", 3, "m-b", "m-a"), "m-r": ("resnet", 1, None, "m-r")}
    assert differences(url) == []


def test_the_downgrade_gives_back_0003_with_its_rows(tmp_path):
    url = database_at_0003(tmp_path / "fleet.db")
    Database(url).close()
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(connection=conn), BEFORE)
        columns = {c["name"] for c in inspect(engine).get_columns("models")}
        assert not {"version", "parent_id", "lineage_id"} & columns
        assert "command" not in {c["name"] for c in inspect(engine).get_columns("deployments")}
        with engine.connect() as conn:
            assert sorted(r[0] for r in conn.exec_driver_sql("SELECT name FROM models")) == ["lenet5"] * 3 + ["resnet"]
    finally:
        engine.dispose()
    again = Database(url)  # and it upgrades again
    again.close()
    assert again.schema.before == BEFORE
