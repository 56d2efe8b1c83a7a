"""The per-model bundle sequence (anti-rollback): one more than the highest of the model's stored bundles.

"The model" is the lineage of all versions of one name (fleet_server.model_versions): bundles are
signed with the lineage id as their model id, and the sequence counts over every version's
bundles, so a new version's bundle is above the old one's and going back to an older version
needs a signed rollback command (a device refuses a lower sequence any other way).

Kept in the DB without a column of its own: every stored bundle's manifest (``BundleRow.manifest``,
JSON) already holds its signed ``sequence``, so the counter is their maximum. Bundles built before
sequences existed count as 0 (docs/bundles.md). Two builds of one model at the same moment may get
the same number; devices refuse only a sequence *below* the highest they took, so that is harmless.
"""

from __future__ import annotations

from sqlalchemy import or_, select

from fleet_server.db import BundleRow, Database, ModelRow


def bundle_model_id(db: Database, model_id: str) -> str:
    """The model id a bundle of version ``model_id`` is signed with: its lineage id (v1's id)."""
    with db.session() as s:
        row = s.get(ModelRow, model_id)
    return (row.lineage_id if row is not None else None) or model_id


def next_bundle_sequence(db: Database, model_id: str) -> int:
    """The sequence for a new bundle of version ``model_id``: 1 + the highest sequence among the stored
    bundles of every version of its lineage (0 if none)."""
    lineage = bundle_model_id(db, model_id)
    versions = select(ModelRow.id).where(or_(ModelRow.lineage_id == lineage, ModelRow.id == model_id))
    with db.session() as s:
        manifests = s.scalars(select(BundleRow.manifest).where(or_(BundleRow.model_id == model_id,
                                                                   BundleRow.model_id.in_(versions)))).all()
    return 1 + max((int(m.get("sequence") or 0) for m in manifests if isinstance(m, dict)), default=0)
