"""Model versions: a model name is one lineage of versions v1, v2, ... each pointing at its parent.

Until now ``toco-fleet models add`` with a name already taken made a second, unrelated model of
that name. Now the name identifies the model and a new upload under it is its next version
(fleet_server.model_versions). Rows already in the table are numbered per name in creation order:
the oldest is v1, each later one's parent is the one before it, and all share the oldest's id as
their lineage (the model id their bundles' anti-rollback sequence counts under from now on).

Deployments gain ``command``: ``deploy`` as before, or ``rollback`` for a deployment that takes a
group back to an older version's bundle through signed rollback commands naming it (the agents
refuse an older bundle any other way).

Revision ID: 0004_model_versions
Revises: 0003_device_enrollment
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_model_versions"
down_revision = "0003_device_enrollment"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add ``models.version``, ``parent_id``, ``lineage_id`` (numbering existing rows), the unique
    (name, version) index, and ``deployments.command``."""
    with op.batch_alter_table("models") as batch:  # batch: SQLite cannot add NOT NULL columns with constraints in place
        batch.add_column(sa.Column("version", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("parent_id", sa.String(40), nullable=True))
        batch.add_column(sa.Column("lineage_id", sa.String(40), nullable=True))
    _number_existing_versions()
    op.create_index("ux_models_name_version", "models", ["name", "version"], unique=True)
    op.create_index("ix_models_lineage_id", "models", ["lineage_id"])
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("command", sa.String(16), nullable=False, server_default="deploy"))


def _number_existing_versions() -> None:
    """Duplicate names become versions in creation order (ties broken by id, so the result is stable)."""
    conn = op.get_bind()
    models = sa.table("models", sa.column("id"), sa.column("name"), sa.column("created_at"), sa.column("version"),
                      sa.column("parent_id"), sa.column("lineage_id"))
    rows = conn.execute(sa.select(models.c.id, models.c.name).order_by(models.c.name, models.c.created_at,
                                                                        models.c.id)).all()
    previous: dict[str, tuple[str, str, int]] = {}  # name -> (lineage id, last id, last version)
    for model_id, name in rows:
        lineage, parent, version = previous.get(name, (model_id, None, 0))
        conn.execute(models.update().where(models.c.id == model_id)
                     .values(version=version + 1, parent_id=parent, lineage_id=lineage))
        previous[name] = (lineage, model_id, version + 1)


def downgrade() -> None:
    """Drop the version columns and index (names may repeat again; the rows stay) and ``deployments.command``."""
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("command")
    op.drop_index("ix_models_lineage_id", "models")
    op.drop_index("ux_models_name_version", "models")
    with op.batch_alter_table("models") as batch:
        batch.drop_column("lineage_id")
        batch.drop_column("parent_id")
        batch.drop_column("version")
