"""The per-model bundle sequence (anti-rollback): one more than the highest of the model's stored bundles.

Kept in the DB without a column of its own: every stored bundle's manifest (``BundleRow.manifest``,
JSON) already holds its signed ``sequence``, so the counter is their maximum. Bundles built before
sequences existed count as 0 (docs/bundles.md). Two builds of one model at the same moment may get
the same number; devices refuse only a sequence *below* the highest they took, so that is harmless.
"""

from __future__ import annotations

from sqlalchemy import select

from fleet_server.db import BundleRow, Database


def next_bundle_sequence(db: Database, model_id: str) -> int:
    """The sequence for a new bundle of ``model_id``: 1 + the highest sequence among its stored bundles (0 if none)."""
    with db.session() as s:
        manifests = s.scalars(select(BundleRow.manifest).where(BundleRow.model_id == model_id)).all()
    return 1 + max((int(m.get("sequence") or 0) for m in manifests if isinstance(m, dict)), default=0)
