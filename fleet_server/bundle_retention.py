"""Bundle retention (part of the housekeeping duty): superseded bundles are deleted.

Every analysis and every re-analysis stores a bundle (the optional fp32 base included), and the
publisher keeps each bundle it announced in memory, so a fleet re-analysing once per shift grew
without end. A bundle is deleted when all of these hold:

- it is not among the ``keep`` bundles of its model version packed last (a rollback to that
  version deploys the one packed last; fleet_server.version_rollback; a re-pack counts as packed
  then),
- no device runs it (``devices.active_bundle``) and no unfinished deployment sends it,
- it is older than ``min_age_s`` (a box that just booted may still ask for the one it ran).

Deleting withdraws it from the broker (an empty retained manifest) and the publisher's memory,
removes its files and row, and clears the analysis' ``bundle_id``; deploying that analysis again
re-packs it (fleet_server.deployments). Each deletion is one short transaction that checks the
bundle is still unused, so a deployment starting meanwhile keeps it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select, update

from fleet_server.db import AnalysisRow, BundleRow, Database, DeploymentRow, DeviceRow
from fleet_server.registry import log_event

log = logging.getLogger("toco.fleet.bundles")


def _in_use(s, bundle_id: str | None = None) -> set[str]:
    """Bundle ids a device runs or an unfinished deployment sends (only ``bundle_id`` when given)."""
    active = select(DeviceRow.active_bundle).where(DeviceRow.active_bundle.is_not(None))
    sending = select(DeploymentRow.bundle_id).where(DeploymentRow.finished_at.is_(None))
    if bundle_id is not None:
        active = active.where(DeviceRow.active_bundle == bundle_id)
        sending = sending.where(DeploymentRow.bundle_id == bundle_id)
    return {b for b in s.scalars(active).all() if b} | set(s.scalars(sending).all())


def superseded_bundles(db: Database, keep: int, min_age_s: float, now: float | None = None) -> list[str]:
    """Ids of the bundles retention deletes (see module doc), oldest first."""
    now = time.time() if now is None else now
    with db.session() as s:
        rows = s.execute(select(BundleRow.id, BundleRow.model_id, BundleRow.created_at)
                         .order_by(BundleRow.model_id, BundleRow.created_at.desc())).all()
        used = _in_use(s)
    seen: dict[str, int] = {}
    out = []
    for bundle_id, model_id, created_at in rows:
        seen[model_id] = seen.get(model_id, 0) + 1
        if seen[model_id] > keep and bundle_id not in used and created_at < now - min_age_s:
            out.append((created_at, bundle_id))
    return [b for _, b in sorted(out)]


def delete_bundles(db: Database, bundle_ids: list[str], withdraw: Callable[[str], None]) -> list[str]:
    """Delete each bundle still unused (see module doc); ``withdraw(id)`` stops serving it. Returns those deleted."""
    deleted = []
    for bundle_id in bundle_ids:
        with db.session(write=True) as s:
            row = s.get(BundleRow, bundle_id)
            if row is None or _in_use(s, bundle_id):
                continue
            path = Path(row.path)
            s.execute(update(AnalysisRow).where(AnalysisRow.bundle_id == bundle_id).values(bundle_id=None))
            s.delete(row)
            log_event(s, "bundle", {"bundle_id": bundle_id, "deleted": "superseded"})
        withdraw(bundle_id)
        for f in (path, path.with_suffix(".manifest.json")):
            f.unlink(missing_ok=True)
        deleted.append(bundle_id)
    if deleted:
        log.info("deleted superseded bundles", extra={"fields": {"bundles": [b[:12] for b in deleted]}})
    return deleted
