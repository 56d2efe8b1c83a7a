"""A fleet database made by an earlier release opens in this one: new nullable columns are added."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table

from fleet_server.db import Database, DeploymentDeviceRow, add_new_columns


def test_an_older_database_gains_the_new_column_and_keeps_its_rows(tmp_path):
    path = tmp_path / "fleet.sqlite3"
    Database(f"sqlite:///{path}").close()
    with sqlite3.connect(path) as conn:  # as the release before expected_infeasible left it
        conn.execute("ALTER TABLE deployment_devices DROP COLUMN expected_infeasible")
        conn.execute("INSERT INTO deployment_devices (deployment_id, device_id, wave, phase, outcome, updated_at) "
                     "VALUES ('d-1', 'cam-1', 'canary', 'active', 'succeeded', 1.0)")
    db = Database(f"sqlite:///{path}")
    try:
        with db.session() as s:
            row = s.get(DeploymentDeviceRow, ("d-1", "cam-1"))
            assert row.outcome == "succeeded" and row.expected_infeasible is None
        assert add_new_columns(db.engine) == []  # nothing left to add the second time
    finally:
        db.close()


def test_a_new_not_null_column_asks_for_a_migration(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'fleet.sqlite3'}")
    later = MetaData()  # a release that would add a required column
    Table("deployments", later, Column("id", String(40), primary_key=True), Column("must_have", Integer, nullable=False))
    try:
        with pytest.raises(RuntimeError, match="must_have is new and NOT NULL"):
            add_new_columns(db.engine, later)
    finally:
        db.close()
