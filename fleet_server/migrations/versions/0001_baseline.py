"""Baseline: the fleet schema exactly as commit 5092848 created it (the last release before Alembic).

Written out table by table rather than from ``Base.metadata``, so later model changes never change
what this revision builds. A database made before Alembic is stamped here instead of running it
(fleet_server.migrate), so keep it identical to tests/fleet/fixtures/schema_5092848.sql.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create every table and index of the 5092848 schema (parents before the tables that point at them)."""
    op.create_table(
        "models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("weights", sa.Integer(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("pool_size", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("pool_path", sa.Text(), nullable=False),
        sa.Column("preprocessing", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_models_sha256", "models", ["sha256"])

    op.create_table(
        "devices",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("group", sa.String(64), nullable=False),
        sa.Column("online", sa.Boolean(), nullable=False),
        sa.Column("birth", sa.Integer(), nullable=False),
        sa.Column("last_seen", sa.Float(), nullable=False),
        sa.Column("agent_version", sa.String(64), nullable=True),
        sa.Column("hardware", sa.JSON(), nullable=False),
        sa.Column("active", sa.JSON(), nullable=True),
        sa.Column("last_drift", sa.JSON(), nullable=True),
        sa.Column("alert", sa.Boolean(), nullable=False),
        sa.Column("deploy_state", sa.String(16), nullable=True),
        sa.Column("bad_messages", sa.Integer(), nullable=False),
    )
    op.create_index("ix_devices_group", "devices", ["group"])

    op.create_table(
        "telemetry",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("cpu_percent", sa.Float(), nullable=False),
        sa.Column("available_memory", sa.Integer(), nullable=False),
        sa.Column("inferences", sa.Integer(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
    )
    op.create_index("ix_telemetry_device_t", "telemetry", ["device_id", "t"])

    op.create_table(
        "deployment_timeline",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("deployment_id", sa.String(40), nullable=False),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("t", sa.Float(), nullable=False),
    )
    op.create_index("ix_deployment_timeline_deployment_id", "deployment_timeline", ["deployment_id"])
    op.create_index("ix_deployment_timeline_device_id", "deployment_timeline", ["device_id"])

    op.create_table(
        "drift_reports",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=True),
        sa.Column("window", sa.Integer(), nullable=False),
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("alert", sa.Boolean(), nullable=False),
        sa.Column("point", sa.JSON(), nullable=False),
        sa.Column("disputed", sa.JSON(), nullable=False),
    )
    op.create_index("ix_drift_device_t", "drift_reports", ["device_id", "t"])

    op.create_table(
        "field_samples",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ref", sa.String(128), nullable=False),
        sa.Column("window", sa.Integer(), nullable=True),
        sa.Column("dtype", sa.String(16), nullable=False),
        sa.Column("shape", sa.JSON(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False),
        sa.Column("t", sa.Float(), nullable=False),
    )
    op.create_index("ix_field_samples_device_id", "field_samples", ["device_id"])

    op.create_table(
        "reanalyses",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("model_id", sa.String(40), nullable=False),
        sa.Column("parent_analysis_id", sa.String(40), nullable=False),
        sa.Column("group", sa.String(64), nullable=False),
        sa.Column("trigger_devices", sa.JSON(), nullable=False),
        sa.Column("trigger_bundles", sa.JSON(), nullable=False),
        sa.Column("why", sa.Text(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("analysis_id", sa.String(40), nullable=True),
        sa.Column("deployment_id", sa.String(40), nullable=True),
        sa.Column("approved_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_reanalyses_status", "reanalyses", ["status"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("t", sa.Float(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
    )

    op.create_table(
        "analyses",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("model_id", sa.String(40), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("phase", sa.String(32), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("field_sample_ids", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("bundle_id", sa.String(64), nullable=True),
        sa.Column("result_dir", sa.Text(), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("started_at", sa.Float(), nullable=True),
        sa.Column("finished_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_analyses_status", "analyses", ["status"])
    op.create_index("ix_analyses_model_id", "analyses", ["model_id"])

    op.create_table(
        "bundles",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("analysis_id", sa.String(40), sa.ForeignKey("analyses.id"), nullable=False),
        sa.Column("model_id", sa.String(40), sa.ForeignKey("models.id"), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_bundles_analysis_id", "bundles", ["analysis_id"])
    op.create_index("ix_bundles_model_id", "bundles", ["model_id"])

    op.create_table(
        "deployments",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("analysis_id", sa.String(40), sa.ForeignKey("analyses.id"), nullable=False),
        sa.Column("bundle_id", sa.String(64), nullable=False),
        sa.Column("target", sa.JSON(), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("canary_share", sa.Float(), nullable=False),
        sa.Column("failure_threshold", sa.Float(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("finished_at", sa.Float(), nullable=True),
    )
    op.create_index("ix_deployments_stage", "deployments", ["stage"])

    op.create_table(
        "deployment_devices",
        sa.Column("deployment_id", sa.String(40), sa.ForeignKey("deployments.id"), primary_key=True),
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("wave", sa.String(8), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("expected_infeasible", sa.Text(), nullable=True),
        sa.Column("sent_at", sa.Float(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_index("ix_deployment_devices_device_id", "deployment_devices", ["device_id"])


def downgrade() -> None:
    """Drop every table (children first): a downgrade past the baseline empties the database."""
    for table in ("deployment_devices", "deployments", "bundles", "analyses", "events", "reanalyses", "field_samples",
                  "drift_reports", "deployment_timeline", "telemetry", "devices", "models"):
        op.drop_table(table)
