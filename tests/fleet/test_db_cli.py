"""``toco-fleet db upgrade`` / ``db current`` on real SQLite files: one line out, one-line errors with exit 2."""

from __future__ import annotations

import sqlite3

import pytest
from typer.testing import CliRunner

from fleet_server.cli import app
from fleet_server.migrate import BASELINE, head_revision
from tests.fleet.test_db_upgrade import old_database


@pytest.fixture
def db(tmp_path, monkeypatch):
    """Runs ``toco-fleet db ARGS --data-dir tmp_path``; returns (exit code, output as one line)."""
    monkeypatch.delenv("TOCO_FLEET_DB_URL", raising=False)
    monkeypatch.delenv("TOCO_FLEET_DATA_DIR", raising=False)

    def run(*args: str) -> tuple[int, str]:
        out = CliRunner().invoke(app, ["db", *args, "--data-dir", str(tmp_path)])
        assert out.output.count("\n") == 1, out.output  # one line, whatever happened
        return out.exit_code, out.output.strip()

    return run


def test_a_new_database_is_created_at_head_and_reported(db, tmp_path):
    code, line = db("current")
    assert code == 2 and "no fleet database at" in line and "db upgrade" in line
    assert not (tmp_path / "fleet.db").exists()  # asking never creates one
    url = f"sqlite:///{(tmp_path / 'fleet.db').resolve()}"
    assert db("upgrade") == (0, f"{url}: created the schema at {head_revision()} (head)")
    code, line = db("current")
    assert code == 0 and line.endswith(f": at {head_revision()}, the head of this release")
    code, line = db("upgrade")
    assert code == 0 and line.endswith("nothing to do")


def test_a_database_made_before_alembic_is_reported_then_adopted(db, tmp_path):
    old_database(tmp_path / "fleet.db")
    code, line = db("current")
    assert code == 0 and "made before schema versioning" in line and "toco-fleet db upgrade" in line
    code, line = db("upgrade")
    assert code == 0 and line.endswith(f"adopted a database made before schema versioning at {BASELINE}, "
                                       f"now at {head_revision()} (head)")
    with sqlite3.connect(tmp_path / "fleet.db") as conn:
        assert conn.execute("SELECT name FROM models").fetchall() == [("lenet5",)]
    conn.close()


def test_a_newer_release_database_is_an_error_line(db, tmp_path):
    assert db("upgrade")[0] == 0
    with sqlite3.connect(tmp_path / "fleet.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0042_from_the_future'")
    conn.close()
    for command in ("current", "upgrade"):
        code, line = db(command)
        assert code == 2 and line.startswith("error: ") and "'0042_from_the_future'" in line
        assert "newer toco-fleet" in line


def test_db_url_overrides_the_data_dir_and_bad_places_are_error_lines(db, tmp_path):
    other = tmp_path / "elsewhere.db"
    code, line = db("upgrade", "--db-url", f"sqlite:///{other}")
    assert code == 0 and "created the schema" in line and other.exists() and not (tmp_path / "fleet.db").exists()
    code, line = db("upgrade", "--db-url", f"sqlite:///{tmp_path / 'missing' / 'fleet.db'}")
    assert code == 2 and "does not exist" in line
    code, line = db("current", "--db-url", "not a url")
    assert code == 2 and "invalid database URL" in line
