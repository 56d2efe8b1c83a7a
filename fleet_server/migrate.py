"""The fleet database's schema version: Alembic revisions (fleet_server/migrations), applied on open.

A database outlives releases. Every schema change is a revision; opening a database upgrades it to
this release's head. Databases made before Alembic (releases up to commit 5092848) have the tables
but no ``alembic_version``: they are adopted, i.e. stamped at the baseline revision, which builds
exactly their schema, and then upgraded like any other. A database at a revision this release does
not know was written by a newer release and is refused untouched (DatabaseError).

Alembic is driven from code: the script location is this package's ``migrations`` folder, so no
``alembic.ini`` is needed and the revisions ship inside the wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.operations import Operations
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.engine import make_url

from toco_core.errors import DatabaseError

MIGRATIONS = Path(__file__).with_name("migrations")
BASELINE = "0001_baseline"
# What the baseline creates. Frozen history: an unversioned database with all of these tables is a
# pre-Alembic fleet database; later revisions do not change this set.
BASELINE_TABLES = frozenset({"models", "analyses", "bundles", "devices", "telemetry", "deployments",
                             "deployment_devices", "deployment_timeline", "drift_reports", "field_samples",
                             "reanalyses", "events"})


@dataclass(frozen=True)
class SchemaState:
    """Where a database's schema stands, read without changing anything.

    ``current``: its revision, None if unversioned; ``head``: this release's newest revision;
    ``legacy``: unversioned but holding the fleet tables (made before Alembic).
    """

    current: str | None
    head: str
    legacy: bool

    def summary(self) -> str:
        """One line for people: where the schema is and what, if anything, to run."""
        if self.current == self.head:
            return f"at {self.head}, the head of this release"
        if self.legacy:
            return (f"made before schema versioning; `toco-fleet db upgrade` adopts it at {BASELINE} "
                    f"and upgrades it to {self.head}")
        if self.current is None:
            return f"no fleet tables yet; `toco-fleet db upgrade` creates them at {self.head}"
        return f"at {self.current}, behind the head {self.head}; run `toco-fleet db upgrade` (the server does on start)"


@dataclass(frozen=True)
class UpgradeResult:
    """What ``upgrade_database`` did: revision ``before`` (None: a new database; the baseline for an
    adopted one) -> ``after`` (the head); ``adopted``: a pre-Alembic database was stamped at the baseline first."""

    before: str | None
    after: str
    adopted: bool

    def summary(self) -> str:
        """One line for people: what changed."""
        if self.adopted:
            return f"adopted a database made before schema versioning at {BASELINE}, now at {self.after} (head)"
        if self.before is None:
            return f"created the schema at {self.after} (head)"
        if self.before == self.after:
            return f"already at {self.after} (head), nothing to do"
        return f"upgraded {self.before} -> {self.after} (head)"


def alembic_config(url: str | None = None, connection: Connection | None = None) -> Config:
    """An Alembic Config for the fleet migrations, built in code (no alembic.ini).

    Takes ``url`` (a SQLAlchemy URL env.py opens when no connection is given, e.g. for
    ``command.revision(..., autogenerate=True)``) and/or ``connection`` (an open connection env.py
    runs on). Returns the Config. Raises nothing.
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("file_template", "%%(rev)s")  # versions/0002_device_site.py for rev_id="0002_device_site"
    if url is not None:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))  # ConfigParser interpolates '%'
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """This release's newest revision id. Raises RuntimeError if the revisions have several heads
    (two revisions name the same parent: git branches merged without an Alembic merge revision)."""
    heads = _scripts().get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"fleet migrations have {len(heads)} heads {heads}; add a merge revision")
    return heads[0]


def schema_state(engine: Engine) -> SchemaState:
    """Read where ``engine``'s database stands; changes nothing.

    Returns a SchemaState. Raises DatabaseError for a revision this release does not know or a
    partial set of fleet tables without a version.
    """
    with engine.connect() as conn:
        return _state(conn)


def upgrade_database(engine: Engine) -> UpgradeResult:
    """Bring ``engine``'s database to this release's head: create, adopt-and-upgrade, or upgrade.

    Returns an UpgradeResult. Raises DatabaseError (nothing changed) for a newer release's revision
    or tables this release cannot adopt.
    """
    with engine.begin() as conn:
        state = _state(conn)
        if state.legacy:
            _adopt(conn)
        command.upgrade(alembic_config(connection=conn), "head")
        after = MigrationContext.configure(conn).get_current_revision()
        assert after is not None, "upgraded to head"
    return UpgradeResult(before=BASELINE if state.legacy else state.current, after=after, adopted=state.legacy)


def describe_url(url: str) -> str:
    """``url`` fit to print: the password hidden. Returns the string. Raises nothing for a valid URL."""
    return make_url(url).render_as_string(hide_password=True)


@cache
def _scripts() -> ScriptDirectory:
    # parsing the revision files once per process: the server opens one database, tests open many
    return ScriptDirectory.from_config(alembic_config())


def _state(conn: Connection) -> SchemaState:
    head = head_revision()
    current = MigrationContext.configure(conn).get_current_heads()
    known = {s.revision for s in _scripts().walk_revisions()}
    unknown = [r for r in current if r not in known]
    if unknown:
        raise DatabaseError(f"the fleet database is at schema revision {unknown[0]!r}, which this release does not "
                            f"know; its newest is {head!r}",
                            "a newer toco-fleet upgraded it: run that release, or restore the backup taken before")
    if current:
        return SchemaState(current=current[0], head=head, legacy=False)
    present = BASELINE_TABLES & set(inspect(conn).get_table_names())
    if present and present != BASELINE_TABLES:
        missing = ", ".join(sorted(BASELINE_TABLES - present))
        raise DatabaseError(f"the fleet database has no schema version and only some fleet tables (missing: {missing})",
                            "this release cannot tell which schema it has; point --data-dir / TOCO_FLEET_DB_URL at the "
                            "right database or restore a backup")
    return SchemaState(current=None, head=head, legacy=bool(present))


def _adopt(conn: Connection) -> None:
    """Make a pre-Alembic database match the baseline, then stamp it there.

    Releases before commit 1cd1114 lacked deployment_devices.expected_infeasible; the hand-made
    upgrade this module replaced added it on open. It is nullable, so adding it is the whole
    catch-up; after that every pre-Alembic release's schema is the baseline's.
    """
    columns = {c["name"] for c in inspect(conn).get_columns("deployment_devices")}
    if "expected_infeasible" not in columns:
        Operations(MigrationContext.configure(conn)).add_column(
            "deployment_devices", sa.Column("expected_infeasible", sa.Text(), nullable=True))
    command.stamp(alembic_config(connection=conn), BASELINE)
